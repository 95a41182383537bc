"""eve-train: run one EVE training stage.

    eve-train --stage 1 --config stage1_eve7b [--set key=value ...] [--lr_vision 1e-3 ...]
    deepspeed --num_gpus 8 --module train.cli --stage 2 --config stage2_eve7b
    torchrun --nproc_per_node 2 -m train.cli --stage 3 --config my_stage3.json

--config is a JSON file or the name of a shipped one in train/configs/; --stage must agree with
it. Every field below can be overridden by its own option or by --set (a dotted key sets one
entry of a nested dict: --set flavor_overrides.image_size=1344, --set lora.r=8). Without a
launcher it runs as a single process (gloo on CPU). Re-running the same command resumes from
the last complete checkpoint in output_dir/checkpoints; a changed config is refused there
unless --allow_config_change.
"""

from __future__ import annotations

import ctypes
import logging
import sys

from train.config import build_parser, parse_train_config


def return_freed_memory_to_the_system() -> None:
    """glibc serves blocks below its mmap threshold (which grows up to 32 MB as large blocks are
    freed) from heaps it rarely trims, so the hundreds of MB that ZeRO-3 gathers, builds and frees
    at start-up and export stay resident: measured 0.3-0.45 of a 1B model per rank
    (bench/zero3_memory.py). A fixed 1 MiB threshold makes large tensors mmap'd, and freed at once.
    A process-wide allocator setting, so it is made here, at the program's entry, and nowhere else."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):  # not glibc (musl): nothing to tune
            pass


def main(argv: list[str] | None = None) -> None:
    return_freed_memory_to_the_system()
    argv = list(sys.argv[1:] if argv is None else argv)
    argv = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher's; LOCAL_RANK holds it too
    if not argv or "-h" in argv or "--help" in argv:
        build_parser(description=__doc__).print_help()
        return
    if "--stage" not in argv and not any(a.startswith("--stage=") for a in argv):
        raise SystemExit("eve-train: --stage is required (1, 2 or 3), and must agree with the config's")
    try:
        cfg, allow_change = parse_train_config(argv, description=__doc__)
    except ValueError as e:
        raise SystemExit(f"eve-train: {e}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from train.trainer import USER_ERRORS, train

    try:
        final = train(cfg, allow_config_change=allow_change)
    except USER_ERRORS as e:  # the message names the file, line or step: a traceback would bury it
        raise SystemExit(f"eve-train: {type(e).__name__}: {e}") from None
    from train.distributed import close_distributed

    close_distributed()  # every rank is past train()'s last barrier
    print(f"eve-train: stage {cfg.stage} done; model in {final}")


if __name__ == "__main__":
    main()
