"""Make `import torchvision` work where its compiled extension cannot load.

On a CPU-only torch, the only torchvision wheel that matches (a CUDA build) fails to load its
`_C` extension, and `import torchvision` then dies with "operator torchvision::nms does not
exist" (pytorch/vision#9085) because its meta registrations refer to operators the extension
would have defined. transformers imports torchvision whenever it is installed, so this breaks
`from transformers import LlamaConfig` too.

The fix declares the two missing operator schemas before torchvision is first imported. It
runs lazily, from a meta-path hook, so interpreters that never import torchvision pay nothing,
and it is a no-op where the extension loads (every real GPU install).

This file imports nothing from the project: the virtual environment's `.pth` hook loads it by
path in every interpreter (pytest, torchrun and deepspeed workers), before any package import.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SCHEMA = "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"


class _TorchvisionGuard(importlib.abc.MetaPathFinder):
    """Runs once, just before the first `import torchvision`, then only answers "not mine".

    It stays on sys.meta_path because it owns the torch.library object: were that collected,
    the declared operators would be deregistered again.
    """

    def __init__(self) -> None:
        self.done = False
        self.library = None

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision" or self.done:
            return None
        self.done = True  # set first: find_spec below re-enters this hook
        self.library = _declare_missing_ops()
        return None  # let the normal finders import torchvision


def _declare_missing_ops():
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return None
    import torch

    ext = sorted(Path(spec.submodule_search_locations[0]).glob("_C*.so")) + sorted(
        Path(spec.submodule_search_locations[0]).glob("_C*.pyd")
    )
    try:
        if ext:
            torch.ops.load_library(str(ext[0]))
            return None  # the real extension is there: nothing to do
    except (OSError, RuntimeError):
        pass
    library = torch.library.Library("torchvision", "DEF")  # noqa: TOR901 - kept alive above
    for op in ("nms", "qnms"):
        library.define(f"{op}{_SCHEMA}")
    return library


def install() -> None:
    """Idempotent: add the hook unless torchvision is imported already or a hook is present."""
    if "torchvision" in sys.modules:
        return
    # Compare by class name: the .pth hook and `import eve` load this file as two modules.
    if any(type(f).__name__ == "_TorchvisionGuard" for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionGuard())
