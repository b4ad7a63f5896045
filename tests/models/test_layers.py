import math

import pytest
import torch
import torch.nn.functional as F

from polytrain.config.registries import MLPS, NORMS
from polytrain.models.layers import DropPath


def randomized(module):
    torch.manual_seed(0)
    for p in module.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return module


def test_rmsnorm_is_x_over_root_mean_square_times_gain():
    norm = randomized(NORMS.get("rmsnorm")(6, 1e-6))
    x = torch.randn(3, 6)
    want = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-6)


def test_layernorm_is_torch_layer_norm():
    norm = randomized(NORMS.get("layernorm")(6, 1e-6))
    x = torch.randn(3, 6)
    assert torch.allclose(norm(x), F.layer_norm(x, (6,), norm.weight, norm.bias, 1e-6))


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


ACTIVATIONS = {"gelu": lambda x: 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), "gelu_tanh": gelu_tanh,
               "relu": lambda x: x.clamp(min=0), "quick_gelu": lambda x: x / (1 + torch.exp(-1.702 * x))}


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_mlp_is_proj_act_fc(name):
    mlp = randomized(MLPS.get(name)(4, 8, True, 0.0))
    x = torch.randn(2, 3, 4)
    want = ACTIVATIONS[name](x @ mlp.fc.weight.T + mlp.fc.bias) @ mlp.proj.weight.T + mlp.proj.bias
    assert torch.allclose(mlp(x), want, atol=1e-5)


def test_swiglu_is_silu_gate_times_up():
    mlp = randomized(MLPS.get("swiglu")(4, 8, False, 0.0))
    x = torch.randn(2, 3, 4)
    gate_w, up_w = mlp.fc.weight[:8], mlp.fc.weight[8:]
    gate = x @ gate_w.T
    want = (gate * torch.sigmoid(gate) * (x @ up_w.T)) @ mlp.proj.weight.T
    assert torch.allclose(mlp(x), want, atol=1e-5)


def test_mlp_registry_lists_every_kind():
    assert MLPS.names() == ["gelu", "gelu_tanh", "quick_gelu", "relu", "swiglu"]
    assert NORMS.names() == ["layernorm", "rmsnorm"]


def test_drop_path_drops_whole_samples_and_keeps_the_mean():
    torch.manual_seed(0)
    drop = DropPath(0.25)
    x = torch.ones(4000, 3, 2)
    y = drop.train()(x)
    per_sample = y[:, 0, 0]
    assert ((per_sample == 0) | torch.isclose(per_sample, torch.tensor(1 / 0.75))).all()
    assert (y == per_sample[:, None, None]).all()  # one decision per sample
    assert per_sample.eq(0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert y.mean().item() == pytest.approx(1.0, abs=0.05)
    assert torch.equal(drop.eval()(x), x)
