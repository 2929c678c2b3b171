"""The `fedmef` command: the console script `pip install -e .` installs (`flows.command:main`), run for real as
`python -m flows.command` (the same function) in a subprocess, from a folder that holds a params.yaml."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

from flows import command
from tests.conftest import standalone_env, tiny_raw

ROOT = Path(__file__).resolve().parents[2]


def fedmef(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`fedmef ARGS` as a user types it in `cwd` (a temporary Prefect home beside it, no server configured)."""
    home = cwd.parent / f"{cwd.name}-home"
    home.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-m", "flows.command", *args], cwd=cwd, env=standalone_env(home),
                          capture_output=True, text=True, timeout=300)


def test_pyproject_installs_this_function_as_fedmef():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, name = scripts["fedmef"].partition(":")
    assert (module, name) == (command.__name__, command.main.__name__)


def test_help_lists_every_flow_and_the_version_is_the_packages(tmp_path):
    shown = fedmef("--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for name in ("partition", "train", "evaluate", "pipeline", "sweep", "summary", "serve"):
        assert f"\n  {name} " in shown.stdout, shown.stdout
    assert list(command.COMMANDS) == ["partition", "train", "evaluate", "pipeline", "sweep", "summary", "serve",
                                     "plan", "deploy"]
    said = fedmef("--version", cwd=tmp_path)
    assert (said.returncode, said.stdout) == (0, f"fedmef {version('fedmef')}\n")


@pytest.mark.parametrize("name", list(command.COMMANDS))
def test_every_subcommand_has_its_flows_own_help(name, capsys):
    with pytest.raises(SystemExit) as ended:
        command.main([name, "--help"])
    out = capsys.readouterr().out
    assert ended.value.code == 0 and out.startswith(f"usage: fedmef {name} ")
    assert "--params" in out and "--set" in out


@pytest.mark.parametrize("argv", [[], ["trian"]], ids=["no command", "unknown command"])
def test_a_wrong_command_is_one_line_and_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as ended:
        command.main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "partition" in err and "serve" in err


def test_a_bad_set_is_one_line_and_exit_2_and_writes_nothing(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    proc = fedmef("train", "--set", "federation.rounds", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: --set 'federation.rounds': expected section.key=value")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


def test_partition_from_a_folder_holding_params_yaml(tmp_path):
    """`fedmef partition --set seed=2` in a fresh folder: the split lands in its data/partitions/, made with the
    one top-level seed."""
    raw = tiny_raw()  # relative folders: everything lands in the current folder
    raw["partition"].pop("seed")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = fedmef("partition", "--set", "seed=2", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert "partitioned fashion_mnist among 6 clients" in proc.stdout + proc.stderr  # Prefect logs on stderr
    origin = json.loads((tmp_path / "data" / "partitions" / "clients.json").read_text())["origin"]
    assert origin["partition.seed"] == 2 and origin["federation.num_clients"] == 6
