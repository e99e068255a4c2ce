"""Example and random model inputs by input name (token ids, masks, token types, positions, images)."""

from __future__ import annotations

from collections.abc import Callable

import torch

Inputs = dict[str, torch.Tensor]


def text_inputs(names: list[str], vocab_size: int, batch: int, seq: int, seed: int) -> Inputs:
    """Random token ids; rows after the first are right-padded a little so masks matter."""
    g = torch.Generator().manual_seed(seed)
    out: Inputs = {}
    out["input_ids"] = torch.randint(0, vocab_size, (batch, seq), generator=g, dtype=torch.int64)
    if "attention_mask" in names:
        mask = torch.ones(batch, seq, dtype=torch.int64)
        for row in range(1, batch):
            pad = int(torch.randint(0, max(1, seq // 3), (1,), generator=g))
            if pad:
                mask[row, seq - pad :] = 0
        out["attention_mask"] = mask
    if "token_type_ids" in names:
        tt = torch.zeros(batch, seq, dtype=torch.int64)
        tt[:, seq // 2 :] = 1
        out["token_type_ids"] = tt
    if "position_ids" in names:  # as transformers derives them from the mask: cumsum(mask) - 1, 0 on padding
        mask = out.get("attention_mask", torch.ones(batch, seq, dtype=torch.int64))
        out["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return out


def image_inputs(batch: int, size: int, seed: int, channels: int = 3) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, channels, size, size, generator=g)}


def like_inputs(example: Inputs, batch: int, seed: int) -> Inputs:
    """Random inputs shaped like `example` with a new batch size (for `py:` models)."""
    g = torch.Generator().manual_seed(seed)
    out: Inputs = {}
    for name, t in example.items():
        shape = (batch, *t.shape[1:]) if t.dim() else ()
        if t.is_floating_point():
            out[name] = torch.randn(shape, generator=g, dtype=t.dtype)
        elif t.dtype == torch.bool:
            out[name] = torch.ones(shape, dtype=torch.bool)
        else:
            hi = max(int(t.max()) + 1, 2) if t.numel() else 2
            out[name] = torch.randint(0, hi, shape, generator=g, dtype=t.dtype)
    return out


InputMaker = Callable[[int, int, int], Inputs]  # (batch, seq, seed) -> inputs
