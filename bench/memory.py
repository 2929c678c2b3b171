"""Memory of one client training step, row by row, every saving attributed to its cause.

    .venv/bin/python -m bench.memory            # ResNet18 + MobileNetV2, batch 64, 3x32x32, d = 0.1

Each row changes ONE thing from the row it builds on (its "change" column names it), so the change in
footprint is the saving that one thing causes:

1. FedAvg: dense weights, BatchNorm.
2. FedDST: sparse weights, BatchNorm (the reference of "vs FedDST").
3. NSConv instead of BatchNorm, no SAP: what dropping BatchNorm alone saves.
4. + SAP as the authors store it: fp16 values, int32 positions, ReLU keeps its full output.
5. + bitmap positions.
6. + 1-bit ReLU masks: FedMef's default.
7. the default, and the authors' storage, at gamma = 0.7.
8. the default with BatchNorm (``model.norm: batch``).

Rows 1, 2 and 6 are the validated configs of ``fedavg``, ``feddst`` and ``fedmef`` (their resolved
``model.norm``, ``sap`` and ``pruning.density``), so the default row is what ``params.yaml`` runs; the
other rows vary one setting of these. Every number comes from :func:`fedmef_core.memory.measure_step`
(activations measured with saved_tensors_hooks). Sparse rows use a random mask at the density per
prunable layer, stored as fp32 values + int32 indices. Step time: median wall time of a full step
(forward, backward, SGD step) on this machine's device, relative to a dense FedAvg step timed
alternately with it (robust to load). Writes ``bench/results/memory.json`` (per model: ``default_row``
and ``rows`` in order) and ``bench/results/memory.png`` and prints the table (Markdown).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from fedmef_core.config import ExperimentConfig, ModelConfig, SapConfig
from fedmef_core.io import write_json
from fedmef_core.memory import measure_step
from fedmef_core.models import build_model, prunable_weights
from fedmef_core.plots import plot_memory_parts
from fedmef_core.sap import apply_sap, resolve_sap

OUT = Path(__file__).resolve().parent / "results"
MIB = 2**20
DENSE_ROW = "FedAvg (dense, BN)"
FEDDST = "FedDST (sparse, BN)"
NO_SAP_ROW = "sparse, NSConv, no SAP"
DEFAULT_ROW = "+ 1-bit ReLU = FedMef default"
AUTHORS_STORAGE = {"value_dtype": "float16", "positions": "index", "relu_bitmask": False}
HIGH_GAMMA = 0.7


@dataclass(frozen=True)
class Row:
    """One measured configuration and the row it changes one thing of."""

    name: str
    norm: str
    density: float | None  # None: dense weights
    sap: SapConfig | None  # None: SAP off
    builds_on: str | None = None

    @classmethod
    def of_method(cls, name: str, method: str, builds_on: str | None = None) -> Row:
        """What ``method`` runs with every other setting at its default."""
        config = ExperimentConfig.model_validate({"pruning": {"method": method}})
        density = config.pruning.density
        return cls(name, config.model.norm, density if density < 1 else None, resolve_sap(config), builds_on)

    def settings(self) -> dict:
        sap = None if self.sap is None else self.sap.model_dump(include={"gamma", *AUTHORS_STORAGE})
        return {"norm": self.norm, "density": self.density, "sap": sap}


def rows() -> list[Row]:
    """The rows in order; each builds on an earlier one."""
    fedavg = Row.of_method(DENSE_ROW, "fedavg")
    feddst = Row.of_method(FEDDST, "feddst", fedavg.name)
    default = Row.of_method(DEFAULT_ROW, "fedmef")
    sap = default.sap
    nsconv = replace(feddst, name=NO_SAP_ROW, norm=default.norm, builds_on=feddst.name)
    authors = replace(nsconv, name=f"+ SAP γ={sap.gamma}, fp16 + int32", builds_on=nsconv.name,
                      sap=sap.model_copy(update=AUTHORS_STORAGE))
    bitmap = replace(authors, name="+ bitmap positions", builds_on=authors.name,
                     sap=sap.model_copy(update={"relu_bitmask": False}))
    default = replace(default, builds_on=bitmap.name)
    return [
        fedavg, feddst, nsconv, authors, bitmap, default,
        replace(default, name=f"FedMef default, γ={HIGH_GAMMA}", builds_on=default.name,
                sap=sap.model_copy(update={"gamma": HIGH_GAMMA})),
        replace(authors, name=f"fp16 + int32, γ={HIGH_GAMMA}", builds_on=authors.name,
                sap=authors.sap.model_copy(update={"gamma": HIGH_GAMMA})),
        replace(default, name="FedMef default with BN", norm="batch", builds_on=default.name),
    ]


def _facets(row: Row) -> dict[str, str]:
    out = {"weights": "dense" if row.density is None else f"sparse (d = {row.density})",
           "norm": {"batch": "BatchNorm", "nsconv": "NSConv"}[row.norm],
           "SAP": "off" if row.sap is None else "on"}
    if row.sap is not None:  # its settings compare only between two rows that both run SAP
        out["γ"] = str(row.sap.gamma)
        out["values"] = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}[row.sap.value_dtype]
        out["positions"] = {"index": "int32", "bitmap": "bitmap"}[row.sap.positions]
        out["ReLU saves"] = "1-bit mask" if row.sap.relu_bitmask else "full output"
    return out


def change(row: Row, parent: Row) -> str:
    """The one thing ``row`` changes from ``parent``, in words; ValueError unless exactly one."""
    before, after = _facets(parent), _facets(row)
    diff = [k for k in after if k in before and before[k] != after[k]]
    if len(diff) != 1:
        raise ValueError(f"row {row.name!r} must change one thing from {parent.name!r}, changes {diff}")
    (key,) = diff
    if key == "SAP" and row.sap is not None:  # switched on: its settings come with it
        return "SAP on: " + ", ".join(f"{k} {v}" for k, v in after.items() if k not in before)
    return f"{key}: {before[key]} → {after[key]}"


def build(arch: str, norm: str, density: float | None, sap: SapConfig | None, device: torch.device):
    torch.manual_seed(0)
    model = build_model(ModelConfig(arch=arch, norm=norm), 3, 10, 32).to(device)
    masks = {}
    if density is not None:
        gen = torch.Generator().manual_seed(1)
        modules = {f"{n}.weight" if n else "weight": m for n, m in model.named_modules()}
        for name, w in prunable_weights(model).items():
            mask = (torch.rand(w.shape, generator=gen) < density).float().to(device)
            masks[name] = mask
            with torch.no_grad():
                w.mul_(mask)
            if hasattr(modules[name], "weight_mask"):
                modules[name].weight_mask = mask  # NSConv multiplies its standardized weight by it
    if sap is not None:
        apply_sap(model, sap)
    return model, masks


def _step(model, opt, x, y) -> float:
    if x.is_cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t


def step_times(models: list, x, y, reps: int) -> list[float]:
    """Median step seconds of each model, the models timed in turn (one warm-up step each), so that load
    changes on a shared machine hit all alike. The SGD step runs with lr 0: the same work, but the weights
    stay put, so repeated steps on one random batch cannot diverge (NaN activations would make SAP look
    cheap: it keeps no NaN)."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.0) for m in models]
    times: list[list[float]] = [[] for _ in models]
    for m in models:
        m.train()
    for i in range(reps + 1):
        for j, m in enumerate(models):
            t = _step(m, opts[j], x, y)
            if i:
                times[j].append(t)
    return [statistics.median(t) for t in times]


