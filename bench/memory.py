"""Memory footprint of one client training step: FedAvg, FedDST and FedMef (SAP + NSConv) variants.

    .venv/bin/python -m bench.memory            # ResNet18 + MobileNetV2, batch 64, 3x32x32, d = 0.1

Every number comes from :func:`fedmef_core.memory.measure_step` (activations measured with
saved_tensors_hooks). Sparse rows use a random mask at density 0.1 per prunable layer, stored as fp32
values + int32 indices. Step time: median wall time of a full step (forward, backward, SGD step) on
this machine's device, relative to a dense FedAvg step timed alternately with it (robust to load).
Writes ``bench/results/memory.json`` and ``bench/results/memory.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fedmef_core.config import ModelConfig, SapConfig
from fedmef_core.io import write_json
from fedmef_core.memory import measure_step
from fedmef_core.models import build_model, prunable_weights
from fedmef_core.plots import plot_memory_parts
from fedmef_core.sap import apply_sap

OUT = Path(__file__).resolve().parent / "results"
MIB = 2**20


def rows() -> dict[str, tuple[str, float | None, SapConfig | None]]:
    """row name -> (norm, density, SAP settings)."""
    out: dict[str, tuple[str, float | None, SapConfig | None]] = {
        "FedAvg (dense)": ("batch", None, None),
        "FedDST (BN, sparse W)": ("batch", 0.1, None),
    }
    for g in (0.5, 0.7):
        out[f"FedMef g={g} fp16+int32"] = ("nsconv", 0.1, SapConfig(gamma=g, value_dtype="float16"))
    for g in (0.5, 0.7):
        out[f"FedMef g={g} fp16+bitmap+1bit ReLU"] = (
            "nsconv", 0.1, SapConfig(gamma=g, value_dtype="float16", positions="bitmap", relu_bitmask=True)
        )
    return out


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


def paired_step_times(model, dense, x, y, reps: int) -> tuple[float, float]:
    """Median step seconds of ``model`` and of ``dense``, timed alternately (one warm-up step each), so
    that load changes on a shared machine hit both alike."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (model, dense)]
    model.train()
    dense.train()
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(reps + 1):
        for j, m in enumerate((model, dense)):
            t = _step(m, opts[j], x, y)
            if i:
                times[j].append(t)
    return statistics.median(times[0]), statistics.median(times[1])


def run(models: list[str], batch: int, reps: int, device: torch.device) -> dict:
    results: dict[str, dict] = {}
    panels: dict[str, dict[str, dict[str, int]]] = {}
    for arch in models:
        gen = torch.Generator().manual_seed(2)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        results[arch], panels[arch] = {}, {}
        dense, _ = build(arch, "batch", None, None, device)
        for name, (norm, density, sap) in rows().items():
            model, masks = build(arch, norm, density, sap, device)
            report = measure_step(model, x, y, masks=masks or None)
            seconds, dense_time = paired_step_times(model, dense, x, y, reps)
            results[arch][name] = {
                "weights_bytes": report.weights_bytes,
                "activation_bytes": report.activation_bytes,
                "footprint_bytes": report.footprint_bytes,
                "total_bytes": report.total_bytes,
                "step_time_ratio": round(seconds / dense_time, 3),
                "step_seconds": round(seconds, 4),
                "peak_bytes": report.peak_bytes,
            }
            panels[arch][name] = report.parts()
            print(f"  {arch:12s} {name:38s} done ({seconds:.2f}s/step)", flush=True)
    return {"results": results, "panels": panels}


def table(results: dict) -> str:
    head = (f"{'model':12s} {'row':38s} {'weights':>9s} {'activ.':>9s} {'footprint':>10s} {'total':>9s} "
            f"{'vs FedDST':>10s} {'step x':>7s}")
    lines = [head, "-" * len(head)]
    for arch, rows_ in results.items():
        dst = rows_["FedDST (BN, sparse W)"]["footprint_bytes"]
        for name, r in rows_.items():
            red = 100.0 * (1 - r["footprint_bytes"] / dst)
            lines.append(
                f"{arch:12s} {name:38s} {r['weights_bytes'] / MIB:8.2f}M {r['activation_bytes'] / MIB:8.2f}M "
                f"{r['footprint_bytes'] / MIB:9.2f}M {r['total_bytes'] / MIB:8.2f}M {red:9.1f}% "
                f"{r['step_time_ratio']:6.2f}x"
            )
    return "\n".join(lines) + "\n(MiB; 'vs FedDST' = footprint reduction, footprint = weights + activations)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenetv2"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3, help="timed steps per row (after one warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    device = torch.device(args.device)
    out = run(args.models, args.batch, args.reps, device)
    for rows_ in out["results"].values():
        for r in rows_.values():
            r.pop("step_seconds")
            if r["peak_bytes"] is None:
                r.pop("peak_bytes")
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "memory.json", out["results"])
    plot_memory_parts(out["panels"], args.out / "memory.png",
                      title=f"One client step, batch {args.batch}, density 0.1 ({device.type})")
    print(table(out["results"]))
    print(f"wrote {args.out / 'memory.json'} and {args.out / 'memory.png'}")


if __name__ == "__main__":
    main()
