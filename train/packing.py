"""Optional sequence packing (`TrainConfig.packing`): the samples of one micro-batch are packed
into as few rows of at most `max_length` tokens as first-fit decreasing finds.

Packing changes the layout of a micro-batch, never its content: the same samples (the same
`micro_batch_size` of them, in the sampler's order) go into it, so `samples_consumed` and exact
resume are untouched, and the LM and PAL losses are the same as unpacked (each is a mean over
the micro-batch's supervised tokens, resp. images).

Separation uses transformers' own packed-sequence handling, nothing patched:

- `position_ids` restart at 0 for every sample and `attention_mask` is left out (None). The
  masking utilities (`transformers.masking_utils.find_packed_sequence_indices`, called by
  `create_causal_mask` when the 2D mask is None, position ids are given and there is no cache)
  then build a block-diagonal causal mask for sdpa, eager and flex attention.
- flash-attention (`_flash_attention_forward` -> `_is_packed_sequence`) only detects packing for
  a batch of one row, so with a flash implementation the rows are flattened into a single row
  (`flatten=True`) and the varlen kernel runs on the per-sample sequences.

max_length is applied by the dataset after the visual tokens are spliced in (an image is never
cut), so every sample fits a row on its own, and the packer never splits a sample.
"""

from __future__ import annotations

import numpy as np
import torch

from eve.templates import IGNORE_INDEX
from train.data import Sample, add_images_and_meta


def pack(lengths: list[int], max_length: int) -> list[list[int]]:
    """Sample indices per row, first-fit decreasing (longest first, ties by index): every index
    exactly once, every row's total at most `max_length`, indices ascending within a row.
    Deterministic: the same lengths always give the same rows."""
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"sample {i} has {n} tokens, more than max_length={max_length}: it cannot be packed")
        if n <= 0:
            raise ValueError(f"sample {i} is empty")
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for r, room in enumerate(free):
            if lengths[i] <= room:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(max_length - lengths[i])
    return [sorted(row) for row in rows]


def wants_flat_batch(attn_implementation: str | None) -> bool:
    """Whether packed rows must be flattened into one row: flash-attention detects packed
    sequences from position_ids only for a batch of one row."""
    return bool(attn_implementation) and "flash" in attn_implementation


def collate_packed(samples: list[Sample], pad_token_id: int, max_length: int, flatten: bool = False) -> dict:
    """A packed micro-batch: `input_ids`, `labels`, `position_ids` (restarting at 0 per sample),
    no `attention_mask`, and the images of the samples in the order they appear in the rows
    (row by row), which is the order in which the model splices them and PAL gathers them.

    Rows are right-padded to the longest one; the padding forms its own segment (positions from
    0, labels -100), so no real token attends to it. The first token of each sample has label
    -100: run alone, it is never a target either (the loss shifts labels by one), and in a row
    it must not become the target of the previous sample's last token.
    """
    rows = pack([len(s.input_ids) for s in samples], max_length)
    if flatten:
        rows = [[i for row in rows for i in row]]
    longest = max(sum(len(samples[i].input_ids) for i in row) for row in rows)
    ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            s = samples[i]
            n = len(s.input_ids)
            ids[r, start : start + n] = torch.tensor(s.input_ids)
            labels[r, start : start + n] = torch.tensor(s.labels)
            labels[r, start] = IGNORE_INDEX
            positions[r, start : start + n] = torch.arange(n)
            start += n
        positions[r, start:] = torch.arange(longest - start)
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    ordered = [samples[i] for row in rows for i in row]
    lengths = np.array([len(s.input_ids) for s in samples], dtype=np.float64)
    add_images_and_meta(batch, ordered, samples)
    # attention cost per token: each token sees its own sample only
    batch["meta"]["attn_len"] = float((lengths**2).sum() / lengths.sum())
    batch["meta"]["rows"] = len(rows)
    return batch