def measure(row: Row, arch: str, x, y, dense, reps: int, device: torch.device) -> tuple[dict, dict[str, int]]:
    """A row's footprint parts and step time (x dense), and its parts for the stacked bars."""
    model, masks = build(arch, row.norm, row.density, row.sap, device)
    report = measure_step(model, x, y, masks=masks or None)
    seconds, dense_time = step_times([model, dense], x, y, reps)
    print(f"  {arch:12s} {row.name:32s} done ({seconds:.2f}s/step)", flush=True)
    out = {
        "weights_bytes": report.weights_bytes,
        "activation_bytes": report.activation_bytes,
        "footprint_bytes": report.footprint_bytes,
        "total_bytes": report.total_bytes,
        "step_time_ratio": round(seconds / dense_time, 3),
    }
    if report.peak_bytes is not None:
        out["peak_bytes"] = report.peak_bytes
    return out, report.parts()


def attributed(rows_: list[Row], measured: dict[str, dict]) -> list[dict]:
    """Each row's measurement, in order, with its cause: the one change from the row it builds on, the
    footprint change that causes (``change_bytes``) and the footprint's reduction below FedDST in percent."""
    by_name = {row.name: row for row in rows_}
    feddst = measured[FEDDST]["footprint_bytes"]
    out = []
    for row in rows_:
        m = measured[row.name]
        parent = by_name.get(row.builds_on)
        out.append({
            "name": row.name,
            "settings": row.settings(),
            "builds_on": row.builds_on,
            "change": None if parent is None else change(row, parent),
            **m,
            "change_bytes": None if parent is None else m["footprint_bytes"] - measured[parent.name]["footprint_bytes"],
            "below_feddst_pct": round(100.0 * (1 - m["footprint_bytes"] / feddst), 1),
        })
    return out


def run(models: list[str], batch: int, reps: int, device: torch.device) -> tuple[dict, dict]:
    results: dict[str, dict] = {}
    panels: dict[str, dict[str, dict[str, int]]] = {}
    for arch in models:
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        dense, _ = build(arch, "batch", None, None, device)
        measured, panels[arch] = {}, {}
        for row in rows():
            measured[row.name], panels[arch][row.name] = measure(row, arch, x, y, dense, reps, device)
        results[arch] = {"default_row": DEFAULT_ROW, "rows": attributed(rows(), measured)}
    return results, panels


def _mib(n: int, sign: bool = False) -> str:
    return f"{n / MIB:{'+' if sign else ''}.2f} MiB".replace("-", "−")


def table(results: dict) -> str:
    """The results as a Markdown table; the default row in bold."""
    lines = ["| # | model | row | change (vs row #) | weights | activations | footprint | Δ footprint "
             "| below FedDST | step × dense |", "|---" * 10 + "|"]
    for arch, res in results.items():
        number = {r["name"]: i for i, r in enumerate(res["rows"], 1)}
        for r in res["rows"]:
            name = r["name"]
            cause = "—" if r["change"] is None else f"vs #{number[r['builds_on']]}: {r['change']}"
            delta = "—" if r["change_bytes"] is None else _mib(r["change_bytes"], sign=True)
            label = f"**{name}**" if name == res["default_row"] else name
            lines.append(
                f"| {number[name]} | {arch} | {label} | {cause} | {_mib(r['weights_bytes'])} "
                f"| {_mib(r['activation_bytes'])} | {_mib(r['footprint_bytes'])} | {delta} "
                f"| {r['below_feddst_pct']:.1f}% | {r['step_time_ratio']:.2f} |".replace("| -", "| −")
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per row (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device(args.device)
    results, panels = run(args.models, args.batch, args.reps, device)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "memory.json", results)
    plot_memory_parts(panels, args.out / "memory.png",
                      title=f"One client step, batch {args.batch}, density 0.1 ({device.type})")
    print(table(results))
    print(f"wrote {args.out / 'memory.json'} and {args.out / 'memory.png'}")


if __name__ == "__main__":
    main()
