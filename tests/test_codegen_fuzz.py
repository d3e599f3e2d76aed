"""Random programs of pointwise ops, reductions, softmax, views, slices, concatenation, flips
and padding: the generated kernels must match eager exactly (fp32) and every kernel must build.
Each seed is one fixed program (the generator runs at trace time); a failure names its seed."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

import meshweave
from meshweave import CompileOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("kernel_cache")

UNARY = [torch.exp, torch.tanh, torch.relu, torch.sigmoid, torch.neg, torch.abs,
         lambda t: t * 0.5 + 1.0, lambda t: torch.where(t > 0, t, t * 0.1),
         lambda t: t.clamp(-1, 1)]
BINARY = [torch.add, torch.mul, torch.sub, torch.maximum, lambda a, b: a / (b.abs() + 1.0)]
VIEWS = [
    lambda a: a.transpose(-1, -2).contiguous().transpose(-1, -2) * 1.5,
    lambda a: torch.cat([a[..., a.shape[-1] // 2:], a[..., : a.shape[-1] // 2]], dim=-1),
    lambda a: a.flip(-1) - 0.5,
    lambda a: a.reshape(a.shape[0], -1).reshape(a.shape) * 2.0,
]


class RandomProgram(torch.nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def forward(self, x, y):
        r = random.Random(self.seed)
        vals = [x, y]
        for _ in range(r.randint(3, 9)):
            a, k = r.choice(vals), r.random()
            if k < 0.3:
                vals.append(r.choice(UNARY)(a))
            elif k < 0.55:
                b = r.choice(vals)
                if b.shape != a.shape:  # broadcast a reduced operand instead
                    b = b.mean(dim=-1, keepdim=True).mean(dim=-2, keepdim=True)
                vals.append(r.choice(BINARY)(a, b))
            elif k < 0.7:
                op = r.choice(["sum", "amax", "mean", "softmax"])
                vals.append(torch.softmax(a, dim=-1) if op == "softmax"
                            else getattr(a, op)(dim=-1, keepdim=True) + a)
            elif k < 0.85:
                vals.append(r.choice(VIEWS)(a))
            else:
                vals.append(F.pad(a, (1, 2))[..., 1:-2] + 1.0)
        last, prev = vals[-1], vals[-2]
        return last + prev * 0.5 if last.shape == prev.shape else last


@pytest.mark.parametrize("seed", range(12), ids=lambda s: f"seed{s}")
def test_random_program_matches_eager(seed):
    shape = random.Random(seed).choice([(3, 5, 7), (4, 16), (2, 3, 33), (5, 64)])
    torch.manual_seed(seed)
    x, y = torch.randn(shape, device=DEVICE), torch.randn(shape, device=DEVICE)
    model = RandomProgram(seed)
    cm = meshweave.compile(model, (x, y), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(x, y), model(x, y), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{m}\nrepro: pytest {__file__} -k 'seed{seed}'")
    assert not cm.artifacts["kernels"].fallbacks, cm.artifacts["kernels"].fallbacks
