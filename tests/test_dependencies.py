"""The environment is the one the suite was passed with: every package `constraints.txt` pins (what `make setup`
installs with pip's `-c`) is installed at exactly that version. A UI behaviour the project relies on (MLflow's
pages, Prefect's form) is pinned by this file, not by a range in pyproject.toml."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RELIED_ON = ("torch", "torchvision", "prefect", "mlflow", "dvc", "ray", "pydantic", "fastapi")


def pinned() -> dict[str, str]:
    lines = (line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines())
    return dict(line.split("==", 1) for line in lines if line and not line.startswith("#"))


def test_every_pinned_package_is_installed_at_its_pinned_version():
    pins = pinned()
    assert {name.lower() for name in pins} >= set(RELIED_ON)
    wrong = {}
    for name, version in pins.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}; run make setup"

