"""Lowerings for vision ops: inference batch norm, nearest upsampling, max pooling. Each is
compared with eager over its parameters; unsupported parameters fall back with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import meshweave
from meshweave import CompileOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("kernel_cache")  # conftest.py (also TRITON_INTERPRET)


def compile_and_check(model, x, test: str, atol=1e-5, fallback_ops=()):
    cm = meshweave.compile(model, (x,), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(x), model(x), atol=atol, rtol=atol, equal_nan=True,
                               msg=lambda m: f"{m}\nrepro: pytest {__file__} -k '{test}'")
    ops = {f["op"] for f in cm.artifacts["kernels"].fallbacks}
    assert ops == set(fallback_ops), (test, cm.artifacts["kernels"].fallbacks)
    return cm


class BNReLU(torch.nn.Module):
    def __init__(self, affine: bool):
        super().__init__()
        self.bn = torch.nn.BatchNorm2d(6, affine=affine, eps=1e-3)

    def forward(self, x):
        return torch.relu(self.bn(x) + 0.5)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_batch_norm_inference_fuses_with_its_consumers(affine, dtype):
    torch.manual_seed(0)
    m = BNReLU(affine).eval()
    with torch.no_grad():  # non-trivial statistics and affine parameters
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        if affine:
            m.bn.weight.normal_()
            m.bn.bias.normal_()
    m = m.to(DEVICE, dtype)
    x = torch.randn(2, 6, 5, 7, device=DEVICE, dtype=dtype)
    cm = compile_and_check(m, x, f"batch_norm {affine} {dtype}",
                           atol=1e-5 if dtype == torch.float32 else 2e-3)
    assert len(cm.kernels) == 1  # batch norm, add and relu in one pointwise kernel


class Up(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return F.interpolate(x, mode="nearest", **self.kw) * 2.0


@pytest.mark.parametrize("kw", [{"scale_factor": 2.0}, {"scale_factor": (3.0, 2.0)},
                                {"size": (8, 15)}])
def test_nearest_upsampling_integer_factors(kw):
    x = torch.randn(2, 3, 4, 5, device=DEVICE)
    compile_and_check(Up(**kw).eval(), x, f"upsample {kw}")


def test_nearest_upsampling_fractional_factor_falls_back():
    x = torch.randn(1, 2, 4, 4, device=DEVICE)
    compile_and_check(Up(size=(6, 6)).eval(), x, "upsample 4->6",
                      fallback_ops=["aten.upsample_nearest2d.vec"])


class Pool(torch.nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.kw = kw

    def forward(self, x):
        return F.max_pool2d(x - 1.0, **self.kw)


@pytest.mark.parametrize("kw", [
    {"kernel_size": 2},
    {"kernel_size": 3, "stride": 2, "padding": 1},
    {"kernel_size": (3, 2), "stride": (1, 2), "padding": (1, 0)},
])
def test_max_pool(kw):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 8, device=DEVICE)
    x[0, 0, 0, 0] = float("nan")  # propagates to every window that holds it, as in eager
    compile_and_check(Pool(**kw).eval(), x, f"max_pool {kw}")


def test_max_pool_with_dilation_falls_back():
    x = torch.randn(1, 2, 8, 8, device=DEVICE)
    compile_and_check(Pool(kernel_size=2, dilation=2).eval(), x, "max_pool dilation",
                      fallback_ops=["aten.max_pool2d_with_indices.default"])


class Gather(torch.nn.Module):
    def __init__(self, which: str):
        super().__init__()
        self.which = which
        self.w = torch.nn.Parameter(torch.randn(5, 6, 4))

    def forward(self, x, idx):
        if self.which == "rows":  # MoE: every token's expert weights
            return self.w[idx] * 2.0
        if self.which == "middle":  # x[:, idx] with a 2-d index
            return x[:, idx] + 1.0
        return x[idx, idx.flip(0)]  # two index tensors, broadcast together


@pytest.mark.parametrize("which", ["rows", "middle", "pair"])
def test_advanced_indexing_gathers(which):
    torch.manual_seed(0)
    model = Gather(which).to(DEVICE).eval()
    x = torch.randn(5, 5, 3, device=DEVICE)
    idx = torch.tensor([4, 0, -1, 2], device=DEVICE)  # -1 wraps, as in eager
    if which == "middle":
        idx = idx.view(2, 2)
    cm = meshweave.compile(model, (x, idx), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(x, idx), model(x, idx),
                               msg=lambda m: f"{m}\nrepro: pytest {__file__} -k {which}")
    assert not cm.artifacts["kernels"].fallbacks, cm.artifacts["kernels"].fallbacks


def test_non_adjacent_index_tensors_fall_back_with_reason():
    class Apart(torch.nn.Module):
        def forward(self, x, idx):
            return x[idx, :, idx] * 2.0  # the index dims move first: not lowered

    x, idx = torch.randn(3, 4, 5, device=DEVICE), torch.tensor([1, 2], device=DEVICE)
    cm = meshweave.compile(Apart(), (x, idx), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(x, idx), Apart()(x, idx))
    [fb] = cm.artifacts["kernels"].fallbacks
    assert fb["op"] == "aten.index.Tensor" and "non-adjacent" in fb["reason"], fb
