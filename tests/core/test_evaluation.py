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
