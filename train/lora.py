"""LoRA / QLoRA on the decoder through PEFT, applied to the model from outside like freezing.

PEFT wraps the model: the decoder's linears get adapters and every base weight is frozen. With
`train_vision` the vision front end trains fully and PEFT saves it with the adapter
(`modules_to_save`), so an adapter export is the whole trained delta:
`PeftModel.from_pretrained(EveForCausalLM.from_pretrained(base), adapter_dir)` is the trained model.
Training runs the wrapped EveForCausalLM itself (`peft_model.get_base_model()`), which holds the
adapters in place.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from train.config import LoraSettings
from train.export import checkpoint_entries, gathered, save_sharded


def lora_config(settings: LoraSettings, base: str):
    from peft import LoraConfig

    names = "|".join(re.escape(m) for m in settings.target_modules)
    return LoraConfig(
        r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        # The decoder's linears only: the vision front end has q/k/v-like linears of its own.
        target_modules=rf"language_model\..*\.({names})",
        modules_to_save=["vision"] if settings.train_vision else None,
        base_model_name_or_path=base,
    )


def apply_lora(model, settings: LoraSettings, base: str):
    """The PeftModel around `model` (changed in place: it now holds the adapters)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(settings, base))


def quantization_config(settings: LoraSettings, dtype: torch.dtype):
    """bitsandbytes settings of the decoder's base weights (QLoRA: NF4, double quantisation); the
    vision front end and the output layer stay unquantised."""
    from transformers import BitsAndBytesConfig

    skip = ["vision", "lm_head"]
    if settings.quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def export_adapter(peft_model, out: Path, is_main: bool, zero3: bool) -> None:
    """adapter_config.json + adapter_model.safetensors (adapters and the fully trained vision
    front end). Under ZeRO-3 the trainable weights (small) are gathered for the save."""
    trainable = [e for e in checkpoint_entries(peft_model) if e.tensor.requires_grad]
    with gathered(trainable, zero3):
        peft_model.save_pretrained(out, is_main_process=is_main, safe_serialization=True)


def export_merged(peft_model, out: Path, is_main: bool, zero3: bool) -> None:
    """The adapters merged into the decoder's weights and saved as a plain EVE checkpoint. Each
    adapted layer is merged by PEFT inside a gather of its own weights, then PEFT swaps the
    adapted layers (and the vision wrapper) for their plain, merged modules."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer):
            with gathered(checkpoint_entries(module), zero3, modifier_rank=0):
                module.merge()  # every rank computes it; rank 0's result is scattered
    merged = peft_model.unload()
    save_sharded(merged, out, is_main, zero3)


def merge_adapter(base: str, adapter: Path, out: Path) -> None:
    """Load the full-precision base EVE, apply the adapter at `adapter`, merge, save to `out`."""
    from peft import PeftModel

    from eve.modeling_eve import EveForCausalLM

    merged = PeftModel.from_pretrained(EveForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    save_sharded(merged, out, is_main=True, zero3=False)
