"""Stage-wise freezing and parameter groups, applied to the model from outside (SPEC 2).

Stage 1 trains the patch embedding, projector and PAL with the decoder frozen; stages 2-3
train everything. The vision side (PEL + projector + PAL) and the decoder get their own
learning rates; a learning rate of 0 freezes that part (requires_grad False, no optimizer
state), so stage 1 leaves every decoder weight bit-identical. EVEv2's vision experts (the
decoder layers' `vision.*` copies) are a third group, so that its stage 2 can train them with
the language weights frozen. A stage may also change the resolution images are fed at
(`set_image_size`): EVEv2 trains at 800 px before 1600, EVE-7B-HD at 1344 in SFT.
"""

from __future__ import annotations

from torch import nn

from eve.modeling_eve import EveForCausalLM


def parameter_groups(model: EveForCausalLM, pal: nn.Module | None, lr_vision: float, lr_decoder: float, weight_decay: float,
                     adapters_only: bool = False, lr_experts: float | None = None) -> list[dict]:
    """With `adapters_only` (LoRA) PEFT has already frozen what stays frozen: the groups take only
    what it left trainable (the adapters; the vision front end's trained copy). `lr_experts`
    None trains the vision experts (if any) with the decoder."""
    vision = list(model.vision.parameters())
    named = list(model.language_model.named_parameters())
    experts = [p for n, p in named if ".vision." in n]
    decoder = [p for n, p in named if ".vision." not in n]
    if adapters_only:
        vision, decoder = [p for p in vision if p.requires_grad], [p for p in decoder if p.requires_grad]
        experts = [p for p in experts if p.requires_grad]
    vision += list(pal.parameters()) if pal is not None else []
    if lr_experts is None:
        decoder, experts = decoder + experts, []
    groups = []
    for name, params, lr in (("vision", vision, lr_vision), ("decoder", decoder, lr_decoder),
                             ("experts", experts, lr_experts or 0.0)):
        if not params:
            continue
        for p in params:
            p.requires_grad_(lr > 0)
        if lr > 0:
            groups.append({"name": name, "params": params, "lr": lr, "weight_decay": weight_decay})
    if not groups:
        raise ValueError("nothing to train: lr_vision, lr_decoder (and lr_experts) are all 0")
    return groups


def set_image_size(model: EveForCausalLM, processor, image_size: int) -> None:
    """Feed this stage's images at `image_size` (the model config's and its processor's): the
    weights do not depend on it (the patch embedding is convolutional and nothing is
    positional), and the export keeps the new size. An invalid size for the family's geometry
    is an error naming the rule, and leaves the model as it was."""
    config = model.config
    before = config.image_size
    config.image_size = image_size
    try:
        config._validate_geometry()
    except ValueError as e:
        config.image_size = before
        raise ValueError(f"image_size={image_size}: {e}") from None
    processor.image_processor.image_size = image_size
