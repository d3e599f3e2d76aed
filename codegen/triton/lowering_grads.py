"""Lowerings of the backward's elementwise ops: the `*_backward` ATen ops AOTAutograd records
for activations (the training step's backward graph, frontend/joint.py), as fused pointwise
expressions in the same LOWERINGS table as the forward's (lowering.py registers them).

Each follows torch's derivative formula (torch/csrc/autograd/FunctionsManual.cpp and
ATen's activation kernels) term for term, in the output's compute type.
"""

from __future__ import annotations

_SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi), the tanh approximation's beta
_KAPPA = 0.044715
_INV_SQRT_2 = 0.7071067811865476
_INV_SQRT_2PI = 0.3989422804014327


def _gelu_backward(node, g, x, approximate="none", tanh=None):
    if approximate == "tanh":
        inner = f"({_SQRT_2_OVER_PI} * ({x} + {_KAPPA} * {x} * {x} * {x}))"
        t = tanh(inner)
        left = f"(0.5 * (1.0 + {t}))"
        right = (f"(0.5 * {x} * (1.0 - {t} * {t}) * {_SQRT_2_OVER_PI} * "
                 f"(1.0 + {3 * _KAPPA} * {x} * {x}))")
        return f"{g} * ({left} + {right})"
    cdf = f"(0.5 * (1.0 + tl.math.erf({x} * {_INV_SQRT_2})))"
    pdf = f"({_INV_SQRT_2PI} * tl.exp(-0.5 * {x} * {x}))"
    return f"{g} * ({cdf} + {x} * {pdf})"


def _gelu_backward_supported(node) -> str | None:
    approx = node.kwargs.get("approximate", node.args[2] if len(node.args) > 2 else "none")
    return None if approx in ("none", "tanh") else f"gelu_backward approximate={approx!r}"


def _silu_backward(node, g, x):
    s = f"tl.sigmoid({x})"
    return f"{g} * {s} * (1.0 + {x} * (1.0 - {s}))"


def _sigmoid_backward(node, g, y):
    return f"{g} * {y} * (1.0 - {y})"


def _tanh_backward(node, g, y):
    return f"{g} * (1.0 - {y} * {y})"


def _threshold_backward(node, g, x, threshold):
    return f"tl.where({x} <= {float(threshold)!r}, 0.0, {g})"


def register(pointwise, tanh) -> None:
    """Add the rules to LOWERINGS through lowering.py's `pointwise` decorator."""
    pointwise("aten.gelu_backward.default", supports=_gelu_backward_supported)(
        lambda node, g, x, approximate="none": _gelu_backward(node, g, x, approximate, tanh))
    pointwise("aten.silu_backward.default")(_silu_backward)
    pointwise("aten.sigmoid_backward.default")(_sigmoid_backward)
    pointwise("aten.tanh_backward.default")(_tanh_backward)
    pointwise("aten.threshold_backward.default")(_threshold_backward)
