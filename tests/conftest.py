"""Shared fixtures: a tiny but real experiment (:mod:`fedmef_core.tiny`: real Fashion-MNIST, a few clients, a few
rounds)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmef_core.config import ExperimentConfig, parse_config
from fedmef_core.data import ImageData, load_dataset, partition_indices
from fedmef_core.device import resolve_device
from fedmef_core.engine import Server, run_rounds
from fedmef_core.tiny import save_partition_of, tiny_raw  # the tiny experiment, shared with bench/

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def tiny_config(tmp_path):
    return parse_config(tiny_raw(tmp_path))


def tiny_with(**sections: dict) -> ExperimentConfig:
    """The tiny experiment with the keys of each section updated: ``tiny_with(federation={"rounds": 2})``."""
    raw = tiny_raw()
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return parse_config(raw)


def data_of(config: ExperimentConfig) -> tuple[ImageData, ImageData, list[np.ndarray]]:
    """(train, test, parts): `config`'s data (decoded once per process) split among its clients."""
    train, test = load_dataset(config.data)
    return train, test, partition_indices(train.labels.numpy(), config.federation.num_clients, config.partition)


def server_of(config: ExperimentConfig, data: tuple | None = None) -> Server:
    """A `Server` of `config` on the CPU, on `data` ((train, test, parts), e.g. a fixture's) or on `data_of(config)`."""
    train, test, parts = data if data is not None else data_of(config)
    return Server(config, train, test, parts, resolve_device("cpu"))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (starting one costs seconds)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def prepare_run(tmp_path: Path, **federation) -> tuple[Path, object]:
    """A tracked tiny config written to params.yaml, with its partition saved (the train flow's inputs)."""
    raw = tiny_raw(tmp_path)
    raw["federation"].update({"rounds": 5, **federation})
    raw["tracking"] = {"enabled": True, "mlflow_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "resume"}
    config = parse_config(raw)
    (tmp_path / "params.yaml").write_text(config.to_yaml())
    save_partition_of(config)
    return tmp_path / "params.yaml", config


def train_cli(params: Path, *overrides: str):
    """`python -m flows.train --params PARAMS [--set k=v ...]`, in this process (the CLI's exits included)."""
    import flows.cli
    from flows.train import train_flow
    from tasks import preflight

    argv = ["--params", str(params)] + [a for o in overrides for a in ("--set", o)]
    return flows.cli.main(train_flow, preflight.for_train, argv=argv)


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(megabytes)`: a real tmpfs of that size mounted under `tmp_path` (unmounted after). Needs root
    (or CAP_SYS_ADMIN); skipped where mounting is not allowed."""
    import subprocess

    mounted = []

    def mount(megabytes: int) -> Path:
        where = tmp_path / f"disk-{len(mounted)}"
        where.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(where)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def standalone_env(home: Path) -> dict[str, str]:
    """The environment of a `python -m flows.<name>` subprocess run as a user would: this checkout importable,
    Prefect's state in `home`, no Prefect server configured (so the flow starts its own temporary one)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    return env


def processes_with_home(home: Path, running: str | None = None) -> list[int]:
    """Live processes whose environment has PREFECT_HOME=home (a flow started with it, its temporary Prefect
    server, Ray workers it started), only those whose command line contains `running` if given."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"PREFECT_HOME={home}".encode() in env and state != "Z" and (running is None or running in command):
            found.append(int(entry.name))
    return found


def uninterrupted_metrics(config) -> list[tuple]:
    """(round, accuracy, loss) of the plain in-process loop: the reference every runner must match."""
    history = run_rounds(server_of(config))
    return [(h["round"], h["accuracy"], h["loss"]) for h in history]


# --- hand-edited partition files: each edit of clients.json and the message that must refuse it ------------

RERUN_PARTITION = re.escape("re-run the partition stage with this run's settings (`dvc repro partition`, "
                            "`python -m flows.partition` or, in the Prefect UI, the partition deployment)")


def _on_json(change):
    def edit(text: str) -> str:
        raw = json.loads(text)
        change(raw)
        return json.dumps(raw)

    return edit


PARTITION_EDITS = {
    "invalid JSON": (lambda text: text[: len(text) // 2], "is not valid JSON"),
    "string index": (_on_json(lambda r: r["clients"][0].__setitem__(0, "7")), "client 0 holds '7', not an integer"),
    "float index": (_on_json(lambda r: r["clients"][0].__setitem__(0, 7.0)), "client 0 holds 7.0, not an integer"),
    "empty client": (_on_json(lambda r: r["clients"].__setitem__(3, [])), "client 3 holds no samples"),
    "negative index": (
        _on_json(lambda r: r["clients"][2].__setitem__(0, -1)), r"client 2 holds sample -1, outside the \d+ training"
    ),
    "out-of-range index": (
        _on_json(lambda r: r["clients"][1].append(10**6)), r"client 1 holds sample 1000000, outside the \d+ training"
    ),
    "overlapping clients": (
        _on_json(lambda r: r["clients"][4].append(r["clients"][1][0])), r"sample \d+ is held by clients 1 and 4"
    ),
    "a client removed": (
        _on_json(lambda r: (r["clients"].pop(), r.update(num_clients=len(r["clients"])))),
        r"holds (\d+) client lists, says num_clients=\1 and was made for \d+ clients",
    ),
    "no clients": (_on_json(lambda r: (r["clients"].clear(), r.update(num_clients=0))), "holds 0 client lists"),
    "no record (older version)": (
        _on_json(lambda r: r.pop("origin")), "does not record which data and settings it was made from"
    ),
}


def edit_partition(folder: Path, edit) -> None:
    path = Path(folder) / "clients.json"
    path.write_text(edit(path.read_text()))
