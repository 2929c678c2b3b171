"""Mini-batches straight from the in-memory uint8 tensors: no DataLoader, no worker processes.

All randomness (shuffling, augmentation) comes from the caller's `torch.Generator`, never the global RNG,
so clients training in parallel threads are each deterministic.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as F

from fedmef_core.data.datasets import ImageData

CROP_PADDING = 4


def iterate_batches(
    data: ImageData,
    indices: Sequence[int] | torch.Tensor | np.ndarray,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    shuffle: bool = False,
    augment: bool = False,
    drop_last: bool = False,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch over `indices`: (x float32 normalised with data.mean/std, y int64) on `device`.

    `shuffle` and `augment` need `generator` (a CPU generator); the draws happen in a fixed order
    (the permutation, then each batch's crop offsets and flips), so a seed fixes the whole epoch.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if (shuffle or augment) and generator is None:
        raise ValueError("shuffle/augment need a torch.Generator (the global RNG is never used)")
    if isinstance(indices, torch.Tensor):
        idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    else:
        idx = torch.as_tensor(np.asarray(indices), dtype=torch.int64).reshape(-1)
    if shuffle:
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
    device = torch.device(device)
    channels = data.images.shape[1]
    mean = torch.tensor(data.mean, dtype=torch.float32, device=device).view(1, channels, 1, 1)
    std = torch.tensor(data.std, dtype=torch.float32, device=device).view(1, channels, 1, 1)
    end = idx.numel() - idx.numel() % batch_size if drop_last else idx.numel()
    for start in range(0, end, batch_size):
        batch = idx[start : start + batch_size]
        x = data.images[batch].to(device, non_blocking=True)  # uint8 over the bus: 4x less than float
        if augment:
            x = random_crop_flip(x, generator)  # type: ignore[arg-type]
        x = x.float().div_(255).sub_(mean).div_(std)
        yield x, data.labels[batch].to(device, non_blocking=True)


def random_crop_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per sample: zero-pad by 4, crop back to H x W at a random offset, flip horizontally with p=0.5.

    Parameters come from `generator` (on the CPU); the crop and flip are one vectorised gather, equal
    to `F.horizontal_flip(F.crop(F.pad(img, [4]), top, left, H, W))` applied sample by sample.
    """
    n, c, h, w = images.shape
    offsets = torch.randint(0, 2 * CROP_PADDING + 1, (n, 2), generator=generator)
    flips = torch.rand(n, generator=generator) < 0.5
    padded = F.pad(images, [CROP_PADDING], fill=0)
    rows = offsets[:, :1] + torch.arange(h)  # n x h
    cols = offsets[:, 1:] + torch.arange(w)  # n x w
    cols = torch.where(flips[:, None], cols.flip(1), cols)
    rows, cols = rows.to(images.device), cols.to(images.device)
    sample = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return padded[sample, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]
