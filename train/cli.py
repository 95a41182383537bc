"""eve-train: run one EVE training stage.

    eve-train --stage 1 --config stage1_eve7b [--set key=value ...]
    deepspeed --num_gpus 8 -m train.cli --stage 2 --config stage2_eve7b
    torchrun --nproc_per_node 2 -m train.cli --stage 3 --config my_stage3.json

--config is a JSON file or the name of a shipped one in train/configs/. Without a launcher it
runs as a single process (gloo on CPU). Re-running the same command resumes from the last
complete checkpoint in output_dir/checkpoints.
"""

from __future__ import annotations

import argparse
import logging

from train.config import TrainConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=[1, 2, 3], required=True, help="1 pre-align, 2 generative pre-training, 3 SFT")
    parser.add_argument("--config", required=True, help="stage config: a JSON path or a name in train/configs/")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field (JSON value), e.g. --set lr_vision=1e-3 --set max_steps=20")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig.load(args.config, [f"stage={args.stage}", *args.overrides])
    from train.trainer import train

    final = train(cfg)
    print(f"eve-train: stage {cfg.stage} done; model in {final}")


if __name__ == "__main__":
    main()
