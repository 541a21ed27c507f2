"""The ISOPO gradient replaces autograd's weight-gradient GEMM instead of adding to it."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from models import MLPPolicy
from torch_isopo import ISOPO

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class WeightShapedMatmuls(TorchDispatchMode):
    """Counts matrix products whose result has the shape of one of the given weights."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in MATMULS and tuple(out.shape[-2:]) in self.shapes:
            self.count += 1
        return out


@pytest.mark.parametrize("mode", ["reinforce", "ntk", "fisher"])
def test_one_weight_gradient_gemm_per_linear_layer(mode):
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(), torch.nn.Linear(7, 5))
    opt = ISOPO(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode, route="gram")
    shapes = {(7, 6), (5, 7)}
    X = torch.randn(2, 9, 6)
    with opt.microbatch(torch.randn(2)):
        loss = model(X).square().sum()
        with WeightShapedMatmuls(shapes) as counter:
            loss.backward()
    assert counter.count == 2          # the final Σ c_i G_i of each layer, nothing else

    plain = WeightShapedMatmuls(shapes)
    loss = model(X).square().sum()
    with plain:
        loss.backward()
    assert plain.count == 2            # autograd's own: the same number
