"""Every method's results, bit for bit, against a recorded fixture (tests/fixtures/bitwise.json).

Six tiny trainings (one per method: 600 Fashion-MNIST images, 6 clients, 3 a round, 4 rounds, masks adjusted in
rounds 2 and 4; FedTiny with its BN selection, so the setup exchange runs too) and one FedMef run stopped after
round 2, restored from its checkpoint into a new ``Server`` and finished — which must equal the uninterrupted
one. The fixture holds each run's per-round metrics (all but ``round_seconds``) and, for every tensor of the
final weights and masks, the sha256 of its bytes beside its sum (a readable diff says *which* tensor moved).

The trainings run in a fresh process with ``FEDMEF_NUMERICS=portable`` and ``runtime.threads: 1``
(:mod:`fedmef_core.cpu`): the recorded bits are those of the Intel Xeon they were recorded on. Other CPUs may
compute others: on an AMD CPU oneMKL ignores ``MKL_CBWR=AVX2`` (its branches other than AUTO and COMPATIBLE are for
Intel processors only) and takes its AUTO branch, so the linear layers' SGEMMs sum in another order from round 1 on;
and oneDNN's convolutions (``brg_conv_fwd``/``brg_conv_bwd`` and ``jit:avx2``) size their blocks by the caches they
find. So where this code does not give the recorded bits, the test runs the code the fixture was recorded with (the
commit that last changed it, taken from git into a temporary folder) on this machine, and compares this code with
that: a change still fails the test when it moves any result by one bit on the machine it runs on.
On machines without AVX2 the test skips.

A change that should alter results (or a new torch) needs the fixture re-recorded, on purpose, and committed
together with the code that produced it (the commit is what other CPUs rebuild the reference from):

    python -m tests.core.test_bitwise_fixture --record

A refactoring must leave it passing unchanged.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "bitwise.json"
METHODS = ("fedavg", "fedavg_static", "prunefl", "feddst", "fedtiny", "fedmef")
RESUMED, STOP_AFTER = "fedmef", 2  # the run stopped after round STOP_AFTER and finished from its checkpoint
TIMING = ("round_seconds",)  # metrics that measure time, not results


def fixture_config(method: str):
    """The tiny experiment of `method`, spelt out here so no other test's settings move it."""
    from fedmef_core.config import parse_config

    pruning: dict[str, Any] = {"method": method, "density": 0.2, "adjust_interval": 2, "adjust_until": 4,
                               "adjust_alpha": 0.2}
    if method == "fedtiny":
        pruning.update(bn_select=True, bn_candidates=3)  # the setup exchange before round 1
    return parse_config({
        "seed": 3,
        "data": {"name": "fashion_mnist", "train_limit": 600, "test_limit": 200},
        "partition": {"scheme": "dirichlet", "alpha": 0.5, "min_samples": 20, "seed": 1},
        "federation": {"num_clients": 6, "clients_per_round": 3, "rounds": 4, "local_epochs": 1, "batch_size": 32,
                       "lr": 0.05, "lr_final": 0.02, "seed": 3},
        "pruning": pruning,
        "tracking": {"enabled": False},
        "runtime": {"device": "cpu", "threads": 1, "checkpoint_every": STOP_AFTER},
    })


# ---- in the fresh process ------------------------------------------------------------------------------------


def _tensors(tensors: dict) -> dict[str, dict[str, Any]]:
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        out[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                     "sha256": hashlib.sha256(t.numpy().tobytes()).hexdigest(), "sum": t.double().sum().item()}
    return out


def _summary(server, setup: dict[str, float]) -> dict[str, Any]:
    return {
        "setup": setup,
        "metrics": [{k: v for k, v in h.items() if k not in TIMING} for h in server.history],
        "weights": _tensors(server.model.state_dict()),
        "masks": _tensors(server.state.masks or {}),
    }


class _Stop(Exception):
    pass


def _stopping_after(rnd: int):
    def on_round(done: int, _metrics) -> None:
        if done == rnd:
            raise _Stop

    return on_round


def _setup_recorder(setup: dict[str, float]):
    def on_round(rnd: int, metrics) -> None:
        if rnd == 0:
            setup.update(metrics)

    return on_round


def run_all() -> dict[str, Any]:
    """Every method's run, and the resumed one (`<method>+resumed`), summarised."""
    from fedmef_core.checkpoint import load_checkpoint, round_checkpoint_path
    from fedmef_core.engine import run_rounds
    from tests.conftest import server_of  # after fedmef_core, which sets the numerics torch loads with

    runs = {}
    for method in METHODS:
        server, setup = server_of(fixture_config(method)), {}
        run_rounds(server, on_round=_setup_recorder(setup))
        runs[method] = _summary(server, setup)
    with tempfile.TemporaryDirectory() as ckpts:
        config = fixture_config(RESUMED)
        with contextlib.suppress(_Stop):
            run_rounds(server_of(config), checkpoint_dir=ckpts, on_round=_stopping_after(STOP_AFTER))
        server = server_of(config)
        server.restore(load_checkpoint(round_checkpoint_path(ckpts, STOP_AFTER)))
        run_rounds(server)
        runs[f"{RESUMED}+resumed"] = _summary(server, runs[RESUMED]["setup"])  # the setup ran before the stop
    return {**_torch_build(), "runs": runs}


