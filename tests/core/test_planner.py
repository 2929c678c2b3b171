"""The planner predicts the accountant's numbers without running the step, and fits clients to budgets.

Every comparison measures a real step (tasks.memory.client_step_report: the initial global model on the
first training images, as a run reports it) and predicts it from a profile traced once per model.
"""

from __future__ import annotations

import time

import pytest
import torch

from fedmef_core.config import parse_config
from fedmef_core.data import load_dataset
from fedmef_core.initial import initial_model
from fedmef_core.planner import ClientStep, fit, predict, profile_config
from tasks.memory import client_step_report

TOLERANCE = 0.02
STORAGES = [  # (value dtype, positions, relu_bitmask)
    (dtype, positions, bitmask)
    for dtype in ("float32", "float16", "bfloat16") for positions in ("index", "bitmap") for bitmask in (True, False)
]
# ResNet18 and MobileNetV2 steps cost seconds on a CPU: every storage option (and both positions x ReLU pairs)
# once, each at a different γ (0.3 keeps only the non-zeros of ReLU'd inputs, 0.8 meets ReLU6's ties at 6).
COVERING = [("float16", "bitmap", True, 0.5), ("float32", "index", False, 0.3), ("bfloat16", "index", True, 0.8),
            ("float32", "bitmap", False, 0.5)]
BASELINES = ["fedavg_static", "prunefl", "fedtiny"]  # the same step as feddst (BatchNorm, sparse, no SAP)


def _cases():
    for batch in (2, 8):
        for method in ["fedavg", "feddst", *BASELINES, "fedmef"]:
            yield "cnn", method, {}, batch
        yield "cnn", "feddst", {"enabled": True}, batch  # a baseline with SAP: BatchNorm inputs saved whole
        for dtype, positions, bitmask in STORAGES:
            yield "cnn", "fedmef", {"value_dtype": dtype, "positions": positions, "relu_bitmask": bitmask}, batch
        for arch in ("resnet18", "mobilenetv2"):
            for method in ["fedavg", "feddst", *(BASELINES if batch == 2 else [])]:
                yield arch, method, {}, batch
            yield arch, "feddst", {"enabled": True}, batch
            for dtype, positions, bitmask, gamma in COVERING:
                sap = {"value_dtype": dtype, "positions": positions, "relu_bitmask": bitmask, "gamma": gamma}
                yield arch, "fedmef", sap, batch


def _config(arch: str, method: str, sap: dict | None = None, batch: int = 8, **federation):
    return parse_config({
        "data": {"cifar_shape": arch != "cnn"}, "model": {"arch": arch}, "pruning": {"method": method},
        "sap": sap or {}, "federation": {"batch_size": batch, **federation}, "tracking": {"enabled": False},
    })


_MODELS: dict = {}


def _initial(config):
    """The initial global model of a config's (arch, method, norm): built once for all its storages and batches."""
    key = (config.model, config.pruning.method)
    if key not in _MODELS:
        train, _ = load_dataset(config.data)
        _MODELS[key] = initial_model(config, train.shape)[0], train
    return _MODELS[key]


@pytest.mark.parametrize(("arch", "method", "sap", "batch"), list(_cases()),
                         ids=lambda v: "-".join(f"{x}" for x in v.values()) if isinstance(v, dict) else str(v))
def test_prediction_is_within_2_percent_of_the_accountant(arch, method, sap, batch):
    config = _config(arch, method, sap, batch)
    model, train = _initial(config)
    measured = client_step_report(config, model, train, torch.device("cpu"))
    predicted = predict(profile_config(config, train), ClientStep.of(config))
    assert predicted.weights_bytes == measured.weights_bytes
    assert predicted.gradient_bytes == measured.gradient_bytes
    assert predicted.optimizer_bytes == measured.optimizer_bytes == 0
    for part in ("activation_bytes", "footprint_bytes", "total_bytes"):
        got, want = getattr(predicted, part), getattr(measured, part)
        assert abs(got / want - 1) <= TOLERANCE, f"{part}: predicted {got}, measured {want}"
    if config.sap.enabled is False:  # no data-dependent count at all: exact
        assert predicted.activation_bytes == measured.activation_bytes


def test_momentum_adds_one_buffer_per_parameter():
    config = _config("cnn", "feddst", momentum=0.9)
    model, train = _initial(config)
    measured = client_step_report(config, model, train, torch.device("cpu"))
    predicted = predict(profile_config(config, train), ClientStep.of(config))
    assert predicted.optimizer_bytes == measured.optimizer_bytes == predicted.gradient_bytes > 0


