"""Evaluation measures the model without training it: no autograd graph, the same numbers either way."""

import torch

from fedmef_core.evaluation import evaluate
from fedmef_core.initial import initial_model
from tests.conftest import tiny_with
from tests.core.conftest import SMALL_DATA


def test_evaluation_builds_no_graph_and_changes_nothing(data):
    """A forward pass under autograd keeps every activation for a backward that never comes (and SAP layers
    would see a training step): evaluation must run with gradients off, and leave the weights as they were."""
    _, test, _ = data
    model, _, _ = initial_model(tiny_with(data=SMALL_DATA), test.shape)
    seen = []
    model.register_forward_hook(lambda module, inputs, output: seen.append(output.requires_grad))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = evaluate(model, test, torch.device("cpu"), batch_size=64)
    assert seen and not any(seen)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.enable_grad():
        again = evaluate(model, test, torch.device("cpu"), batch_size=64)
    assert again == result and 0.0 <= result.accuracy <= 1.0


def test_evaluating_in_cpu_chunks_gives_the_numbers_of_whole_batches(data, monkeypatch):
    """The CPU forward pass takes CPU_CHUNK images at a time: the same predictions and, up to float rounding
    (oneDNN's AVX2 kernels order some sums by the batch), the same loss as whole batches; and a chunk size
    repeats its numbers exactly (a chunk of 7 makes uneven chunks; 10**9 is one chunk per batch)."""
    from fedmef_core import evaluation

    _, test, _ = data
    for method in ("fedmef", "fedavg"):  # NSConv and batch norm
        model, _, _ = initial_model(tiny_with(data=SMALL_DATA, pruning={"method": method}), test.shape)
        results = {}
        for chunk in (7, evaluation.CPU_CHUNK, 10**9):
            monkeypatch.setattr(evaluation, "CPU_CHUNK", chunk)
            results[chunk] = evaluate(model, test, torch.device("cpu"), batch_size=300)
            assert evaluate(model, test, torch.device("cpu"), batch_size=300) == results[chunk]
        whole = results[10**9]
        for got in results.values():
            assert got.confusion == whole.confusion and got.accuracy == whole.accuracy
            assert abs(got.loss - whole.loss) <= 1e-6 * abs(whole.loss)
