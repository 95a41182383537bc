"""Run under torchrun by tests/test_lora_zero3.py: build a model partitioned over the ranks the way
eve-train's ZeRO-3 start-up does and report what each rank holds right after construction."""

import json
import sys

import torch

from train.distributed import init_distributed
from train.partitioned import build_partitioned

decoder, out = sys.argv[1], sys.argv[2]
dist = init_distributed()
ds = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}}
model, _ = build_partitioned(decoder, True, "debug", {}, None, 0, torch.float32, ds)
report = {
    name: {"full": p.ds_numel, "local": p.ds_tensor.numel(), "materialised": p.data.numel()}
    for name, p in model.named_parameters()
}
with open(f"{out}/rank{dist.rank}.json", "w") as f:
    json.dump(report, f)
torch.distributed.barrier()