def _torch_build() -> dict[str, str]:
    """torch's version and the vector kernels it runs (after fedmef_core has set the numerics it loads with)."""
    import torch

    return {"torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}


# ---- in the test process -------------------------------------------------------------------------------------


def run_in_fresh_process(tree: Path = ROOT, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`run_all()` of the code in `tree`, in a new process with portable numerics (they are fixed when torch loads)
    and `env` on top (a library setting, say)."""
    from fedmef_core import cpu

    base = {k: v for k, v in os.environ.items() if k not in (*cpu.PORTABLE_NUMERICS, cpu.NUMERICS_SWITCH)}
    child_env = {**base, "PYTHONPATH": str(tree), cpu.NUMERICS_SWITCH: "portable", **(env or {})}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "runs.json"
        proc = subprocess.run([sys.executable, "-m", "tests.core.test_bitwise_fixture", "--run", str(out)],
                              cwd=tree, env=child_env, capture_output=True, text=True)
        assert proc.returncode == 0, f"the trainings of {tree} failed:\n{proc.stderr[-4000:]}"
        return json.loads(out.read_text())


def differences(got: dict[str, Any], reference: dict[str, Any]) -> list[str]:
    """`<run>: <part>` for each part of each of the reference's runs that `got` does not reproduce bit for bit."""
    return [f"{method}: {part}" for method, ref in reference["runs"].items() if not method.endswith("+resumed")
            for part in ("setup", "metrics", "masks", "weights") if got["runs"][method][part] != ref[part]]


def _git(*args: str) -> str:
    proc = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    if proc.returncode:
        raise AssertionError(f"this machine does not compute the recorded bits, and the code they were recorded "
                             f"with cannot be taken from git (git {' '.join(args)}: {proc.stderr.strip()}); run the "
                             "tests in a git clone with its history")
    return proc.stdout


def fixture_commit() -> str:
    """The commit that last changed the fixture: the code that recorded it."""
    rel = str(FIXTURE.relative_to(ROOT))
    if _git("status", "--porcelain", "--", rel).strip():
        raise AssertionError(f"{rel} has changes that are not committed, and this machine does not compute its "
                             "bits: commit the fixture with the code that recorded it, on the machine that did")
    return _git("log", "-1", "--format=%H", "--", rel).strip()


def regenerated_reference(commit: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    """The fixture's trainings as the code of `commit` computes them on this machine."""
    with tempfile.TemporaryDirectory() as tree:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", commit],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        return run_in_fresh_process(Path(tree), env)


def check_this_machine(env: dict[str, str] | None = None) -> str:
    """This code's bits against the reference for this machine; returns which reference that was.

    The reference is the recorded fixture where this code reproduces it. Where it does not, either this code moved
    the results or this CPU computes otherwise: the fixture's own code, run here, tells which."""
    want = json.loads(FIXTURE.read_text())
    got = run_in_fresh_process(ROOT, env)
    assert got["capability"] == want["capability"] == "AVX2"  # the portable numerics, whatever this CPU has
    assert got["torch"] == want["torch"], (
        f"recorded with torch {want['torch']}, this is {got['torch']}: re-record the fixture "
        "(python -m tests.core.test_bitwise_fixture --record) if the new torch is intended")
    assert set(got["runs"]) == {*want["runs"], f"{RESUMED}+resumed"}
    resumed = got["runs"][f"{RESUMED}+resumed"]
    for part in ("metrics", "masks", "weights"):
        assert resumed[part] == got["runs"][RESUMED][part], f"{RESUMED} resumed after round {STOP_AFTER}: {part}"
    moved = differences(got, want)
    if not moved:
        return "recorded"
    commit = fixture_commit()
    reference = regenerated_reference(commit, env)
    assert differences(reference, want), (
        f"this machine computes the recorded bits with the code that recorded them ({commit[:10]}), and this code "
        f"moves them: {', '.join(moved)}")
    moved = differences(got, reference)
    assert not moved, (f"on this CPU, the code that recorded the fixture ({commit[:10]}) and this code compute "
                       f"different bits: {', '.join(moved)}")
    return f"regenerated at {commit[:10]}"


def _portable() -> bool:
    from fedmef_core import cpu

    return cpu.has_avx2()


def test_every_method_gives_the_recorded_bits():
    if not _portable():
        pytest.skip("portable numerics need an x86-64 CPU with AVX2; elsewhere the bits differ")
    check_this_machine()
    want = json.loads(FIXTURE.read_text())["runs"]
    assert any(h.get("adjusted") for h in want["fedmef"]["metrics"])  # the adjust paths ran
    assert want["fedtiny"]["setup"]  # and the setup exchange


# oneMKL's SSE2 branch without approximations: every x86-64 CPU runs it, and its SGEMMs sum otherwise than the
# AVX2 branch the fixture was recorded with, so on any machine it stands for a CPU that computes other bits.
ANOTHER_CPU = {"MKL_CBWR": "COMPATIBLE"}


def test_a_cpu_that_computes_other_bits_is_compared_with_the_fixtures_own_code():
    if not _portable():
        pytest.skip("portable numerics need an x86-64 CPU with AVX2; elsewhere the bits differ")
    assert check_this_machine(ANOTHER_CPU).startswith("regenerated at ")


def record() -> None:
    if not _portable():
        sys.exit("the fixture holds portable numerics: record it on an x86-64 CPU with AVX2")
    got = run_in_fresh_process()
    got["runs"] = {k: v for k, v in got["runs"].items() if not k.endswith("+resumed")}
    FIXTURE.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    print(f"recorded {FIXTURE.relative_to(ROOT)} ({FIXTURE.stat().st_size} bytes)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--record", action="store_true", help="re-record the fixture (in a fresh process)")
    group.add_argument("--run", metavar="OUT", help="run everything here and write the summary to OUT")
    args = parser.parse_args()
    if args.record:
        record()
    else:
        Path(args.run).write_text(json.dumps(run_all()))
