import torch
from torch import nn

from fedmef_core.config import ModelConfig, SapConfig
from fedmef_core.memory import measure_step, weight_bytes
from fedmef_core.models import build_model
from fedmef_core.sap import apply_sap


def _sum_loss(out, y):
    return out.sum()  # saves nothing for backward


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def test_activation_bytes_match_hand_count():
    model = _tiny()
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    report = measure_step(model, x, y, loss_fn=_sum_loss)
    # Hand count (fp32, batch 5):
    #   layer "0" Linear(4->3) saves its input x:        5 * 4 * 4 B = 80 B (its weight is a parameter: excluded)
    #   layer "1" ReLU saves its output:                 5 * 3 * 4 B = 60 B
    #   layer "2" Linear(3->2) saves its input = the ReLU output: same storage, counted once -> 0 B
    #   the sum loss saves nothing.
    assert report.activation_by_layer == {"0": 80, "1": 60}
    assert report.activation_bytes == 140
    params = (4 * 3 + 3 + 3 * 2 + 2) * 4  # 23 floats
    assert report.weights_bytes == params == report.weights_dense_bytes
    assert report.gradient_bytes == params  # one dense grad per parameter
    assert report.optimizer_bytes == 0
    assert measure_step(model, x, y, loss_fn=_sum_loss, momentum=0.9).optimizer_bytes == params
    assert report.peak_bytes is None  # CPU
    assert report.footprint_bytes == params + 140
    assert report.total_bytes == 2 * params + 140
    d = report.to_dict()
    assert d["footprint_bytes"] == report.footprint_bytes and d["activation_by_layer"]["1"] == 60
    assert all(p.grad is None for p in model.parameters())  # the model itself is untouched


def test_sap_activation_bytes_match_hand_count():
    x, y = torch.randn(5, 4), torch.zeros(5, dtype=torch.long)
    # one SAP Linear, gamma 0.5 on 20 input entries -> 10 kept
    #   index:  10 fp16 values (20 B) + 10 int32 positions (40 B) = 60 B
    #   bitmap: 10 fp16 values (20 B) + ceil(20 / 8) = 3 B           = 23 B
    for positions, expected in [("index", 60), ("bitmap", 23)]:
        torch.manual_seed(0)
        model = apply_sap(nn.Sequential(nn.Linear(4, 3)), SapConfig(gamma=0.5, positions=positions))
        assert measure_step(model, x, y, loss_fn=_sum_loss).activation_bytes == expected
    # with a bit-mask ReLU after it: + ceil(15 / 8) = 2 B instead of 60 B for the ReLU output
    model = apply_sap(_tiny(), SapConfig(gamma=0.5, positions="bitmap", relu_bitmask=True))
    report = measure_step(model, x, y, loss_fn=_sum_loss)
    assert report.activation_by_layer["0"] == 23 and report.activation_by_layer["1"] == 2
    relu_out = torch.relu(model[0](x))
    kept = min(8, int((relu_out != 0).sum()))  # ceil(0.5 * 15) = 8 largest, zeros never stored
    assert report.activation_by_layer["2"] == 2 * kept + 2


def test_sparse_weight_bytes():
    model = _tiny()
    # prunable: 4*3 + 3*2 = 18 weights; dense rest: 3 + 2 biases
    masks = {"0.weight": torch.tensor([1.0] * 6 + [0.0] * 6).view(3, 4)}
    # layer 0: 6 values * 4 B + 6 int32 indices * 4 B = 48; layer 2 dense 24 B; biases 20 B
    assert weight_bytes(model, masks) == 48 + 24 + 20
    # density 0.5 everywhere: layer 0 -> 6 kept (48 B), layer 2 -> 3 kept (24 B)
    assert weight_bytes(model, density=0.5) == 48 + 24 + 20
    # bitmap positions: 6*4 + ceil(12/8)=2, 3*4 + 1
    assert weight_bytes(model, density=0.5, positions="bitmap") == 26 + 13 + 20


def test_batchnorm_model_saves_more_than_nsconv_sap():
    torch.manual_seed(0)
    x, y = torch.randn(4, 1, 28, 28), torch.arange(4)
    bn = measure_step(build_model(ModelConfig(arch="cnn"), 1, 10, 28), x, y)
    ns = build_model(ModelConfig(arch="cnn", norm="nsconv"), 1, 10, 28)
    apply_sap(ns, SapConfig(gamma=0.5, positions="bitmap", relu_bitmask=True))
    sap = measure_step(ns, x, y)
    # no BatchNorm inputs, pruned conv inputs, 1-bit ReLUs; max-pool still saves its input and int64 indices
    assert 0 < sap.activation_bytes < 0.65 * bn.activation_bytes
    assert "norm1" not in sap.activation_by_layer
    assert "conv1" in bn.activation_by_layer and "norm1" in bn.activation_by_layer
