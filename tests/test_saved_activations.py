"""The saved-for-backward rule table (passes/parallel/cost/saved_rules.py) against what autograd
really saves (issue 21). Not yet used by the planner's cost model: these tests pin its accuracy
before it is switched on."""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location(
        "activation_check", os.path.join(ROOT, "benchmarks", "activation_check.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_estimate_matches_the_traced_graph_and_eager_within_15_percent(name):
    c = _bench().check(name, name, 2, 16, {})
    assert c.estimated > 0
    assert abs(c.error("traced")) <= 0.02, c   # the same program: the rules are exact
    assert abs(c.error("measured")) <= 0.15, c  # eager: silu is one op there, two traced


def test_union_counts_a_value_saved_twice_once():
    import torch

    import meshweave
    from meshweave.passes.parallel.cost.cost_model import grad_free_values
    from meshweave.passes.parallel.cost.saved_rules import saved_activation_bytes

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8, bias=False)
            self.b = torch.nn.Linear(8, 8, bias=False)

        def forward(self, x):
            h = torch.tanh(x @ torch.eye(8))  # h is saved by tanh (result) and both linears
            return self.a(h) + self.b(h)

    g = meshweave.compile(Twice(), (torch.randn(4, 8),)).graph
    got = saved_activation_bytes(g, grad_free_values(g))
    assert got == 4 * 8 * 4, got  # one [4, 8] fp32 tensor
