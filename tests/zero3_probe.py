"""Run under torchrun by tests/test_lora_zero3.py: build a model partitioned over the ranks the way
eve-train's ZeRO-3 start-up does, report what each rank holds right after construction, and
check the partitions hold the decoder's weights."""

import json
import sys
from pathlib import Path

import deepspeed
import torch
from safetensors.torch import load_file

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
expected = load_file(Path(decoder) / "model.safetensors")
mismatched = []
for name, p in model.named_parameters():
    with deepspeed.zero.GatheredParameters([p]):
        key = name.removeprefix("language_model.")
        if key in expected and not torch.equal(p.data, expected[key]):
            mismatched.append(name)
with deepspeed.zero.GatheredParameters([model.vision.patch_embedding.weight]):
    fresh_std = float(model.vision.patch_embedding.weight.std())  # newly initialised, not left empty
with open(f"{out}/rank{dist.rank}.json", "w") as f:
    json.dump({"params": report, "mismatched": mismatched, "fresh_std": fresh_std}, f)
torch.distributed.barrier()
