"""Communication cost of one message, in bytes.

A sparse tensor costs 4 bytes per value (fp32) plus its positions, encoded as the cheaper of int32
indices (4 bytes each) or a bitmap (1 bit per entry). Dense tensors cost their element size.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

VALUE_BYTES = 4
INDEX_BYTES = 4


def sparse_bytes(nnz: int, numel: int) -> int:
    return VALUE_BYTES * nnz + min(INDEX_BYTES * nnz, math.ceil(numel / 8))


def state_bytes(state: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor] | None = None) -> int:
    """A model state: masked entries sparse, the rest dense."""
    masks = masks or {}
    total = 0
    for k, v in state.items():
        if k in masks:
            total += sparse_bytes(int(masks[k].sum()), v.numel())
        else:
            total += v.numel() * v.element_size()
    return total


def topk_bytes(counts: Mapping[str, int]) -> int:
    """Top-k values with their int32 indices."""
    return sum((VALUE_BYTES + INDEX_BYTES) * int(k) for k in counts.values())


def mask_bytes(masks: Mapping[str, torch.Tensor]) -> int:
    """Masks as bitmaps."""
    return sum(math.ceil(m.numel() / 8) for m in masks.values())