def test_a_query_takes_milliseconds_and_the_profile_is_cached():
    config = _config("resnet18", "fedmef")
    train, _ = load_dataset(config.data)
    profile = profile_config(config, train)
    other = config.model_copy(update={"sap": config.sap.model_copy(update={"gamma": 0.7, "positions": "index"})})
    assert profile_config(other, train) is profile  # γ and storage are the query's
    step = ClientStep.of(config)
    start = time.perf_counter()
    for batch in range(1, 51):
        predict(profile, step.at(batch_size=batch))
    assert (time.perf_counter() - start) / 50 < 0.02
    assert predict(profile, step.at(batch_size=16)).activation_bytes > predict(profile, step).activation_bytes


def test_profiling_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    profile_config(_config("cnn", "fedtiny", seed=7))  # a config no other test profiles
    assert torch.equal(torch.rand(3), expected)


# ---- fitting a budget -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fedmef_cnn():
    config = _config("cnn", "fedmef", batch=32)
    return profile_config(config, load_dataset(config.data)[0]), ClientStep.of(config)


def _footprint_mib(profile, step) -> float:
    return predict(profile, step).footprint_bytes / 2**20


def test_exclude_trains_as_configured_or_not_at_all(fedmef_cnn):
    profile, step = fedmef_cnn
    need = _footprint_mib(profile, step)
    assert fit(profile, step, need, "exclude").fits
    tight = fit(profile, step, need * 0.99, "exclude")
    assert not tight.fits and tight.batch_size == 32 and tight.gamma == 0.5
    assert tight.parts_mib()["footprint"] == pytest.approx(need)


def test_fit_batch_takes_the_largest_batch_that_fits(fedmef_cnn):
    profile, step = fedmef_cnn
    budget = _footprint_mib(profile, step.at(batch_size=13)) + 0.01
    got = fit(profile, step, budget, "fit_batch")
    assert got.fits and got.batch_size == 13 and got.gamma == 0.5
    assert got.bound_mib <= budget < _footprint_mib(profile, step.at(batch_size=14))
    floor = fit(profile, step, 0.01, "fit_batch", min_batch=4)
    assert not floor.fits and floor.batch_size == 4  # what it would need at the floor
    assert floor.parts_mib()["footprint"] == pytest.approx(_footprint_mib(profile, step.at(batch_size=4)))


def test_fit_gamma_raises_gamma_first_then_lowers_the_batch(fedmef_cnn):
    profile, step = fedmef_cnn
    budget = _footprint_mib(profile, step.at(gamma=0.73))
    got = fit(profile, step, budget, "fit_gamma")
    assert got.fits and got.batch_size == 32 and got.gamma == pytest.approx(0.73)
    assert _footprint_mib(profile, step.at(gamma=0.72)) > budget
    lower = _footprint_mib(profile, step.at(batch_size=20, gamma=0.95))
    got = fit(profile, step, lower, "fit_gamma")
    assert got.fits and got.gamma == 0.95 and got.batch_size == 20
    nothing = fit(profile, step, 0.01, "fit_gamma", max_gamma=0.9)
    assert not nothing.fits and nothing.batch_size == 1 and nothing.gamma == 0.9


def test_fit_gamma_without_sap_fits_the_batch():
    config = _config("cnn", "feddst", batch=32)
    profile, step = profile_config(config), ClientStep.of(config)
    budget = _footprint_mib(profile, step.at(batch_size=9))
    got = fit(profile, step, budget, "fit_gamma")
    assert got.fits and got.batch_size == 9 and got.gamma is None


def test_total_bound_counts_gradients_and_optimizer(fedmef_cnn):
    profile, step = fedmef_cnn
    report = predict(profile, step)
    between = (report.footprint_bytes + report.gradient_bytes / 2) / 2**20
    assert fit(profile, step, between, "exclude").fits
    assert not fit(profile, step, between, "exclude", bound="total").fits
    assert fit(profile, step, report.total_bytes / 2**20, "exclude", bound="total").fits


def test_bad_policy_or_bound_is_refused(fedmef_cnn):
    profile, step = fedmef_cnn
    with pytest.raises(ValueError, match="policy"):
        fit(profile, step, 10, "shrink")
    with pytest.raises(ValueError, match="bound"):
        fit(profile, step, 10, bound="peak")
    with pytest.raises(ValueError, match="min_batch"):
        fit(profile, step, 10, min_batch=64)

