"""How torch uses the CPU: threads that give way on a shared machine, and numerics that are the same on
every x86-64 machine.

Both are environment settings that OpenMP, oneDNN, MKL and ATen read once, when torch loads, so
:func:`prepare_environment` runs from ``fedmef_core/__init__`` — before any module of this package imports
torch — and a value the user exported wins:

- ``OMP_WAIT_POLICY=PASSIVE``: torch's OpenMP threads sleep at a barrier instead of spinning. With the
  default (spinning), a parallel region whose other thread was descheduled by a neighbour's process waits a
  whole time slice, and SAP's and the small CNN's thousands of short regions a round multiply it (a round
  4-14x slower beside a busy core, where losing one of two cores should cost 2x; ``bench/shared_machine.py``).
- Portable numerics (``FEDMEF_NUMERICS=portable``, the default): ATen's vector kernels, oneDNN's
  convolutions and MKL's matrix products all use their AVX2 code (``ATEN_CPU_CAPABILITY=avx2``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_CBWR=AVX2``), so an AVX-512 machine computes what an AVX2 machine does:
  each of the three otherwise changes the last bits of a round's weights. Only on x86-64 CPUs with AVX2
  (elsewhere nothing is set); ``FEDMEF_NUMERICS=native`` lets every library pick its fastest kernels.

The number of threads also decides the last bits (ATen splits its reductions by it), so a training sets it
from its configuration (``runtime.threads``) with :func:`use_threads`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping

NUMERICS_SWITCH = "FEDMEF_NUMERICS"
SHARED_MACHINE = {"OMP_WAIT_POLICY": "PASSIVE"}
PORTABLE_NUMERICS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def has_avx2(cpuinfo: str | None = None) -> bool:
    """Whether this is an x86-64 CPU with AVX2 and FMA (what the portable numerics pin)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read(1 << 16)
        except OSError:
            return False
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return "avx2" in flags and "fma" in flags


def environment_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """The settings :func:`prepare_environment` would add (the user's own values are left alone)."""
    env = os.environ if environ is None else environ
    wanted = dict(SHARED_MACHINE)
    numerics = env.get(NUMERICS_SWITCH, "portable")
    if numerics not in ("portable", "native"):
        raise ValueError(f"{NUMERICS_SWITCH}={numerics!r}: expected 'portable' or 'native'")
    if numerics == "portable" and has_avx2():
        wanted.update(PORTABLE_NUMERICS)
    return {k: v for k, v in wanted.items() if k not in env}


def prepare_environment() -> bool:
    """Set the wait policy and the numerics for this process and its children, if torch has not loaded yet
    (returns whether it could)."""
    if "torch" in sys.modules:
        return False
    try:
        os.environ.update(environment_defaults())
    except ValueError as exc:  # a bad FEDMEF_NUMERICS: say so once, keep the libraries' own choice
        print(f"warning: {exc}; using 'portable'", file=sys.stderr)
        os.environ[NUMERICS_SWITCH] = "portable"
        os.environ.update(environment_defaults())
    return True


def worker_environment() -> dict[str, str]:
    """What a process started for this one (a Ray worker) needs to compute alike: the settings in force here."""
    keys = [*SHARED_MACHINE, *PORTABLE_NUMERICS, NUMERICS_SWITCH]
    return {k: os.environ[k] for k in keys if k in os.environ}


def use_threads(threads: int) -> None:
    """Train with `threads` torch CPU threads (they decide the last bits of the results, not only the speed)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
