"""The task registry: one small file per benchmark, each registering a `Task` subclass."""

from eval.tasks.base import TASKS, Item, Task, get_task, register  # noqa: F401
from eval.tasks import choice_tasks, mme, pope, vqa_tasks  # noqa: F401,E402  (registration)
