"""Build a fresh EVE from a decoder checkpoint (the start of stage 1), as a function and a CLI.

    eve-build --decoder lmsys/vicuna-7b-v1.5 --flavor eve-7b --out checkpoints/eve-7b-init
    eve-build --decoder Qwen/Qwen2.5-7B-Instruct --flavor eve2-7b --out checkpoints/eve2-7b-init

The decoder (local directory or hub id) is loaded with transformers as it is; the patch
embedding layer (and v1's projector) is freshly initialised; the tokenizer gains an `<image>`
special token whose id becomes `config.image_token_id` (the decoder's vocabulary is unchanged).
An `eve2-*` flavor builds EVEv2, whose vision experts start as copies of the decoder's layers.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import eve  # noqa: F401  (registers the Auto classes)
from eve.configuration_eve import FLAVORS, EveConfig
from eve.configuration_eve2 import EVE2_FLAVORS, Eve2Config
from eve.modality_experts import add_modality_experts
from eve.modeling_eve import EveForCausalLM, default_attn_implementation
from eve.modeling_eve2 import Eve2ForCausalLM
from eve.processing_eve import EveImageProcessor, EveProcessor


def build_eve(
    decoder: str,
    flavor: str = "eve-7b",
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    seed: int = 0,
    **overrides,
) -> tuple[EveForCausalLM | Eve2ForCausalLM, EveProcessor]:
    """A new EVE around the decoder at `decoder` (path or hub id), with `flavor`'s vision front
    end (any EveConfig field can be overridden). Returns (model, processor)."""
    from transformers import AutoModelForCausalLM

    language_model = AutoModelForCausalLM.from_pretrained(
        decoder, dtype=dtype or "auto", attn_implementation=attn_implementation or default_attn_implementation()
    )
    # The loaded decoder's own config object (building an EveConfig around it would reset its
    # attention implementation).
    config, processor = eve_config_for_decoder(decoder, flavor, language_model.config, **overrides)
    model_class = Eve2ForCausalLM if isinstance(config, Eve2Config) else EveForCausalLM
    with torch.device("meta"):  # the decoder is already loaded: allocate nothing twice
        model = model_class(config)
    torch.manual_seed(seed)
    model.vision = model_class.vision_class(config).to(language_model.dtype)
    model.vision.apply(model._init_weights)
    if getattr(config, "modality_experts", False):
        add_modality_experts(language_model.model, language_model.config)  # copies of the loaded layers
    model.language_model = language_model
    model.set_input_embeddings(language_model.get_input_embeddings())  # takes the image token's id too
    model.generation_config = language_model.generation_config
    return model, processor


def eve_config_for_decoder(decoder: str, flavor: str, decoder_config, **overrides) -> tuple[EveConfig, EveProcessor]:
    """The EveConfig and processor of a new EVE around `decoder` (whose config is given): the
    tokenizer gains the `<image>` token, whose id becomes `config.image_token_id`."""
    from transformers import AutoTokenizer

    config = (Eve2Config if flavor in EVE2_FLAVORS else EveConfig).from_flavor(flavor, **overrides)
    config.text_config = decoder_config
    config.tie_word_embeddings = bool(decoder_config.tie_word_embeddings)  # the checkpoint ties as the decoder does
    processor = EveProcessor(EveImageProcessor.from_config(config), AutoTokenizer.from_pretrained(decoder))
    config.image_token_id = processor.image_token_id
    return config, processor


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="eve-build", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", required=True, help="decoder checkpoint: local directory or hub id (e.g. lmsys/vicuna-7b-v1.5)")
    parser.add_argument("--flavor", default="eve-7b", choices=sorted(FLAVORS | EVE2_FLAVORS),
                        help="model family, vision front end and PAL settings (eve2-*: EVEv2)")
    parser.add_argument("--out", required=True, type=Path, help="output directory (model + processor)")
    parser.add_argument("--dtype", default="auto", help="weights dtype: auto, bfloat16, float16, float32")
    parser.add_argument("--attn", choices=["sdpa", "flash_attention_2", "eager"], help="attention implementation (default: flash_attention_2 where available, else sdpa)")
    parser.add_argument("--image-size", type=int, help="override the flavor's image_size (e.g. 1344)")
    parser.add_argument("--teacher", help="open_clip teacher name or local dir recorded in the config (PAL)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new layers' initialisation")
    args = parser.parse_args(argv)
    overrides = {}
    if args.image_size:
        overrides["image_size"] = args.image_size
    if args.teacher:
        overrides["teacher_model"] = args.teacher
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    model, processor = build_eve(args.decoder, args.flavor, dtype=dtype, attn_implementation=args.attn, seed=args.seed, **overrides)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    parts = model.num_parameters_by_part()
    print(f"eve-build: wrote {args.out} ({' + '.join(f'{k} {v:,}' for k, v in parts.items())} parameters)")


if __name__ == "__main__":
    main()
