"""Stage 3, embed: L2-normalised open_clip image embeddings, one .npy per shard with its uids.

Default model EVA02-L-14; any open_clip name with a pretrained tag or checkpoint file, or a
local directory in open_clip's layout. Batched; fp16 on GPU, fp32 on CPU.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from data_curation.shards import read_jsonl, save_npy_atomic, shards, write_json_atomic
from data_curation.sources import read_bytes
from eve.image_io import load_image


def load_embedder(model: str, pretrained: str | None, device: torch.device):
    import open_clip

    name = f"local-dir:{model}" if Path(model).is_dir() else model
    kwargs = {} if Path(model).is_dir() else {"pretrained": pretrained}
    clip, _, preprocess = open_clip.create_model_and_transforms(name, weights_only=True, **kwargs)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return clip.to(device, dtype).eval(), preprocess, dtype


def embed_stage(out: Path, model: str, pretrained: str | None, sources: list[str] | None, batch_size: int = 64) -> None:
    """Embeds the kept items of `sources` (all when None) of every unfinished filter shard."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    clip = None
    dst = out / "embed"
    for shard in tqdm(shards(out / "filter"), desc="embed", unit="shard"):
        if (dst / f"{shard.stem}.json").exists():
            continue
        if clip is None:
            clip, preprocess, dtype = load_embedder(model, pretrained, device)
        items = [r for r in read_jsonl(shard) if r["status"] == "kept" and (sources is None or r["source"] in sources)]
        uids, vectors, failed = [], [], []
        for start in range(0, len(items), batch_size):
            batch, tensors = [], []
            for item in items[start : start + batch_size]:
                try:
                    tensors.append(preprocess(load_image(read_bytes(item["ref"]))))
                    batch.append(item["uid"])
                except Exception as e:  # noqa: BLE001 - recorded, never fatal
                    failed.append({"uid": item["uid"], "reason": "decode_error", "detail": f"{type(e).__name__}: {e}"[:200]})
            if not tensors:
                continue
            with torch.no_grad():
                feats = clip.encode_image(torch.stack(tensors).to(device, dtype)).float()
            vectors.append(torch.nn.functional.normalize(feats, dim=-1).cpu().numpy())
            uids += batch
        dim = vectors[0].shape[1] if vectors else 0
        save_npy_atomic(dst / f"{shard.stem}.npy", np.concatenate(vectors) if vectors else np.zeros((0, dim), np.float32))
        write_json_atomic(dst / f"{shard.stem}.json", {"uids": uids, "failed": failed, "model": model,
                                                    "pretrained": pretrained, "sources": sources})
