"""How torch uses the CPU: threads that give way on a shared machine, and, when asked, numerics that are the
same on every x86-64 machine.

Both are environment settings that OpenMP, oneDNN, MKL and ATen read once, when torch loads, so
:func:`prepare_environment` runs from ``fedmef_core/__init__`` — before any module of this package imports
torch — and a value the user exported wins:

- ``GOMP_SPINCOUNT=10000``: torch's OpenMP threads spin 100-200 us at a barrier before they sleep
  (libgomp's default is 300,000 spins, several ms). A parallel region whose other thread a neighbour's process
  has descheduled then stops burning the core that thread needs, and SAP's and the small CNN's thousands of
  short regions a round no longer multiply it: beside one busy core a round of the reduced default experiment
  took 8x its idle time with the default, 2.1x with this (fair: 2x), beside two 3.7x -> 2.3x; idle it costs
  3% [-1%, +7%], paired over 8 repeats (``bench/shared_machine.py``; ``OMP_WAIT_POLICY=PASSIVE``, no
  spinning, was best loaded but 20% slower idle).
- Portable numerics (``FEDMEF_NUMERICS=portable``; the DVC pipeline's stages run with it): ATen's vector
  kernels, oneDNN's convolutions and MKL's matrix products all use their AVX2 code
  (``ATEN_CPU_CAPABILITY=avx2``, ``ONEDNN_MAX_CPU_ISA=AVX2``, ``MKL_CBWR=AVX2``), so an AVX-512 machine
  computes what an AVX2 machine does: each of the three otherwise changes the last bits of a round's weights.
  Only on x86-64 CPUs with AVX2 (elsewhere nothing is set). It costs speed where the CPU has more (on an
  AVX-512 CPU: the small CNN's round about 6%, a ResNet18 step about 45%), so other runs keep each library's
  fastest kernels (``native``, the default) unless asked.

The number of threads also decides the last bits (ATen splits its reductions by it), so a training sets it
from its configuration (``runtime.threads``) with :func:`use_threads`.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import MutableMapping

NUMERICS_SWITCH = "FEDMEF_NUMERICS"
SHARED_MACHINE = {"GOMP_SPINCOUNT": "10000"}
WAIT_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # a user who set either chose the wait policy
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
    wanted = {} if any(k in env for k in WAIT_SETTINGS) else dict(SHARED_MACHINE)
    numerics = env.get(NUMERICS_SWITCH, "native")
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
        print(f"warning: {exc}; using 'native'", file=sys.stderr)
        os.environ[NUMERICS_SWITCH] = "native"
        os.environ.update(environment_defaults())
    return True


def worker_environment() -> dict[str, str]:
    """What a process started for this one (a Ray worker) needs to compute alike: the settings in force here."""
    keys = [*WAIT_SETTINGS, *PORTABLE_NUMERICS, NUMERICS_SWITCH]
    return {k: os.environ[k] for k in keys if k in os.environ}


def use_threads(threads: int) -> None:
    """Train with `threads` torch CPU threads (they decide the last bits of the results, not only the speed)."""
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
