"""LoRA stage 3 and ZeRO-3 on CPU: what the adapters change, exact resume, merged and adapter
exports, partitioned construction and the streamed sharded export."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _cli, _env, _losses, config, data, straight_then_killed_and_rerun  # noqa: F401  (data: a fixture)

from eve.build import build_eve
from eve.modeling_eve import EveForCausalLM
from train.trainer import train

LORA = {"r": 4, "alpha": 8, "dropout": 0.1}


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_llama_dir):
    """A saved debug EVE: what stage 3 starts from."""
    path = tmp_path_factory.mktemp("base")
    model, processor = build_eve(str(tiny_llama_dir), "debug", seed=0)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _batch(base: Path):
    from transformers import AutoProcessor
    from PIL import Image

    processor = AutoProcessor.from_pretrained(base)
    return processor(text=["<image>\nWhat colour is it?"], images=[Image.new("RGB", (40, 24), (200, 20, 20))], return_tensors="pt")


def test_lora_trains_only_adapters_and_vision_and_exports_both_ways(tmp_path, data, base):
    from peft import PeftModel

    cfg = config(tmp_path / "adapter", data, 3, str(base), lora=LORA, max_steps=None, epochs=1)
    adapter_dir = train(cfg)
    saved = _weights(adapter_dir)
    assert saved and all("lora_" in k or ".vision." in k for k in saved), sorted(saved)[:5]
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    base_model = EveForCausalLM.from_pretrained(base).eval()
    before = {k: v.clone() for k, v in base_model.state_dict().items()}
    tuned = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    assert any(not torch.equal(p, before[k.replace("base_model.model.", "").replace("modules_to_save.default.", "")])
               for k, p in tuned.state_dict().items() if "modules_to_save.default" in k), "the vision front end did not train"
    for name, p in tuned.named_parameters():  # the base weights stayed as they were
        if "lora_" not in name and "modules_to_save" not in name and "original_module" not in name:
            assert torch.equal(p, before[name.replace("base_model.model.", "").replace(".base_layer", "")]), name

    from transformers import AutoModelForCausalLM

    auto = AutoModelForCausalLM.from_pretrained(adapter_dir).eval()  # transformers finds the base through adapter_config.json
    batch = _batch(base)
    with torch.no_grad():
        torch.testing.assert_close(auto(**batch).logits, tuned(**batch).logits)

    merged_cfg = config(tmp_path / "merged", data, 3, str(base), lora={**LORA, "merge": True}, epochs=1)
    merged_dir = train(merged_cfg)
    assert _losses(Path(merged_cfg.output_dir)) == _losses(Path(cfg.output_dir))  # same run, other export
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert type(merged) is EveForCausalLM and not any("lora" in k for k in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, tuned(**batch).logits, rtol=1e-4, atol=1e-4)



LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1"]


def _port() -> list[str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return ["--master_port", str(s.getsockname()[1])]


def test_zero3_construction_never_holds_the_whole_model(tmp_path, tiny_llama_dir):
    probe = Path(__file__).with_name("zero3_probe.py")
    run = subprocess.run([*LAUNCH, *_port(), str(probe), str(tiny_llama_dir), str(tmp_path)], env=_env(),
                         capture_output=True, text=True, cwd=Path(__file__).parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert results[0]["mismatched"] == results[1]["mismatched"] == [], "partitions do not hold the checkpoint's weights"
    assert results[0]["fresh_std"] == results[1]["fresh_std"] and 0 < results[0]["fresh_std"] < 1
    ranks = [r["params"] for r in results]
    assert ranks[0].keys() == ranks[1].keys() and any(k.startswith("vision.") for k in ranks[0])
    for name, info in ranks[0].items():
        assert info["materialised"] == 0, f"{name} is materialised on rank 0 after construction"
        assert info["local"] == -(-info["full"] // 2), f"{name}: rank 0 holds {info['local']} of {info['full']}"
    full = sum(i["full"] for i in ranks[0].values())
    assert all(sum(i["local"] for i in r.values()) <= full / 2 + 64 * len(r) for r in ranks)


def test_zero3_two_processes_export_equals_the_consolidated_checkpoint(tmp_path, data, base):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    cfg = config(tmp_path, data, 3, str(base), zero_stage=3, micro_batch_size=2, epochs=1, save_every=100)
    run = subprocess.run(_cli(cfg, tmp_path, [*LAUNCH, *_port()]), env=_env(), capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = Path(cfg.output_dir)
    exported = _weights(out / "final")
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag=ckpts[-1].name)
    consolidated = {k.removeprefix("model."): v for k, v in consolidated.items() if k.startswith("model.")}
    assert set(exported) == set(consolidated) - {"language_model.lm_head.weight"} or set(exported) == set(consolidated)
    for key, value in exported.items():
        assert torch.equal(value, consolidated[key]), key
    reloaded = EveForCausalLM.from_pretrained(out / "final")
    assert reloaded.num_parameters() > 0


def test_lora_kill_9_then_rerun_resumes_exactly(tmp_path, data, base):
    common = dict(lora=LORA, epochs=2, save_every=1)
    straight, killed = (config(tmp_path / name, data, 3, str(base), **common) for name in "ab")
    straight_then_killed_and_rerun(straight, killed, tmp_path, checkpoints=2)
    a, b = _weights(Path(straight.output_dir) / "final"), _weights(Path(killed.output_dir) / "final")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_settings_are_checked(tmp_path, data, base):
    with pytest.raises(ValueError, match="lr_decoder"):
        config(tmp_path, data, 3, str(base), lora=LORA, lr_decoder=0.0)
    with pytest.raises(ValueError, match="ZeRO-3"):
        config(tmp_path, data, 3, str(base), lora={**LORA, "quantize": "4bit"}, zero_stage=3)
    with pytest.raises(ValueError, match="quantize"):
        config(tmp_path, data, 3, str(base), lora={**LORA, "quantize": "2bit"})


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bitsandbytes QLoRA needs CUDA")
def test_qlora_4bit_trains_adapters_over_quantised_decoder(tmp_path, data, base):
    pytest.importorskip("bitsandbytes")
    cfg = config(tmp_path, data, 3, str(base), lora={**LORA, "quantize": "4bit", "merge": True}, epochs=1, precision="bf16")
    final = train(cfg)
    merged = EveForCausalLM.from_pretrained(final)
    assert not any("lora" in k for k in merged.state_dict())
    assert (final / "adapter" / "adapter_config.json").is_file()


def test_streamed_shards_are_what_save_pretrained_writes(tmp_path, built):
    from transformers import AutoModelForCausalLM

    from train.export import save_sharded

    model, _ = built
    model.save_pretrained(tmp_path / "reference")
    files = save_sharded(model, tmp_path / "one", is_main=True, zero3=False)
    assert [f.name for f in files] == ["model.safetensors"]
    reference, ours = load_file(tmp_path / "reference" / "model.safetensors"), load_file(files[0])
    assert reference.keys() == ours.keys() and all(torch.equal(reference[k], ours[k]) for k in reference)
    assert json.loads((tmp_path / "one" / "config.json").read_text()) == json.loads((tmp_path / "reference" / "config.json").read_text())

    shards = save_sharded(model, tmp_path / "many", is_main=True, zero3=False, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and set(index["weight_map"].values()) == {f.name for f in shards}
    assert all(f.stat().st_size < 50_000 + 4096 or len(load_file(f)) == 1 for f in shards)  # a bigger tensor alone
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "many")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
