"""How torch uses the CPU: the environment set before torch loads, and the threads a training uses."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmef_core import cpu
from fedmef_core.config import parse_config
from services.sweep import cell_threads
from tests.conftest import server_of, tiny_raw

ROOT = Path(__file__).resolve().parents[2]
AVX2_FLAGS = "flags\t\t: fpu sse sse2 avx avx2 fma avx512f\n"


def _settings_in_fresh_process(**env: str) -> dict:
    """What a new process that imports fedmef_core, then torch, runs with."""
    code = (
        "import json, os, fedmef_core, torch\n"
        "keys = ['OMP_WAIT_POLICY', 'GOMP_SPINCOUNT', 'ATEN_CPU_CAPABILITY', 'ONEDNN_MAX_CPU_ISA', 'MKL_CBWR']\n"
        "print(json.dumps({'env': {k: os.environ.get(k) for k in keys},"
        " 'capability': torch.backends.cpu.get_cpu_capability()}))"
    )
    base = {k: v for k, v in os.environ.items() if k not in (*cpu.WAIT_SETTINGS, *cpu.PORTABLE_NUMERICS,
                                                             cpu.NUMERICS_SWITCH)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_a_fresh_process_spins_briefly_at_barriers_and_keeps_native_numerics():
    got = _settings_in_fresh_process()
    assert got["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000", "ATEN_CPU_CAPABILITY": None,
                          "ONEDNN_MAX_CPU_ISA": None, "MKL_CBWR": None}


def test_portable_numerics_run_the_avx2_kernels_whatever_the_cpu_has():
    got = _settings_in_fresh_process(FEDMEF_NUMERICS="portable")
    if cpu.has_avx2():
        assert got["env"] == {"OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": "10000", "ATEN_CPU_CAPABILITY": "avx2",
                              "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
        assert got["capability"] == "AVX2"  # torch really runs its AVX2 kernels, whatever this CPU has
    else:  # nothing to pin: not an x86-64 CPU with AVX2
        assert got["env"]["ATEN_CPU_CAPABILITY"] is None and got["env"]["MKL_CBWR"] is None


def test_the_users_own_settings_win_and_native_numerics_pin_nothing():
    got = _settings_in_fresh_process(OMP_WAIT_POLICY="ACTIVE", FEDMEF_NUMERICS="native")
    assert got["env"] == {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None, "ATEN_CPU_CAPABILITY": None,
                          "ONEDNN_MAX_CPU_ISA": None, "MKL_CBWR": None}
    assert _settings_in_fresh_process(GOMP_SPINCOUNT="300000")["env"]["GOMP_SPINCOUNT"] == "300000"
    assert _settings_in_fresh_process(MKL_CBWR="COMPATIBLE", FEDMEF_NUMERICS="portable")["env"]["MKL_CBWR"] == (
        "COMPATIBLE")


def test_numerics_are_pinned_only_on_x86_with_avx2(monkeypatch):
    monkeypatch.setattr(cpu.platform, "machine", lambda: "x86_64")
    assert cpu.has_avx2(AVX2_FLAGS)
    assert not cpu.has_avx2("flags\t\t: fpu sse sse2 avx\n")
    monkeypatch.setattr(cpu.platform, "machine", lambda: "aarch64")
    assert not cpu.has_avx2(AVX2_FLAGS)
    assert cpu.environment_defaults({"FEDMEF_NUMERICS": "portable"}) == {"GOMP_SPINCOUNT": "10000"}  # not on ARM
    with pytest.raises(ValueError, match="FEDMEF_NUMERICS"):
        cpu.environment_defaults({"FEDMEF_NUMERICS": "fast"})


def test_a_training_uses_the_configured_threads():
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            raw = tiny_raw()
            raw["runtime"]["threads"] = threads
            server_of(parse_config(raw))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)


def test_a_sweeps_cells_share_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [cell_threads(2, jobs) for jobs in (1, 2, 4, 8, 16)] == [2, 2, 2, 1, 1]
    assert cell_threads(4, 3) == 2
