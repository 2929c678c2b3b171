"""Each concern has one home, read from the source itself (ast, nothing imported):

- only :mod:`services.tracking` talks to MLflow (outside ``bench/`` and ``tests/``);
- ``tasks/`` holds Prefect's side of the work — each module defines a task or uses Prefect (artifacts, run
  context, task runners) — apart from a few named modules of glue the flows call; services define no task.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_SCANNED = {"bench", "tests"}  # benchmarks and tests may import anything
TRACKING = ROOT / "services" / "tracking"

# tasks/ modules that import nothing of Prefect, and why they belong there all the same
GLUE_WITHOUT_PREFECT = {
    "checkpoints": "the train flow's start, resume and per-round saving",
    "masks": "the mask files and plots a training writes after its rounds",
    "outputs": "the train flow's per-round and final reports (files, MLflow through the tracker)",
    "preflight": "the checks every flow runs before it starts (one message, exit 2)",
}


def _modules(package: Path) -> list[Path]:
    return sorted(p for p in package.rglob("*.py") if "__pycache__" not in p.parts)


def _packages() -> list[Path]:
    return sorted(d for d in ROOT.iterdir() if (d / "__init__.py").is_file() and d.name not in NOT_SCANNED)


def _imported(path: Path) -> set[str]:
    """The top-level names of every module `path` imports, at any depth (lazy imports in functions too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _defines_task(path: Path) -> bool:
    """A function decorated with Prefect's ``@task`` or ``@task(...)``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for deco in node.decorator_list:
                target = deco.func if isinstance(deco, ast.Call) else deco
                if isinstance(target, ast.Name) and target.id == "task":
                    return True
    return False


def test_the_scan_sees_the_packages_and_the_imports():
    names = {p.name for p in _packages()}
    assert {"fedmef_core", "services", "tasks", "flows"} <= names and not names & NOT_SCANNED
    assert "mlflow" in _imported(TRACKING / "tracker.py")  # a lazy import inside a method counts
    assert _defines_task(ROOT / "tasks" / "clients.py")


def test_only_the_tracking_package_imports_mlflow():
    talking = [str(p.relative_to(ROOT)) for package in _packages() for p in _modules(package)
               if "mlflow" in _imported(p) and TRACKING not in p.parents]
    assert talking == [], f"MLflow is imported outside services/tracking/: {talking}; go through the tracker"


def test_every_tasks_module_is_prefects_side_or_named_glue():
    modules = {p.stem: p for p in _modules(ROOT / "tasks") if p.stem != "__init__"}
    without = sorted(name for name, p in modules.items()
                     if not _defines_task(p) and not {"prefect", "prefect_ray"} & _imported(p))
    assert without == sorted(name for name in GLUE_WITHOUT_PREFECT if name in modules), (
        f"tasks/ modules that neither define a Prefect task nor use Prefect: {without}; a service belongs in "
        "services/ (or name it in GLUE_WITHOUT_PREFECT with the reason it is flow glue; a module that now uses "
        "Prefect leaves that list)")


def test_services_define_no_prefect_task():
    assert [str(p.relative_to(ROOT)) for p in _modules(ROOT / "services") if _defines_task(p)] == []
