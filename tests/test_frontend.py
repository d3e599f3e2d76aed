"""Frontend and compile(): numerics vs eager, dynamic dims, pytree outputs, bad input."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from conftest import assert_same_outputs
from torch.export import Dim

import meshweave


class Block(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.ln = torch.nn.LayerNorm(d)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x, mask=None, *, temperature: float = 1.0):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln(x)).split(d, dim=-1)
        q, k, v = (t.view(b, s, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = x + a.transpose(1, 2).reshape(b, s, d) * self.scale / temperature
        return {"out": out, "stats": (out.mean(-1), out.amax(-1))}


def test_block_matches_eager_with_kwargs_and_nested_outputs():
    m = Block().eval()
    x = torch.randn(2, 5, 16)
    cm = meshweave.compile(m, (x,), {"temperature": 2.0})
    assert_same_outputs(m(x, temperature=2.0), cm(x, temperature=2.0),
                        repro="pytest tests/test_frontend.py -k nested_outputs")
    assert cm.graph.user_inputs[0].type.shape == (2, 5, 16)
    assert any(n.op == "aten.scaled_dot_product_attention.default" for n in cm.graph.nodes)


def test_every_node_keeps_the_user_source_line():
    cm = meshweave.compile(Block().eval(), (torch.randn(2, 5, 16),))
    compute = [n for n in cm.graph.nodes if not n.op.startswith(("sym.", "aten.sym_size"))]
    assert compute and all("test_frontend.py" in n.source for n in compute), [
        (n.op, n.source) for n in compute if "test_frontend.py" not in n.source]


def test_dynamic_batch_three_sizes():
    m = Block().eval()
    batch = Dim("batch", min=1, max=32)
    cm = meshweave.compile(m, (torch.randn(3, 5, 16),), dynamic_shapes=({0: batch},))
    sym = cm.graph.user_inputs[0].type.shape[0]
    assert not isinstance(sym, int), "batch dim should be a sympy symbol"
    assert cm.graph.symbols[sym][1:] == (1, 32)
    for b in (1, 4, 9):
        x = torch.randn(b, 5, 16)
        assert_same_outputs(m(x), cm(x), repro=f"dynamic batch {b}")
    with pytest.raises(ValueError, match=r"must be in \[1, 32\]"):
        cm(torch.randn(40, 5, 16))


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: list


class DataclassModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x):
        h = torch.relu(self.lin(x))
        return Out(h.softmax(-1), [h, h.sum()])


def test_dataclass_output_structure_is_kept():
    m = DataclassModel()
    x = torch.randn(3, 4)
    got = meshweave.compile(m, (x,))(x)
    assert isinstance(got, Out)
    assert_same_outputs(m(x), got)


class WithConstantsAndMutation(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("count", torch.zeros(1))
        self.table = torch.arange(6.0)  # a lifted constant

    def forward(self, x):
        self.count.add_(1)
        return x * self.table[:4] + self.count


def test_buffer_mutation_and_lifted_constants():
    m = WithConstantsAndMutation()
    ref = copy.deepcopy(m)
    cm = meshweave.compile(copy.deepcopy(m), (torch.randn(4),))
    for _ in range(3):
        x = torch.randn(4)
        assert_same_outputs(ref(x), cm(x))
    assert any(v.kind == "constant" for v in cm.graph.inputs)


def test_meta_device_model_traces_without_weight_memory():
    with torch.device("meta"):
        m = torch.nn.Sequential(torch.nn.Linear(4096, 16384), torch.nn.GELU(),
                                torch.nn.Linear(16384, 4096))
    cm = meshweave.compile(m, (torch.empty(8, 4096, device="meta"),))
    assert all(t.device.type == "meta" for t in cm.graph.tensors.values())
    assert cm.graph.outputs[0].type.shape == (8, 4096)
    assert "aten.linear.default x2" in cm.explain()


# --- bad input ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_block():
    m = Block().eval()
    return m, meshweave.compile(m, (torch.randn(2, 5, 16),))


def test_wrong_argument_count(compiled_block):
    _, cm = compiled_block
    x = torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match="traced with 1 positional argument.*called with 2"):
        cm(x, x)


def test_wrong_shape_names_argument_and_values(compiled_block):
    _, cm = compiled_block
    with pytest.raises(ValueError, match=r"argument args\[0\]: dim 1 must be 5.*\(2, 7, 16\)"):
        cm(torch.randn(2, 7, 16))
    with pytest.raises(ValueError, match=r"expected a 3-d tensor"):
        cm(torch.randn(5, 16))


def test_wrong_dtype(compiled_block):
    _, cm = compiled_block
    with pytest.raises(ValueError, match=r"args\[0\]: expected dtype f32 .*got torch.float64"):
        cm(torch.randn(2, 5, 16, dtype=torch.float64))


def test_wrong_constant_argument(compiled_block):
    m = Block().eval()
    cm = meshweave.compile(m, (torch.randn(2, 5, 16),), {"temperature": 2.0})
    with pytest.raises(ValueError, match=r"temperature.*traced with the constant 2.0.*got 3.0"):
        cm(torch.randn(2, 5, 16), temperature=3.0)


class UsesUnregisteredOp(torch.nn.Module):
    def forward(self, x):
        return torch.special.bessel_j0(x) + 1


def test_unsupported_op_with_fallback_off_names_op_and_line():
    opts = meshweave.CompileOptions(eager_fallback=False)
    with pytest.raises(meshweave.UnsupportedOpError) as err:
        meshweave.compile(UsesUnregisteredOp(), (torch.randn(3),), options=opts)
    assert err.value.op == "aten.special_bessel_j0.default"
    assert "test_frontend.py" in str(err.value) and "bessel_j0" in str(err.value)


def test_unsupported_op_with_fallback_on_runs_and_is_listed():
    m = UsesUnregisteredOp()
    cm = meshweave.compile(m, (torch.randn(3),))
    x = torch.randn(3)
    assert_same_outputs(m(x), cm(x))
    assert cm.fallback_ops[0][0] == "aten.special_bessel_j0.default"
    assert "eager fallback (1 nodes" in cm.explain()


def test_not_a_module_is_a_type_error():
    with pytest.raises(TypeError, match="expects an nn.Module"):
        meshweave.compile(lambda x: x, (torch.randn(2),))


def test_untraceable_model_gives_frontend_error_with_repro():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    with pytest.raises(meshweave.FrontendError, match="repro: torch.export.export"):
        meshweave.compile(DataDependent(), (torch.randn(3),))


def test_bad_options():
    with pytest.raises(ValueError, match="backend"):
        meshweave.CompileOptions(backend="tpu")
    with pytest.raises(ValueError, match="unknown pass"):
        meshweave.compile(Block(), (torch.randn(2, 5, 16),),
                          options=meshweave.CompileOptions(passes=("nope",)))


def test_wrong_device_and_non_tensor(compiled_block):
    _, cm = compiled_block
    with pytest.raises(ValueError, match=r"args\[0\]: expected device cpu, got meta"):
        cm(torch.empty(2, 5, 16, device="meta"))
    with pytest.raises(ValueError, match=r"args\[0\]: expected a tensor f32\[2, 5, 16\], got int"):
        cm(3)


class Concat(torch.nn.Module):
    def forward(self, x, y):
        return torch.cat([x, y]) * 2


def test_derived_dynamic_dims_are_checked():
    s = Dim("s", min=2, max=16)
    cm = meshweave.compile(Concat(), (torch.randn(3, 4), torch.randn(3, 4)),
                           dynamic_shapes=({0: s}, {0: s}))
    assert_same_outputs(Concat()(torch.ones(5, 4), torch.ones(5, 4)),
                        cm(torch.ones(5, 4), torch.ones(5, 4)))
    with pytest.raises(ValueError, match=r"args\[1\]: dim 0 \(s\d*\) is 6 but argument args\[0\]"):
        cm(torch.ones(5, 4), torch.ones(6, 4))
