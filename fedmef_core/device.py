"""Device selection."""

from __future__ import annotations

import torch

from fedmef_core.errors import UserError


class DeviceUnavailable(UserError, RuntimeError):
    """The configured device is not on this machine."""


def resolve_device(choice: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without a GPU raises :class:`DeviceUnavailable`."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "runtime.device is 'cuda' but no CUDA device is visible (check nvidia-smi and "
            "CUDA_VISIBLE_DEVICES); set runtime.device to 'auto' or 'cpu', e.g. --set runtime.device=cpu"
        )
    return torch.device(choice)


def seed_from(*parts: int) -> int:
    """A 63-bit seed derived from integers (run seed, round, client): order-independent of threads."""
    import numpy as np

    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str):
    """The mixed-precision context of `federation.precision` on `device` (fp32: autocast off)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling for float16 (its range is narrow); a no-op scaler for fp32 and bf16."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
