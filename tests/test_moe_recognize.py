"""MoE recognition (passes/moe/): blocks of three model families become moe.experts nodes,
validated by execution; what is not an MoE block, or fails validation, stays dense and exact.

Repro for any failure here: pytest tests/test_moe_recognize.py -x -q -k <test name>
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from meshweave.ir.ops.moe import MOE_EXPERTS, check_args, moe_experts
from meshweave.models import build_model
from torch import nn

import meshweave

FAMILIES = {  # name -> (layout, fused_gate_up, has a separate gate, shared expert)
    "moe-tiny": ("kn", False, True, "softmax coefficients"),
    "hf:mixtral": ("nk", True, False, None),
    "hf:qwen2_moe": ("nk", True, False, "sigmoid gate"),
}


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def _compile(model, inputs, **opts):
    return meshweave.compile(model, inputs, options=meshweave.CompileOptions(**opts))


def _assert_matches_eager(model, cm, inputs, what):
    with torch.no_grad():
        torch.testing.assert_close(_logits(cm(*inputs)), _logits(model(*inputs)), rtol=1e-4,
                                   atol=1e-5, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_blocks_become_moe_experts_and_match_eager(name):
    layout, fused, gated, shared = FAMILIES[name]
    model, inputs = build_model(name, batch=2, seq=8)
    cm = _compile(model, inputs)
    layers = cm.frontend_graph.op_counts()["aten.topk.default"]
    nodes = [n for n in cm.graph.nodes if n.op == MOE_EXPERTS]
    assert layers == 2 and len(nodes) == layers, cm.graph.op_counts()
    for n in nodes:
        assert n.kwargs["layout"] == layout and n.kwargs["fused_gate_up"] == fused
        assert (n.args[4] is not None) == gated and n.kwargs["act"] == "silu"
        assert n.kwargs["capacity_factor"] is None  # dropless
    # the dense dispatch is gone: no bmm over stacked expert weights remains
    assert "aten.bmm.default" not in cm.graph.op_counts()
    summary = cm.graph.meta["moe"]
    assert len(summary.recognised) == layers and not summary.dense
    for block in summary.blocks:
        assert block.num_experts == 4 and block.top_k == 2
        assert (block.shared_expert is not None) == (shared is not None)
        if shared:
            assert shared in block.shared_expert
    text = cm.explain()
    assert f"mixture of experts: {layers} of {layers} MoE blocks -> moe.experts" in text
    assert "softmax -> top-2, E=4 -> moe.experts" in text
    assert ("shared expert" in text) and (("no shared expert" in text) == (shared is None))
    _assert_matches_eager(model, cm, inputs, f"{name} compiled with moe.experts")


def test_dynamic_batch_is_recognised_and_exact_at_other_sizes():
    from torch.export import Dim

    model, inputs = build_model("moe-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, inputs, dynamic_shapes=({0: Dim("batch", min=1, max=8)},))
    assert cm.graph.op_counts()[MOE_EXPERTS] == 2  # validated at the traced batch
    for b in (1, 3):
        ids = torch.randint(0, 128, (b, 8))
        _assert_matches_eager(model, cm, (ids,), f"moe-tiny dynamic batch {b}")


def test_dense_model_is_unchanged():
    model, inputs = build_model("llama-tiny", batch=2, seq=8)
    with_moe = _compile(model, inputs)
    without = _compile(model, inputs, passes=("shape_prop", "constant_fold", "cse", "dce"))
    body = [line for line in str(with_moe.graph).splitlines() if not line.startswith("# pass")]
    assert body == [line for line in str(without.graph).splitlines()
                    if not line.startswith("# pass")]
    moe_pass = next(r for r in with_moe.graph.provenance if r.name == "moe")
    assert moe_pass.nodes_before == moe_pass.nodes_after
    assert "moe" not in with_moe.graph.meta and "mixture of experts" not in with_moe.explain()
    _assert_matches_eager(model, with_moe, inputs, "llama-tiny")


def test_top_k_of_a_classifier_is_not_an_moe_block():
    class TopClasses(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            return F.softmax(self.head(x), dim=-1).topk(3, dim=-1)

    model, x = TopClasses().eval(), torch.randn(5, 16)
    cm = _compile(model, (x,))
    assert "moe" not in cm.graph.meta and "mixture of experts" not in cm.explain()
    with torch.no_grad():
        for got, want in zip(cm(x), model(x)):
            torch.testing.assert_close(got, want)


class StackedMoE(nn.Module):
    """A bare MoE layer on tokens [T, d]: ReLU experts over stacked weights, dense dispatch.
    `combine_power` 2 squares the combine weights: MoE-shaped, but not moe.experts."""

    def __init__(self, d=16, f=24, experts=4, k=2, combine_power=1, bias=False):
        super().__init__()
        self.k, self.combine_power = k, combine_power
        self.router = nn.Linear(d, experts, bias=bias)
        self.w_in = nn.Parameter(torch.randn(experts, d, f) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, f, d) / f ** 0.5)

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        one_hot = (top_i[..., None] == torch.arange(self.w_in.shape[0])).to(x.dtype)
        combine = (one_hot * top_p[..., None]).sum(dim=1) ** self.combine_power  # [T, E]
        xe = x.unsqueeze(0).expand(self.w_in.shape[0], -1, -1)
        y = torch.bmm(F.relu(torch.bmm(xe, self.w_in)), self.w_out)
        return (combine.t().unsqueeze(-1) * y).sum(dim=0)


def test_ungated_relu_experts_are_recognised():
    torch.manual_seed(0)
    model, x = StackedMoE().eval(), torch.randn(12, 16)
    cm = _compile(model, (x,))
    (node,) = [n for n in cm.graph.nodes if n.op == MOE_EXPERTS]
    assert node.args[4] is None and node.kwargs["act"] == "relu"
    assert node.kwargs["layout"] == "kn" and not node.kwargs["fused_gate_up"]
    _assert_matches_eager(model, cm, (x,), "StackedMoE")


class EinsumMoE(nn.Module):
    """Another way to write the same layer: weights gathered from the router's probabilities at
    the top-k ids, the combine scattered into zeros_like(probs), einsums for the experts."""

    def __init__(self, d=16, f=24, experts=4, k=2):
        super().__init__()
        self.k = k
        self.router = nn.Linear(d, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, d, f) / d ** 0.5)
        self.w_gate = nn.Parameter(torch.randn(experts, d, f) / d ** 0.5)
        self.w_out = nn.Parameter(torch.randn(experts, f, d) / f ** 0.5)

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        top_i = probs.topk(self.k, dim=-1).indices
        top_p = probs.gather(-1, top_i)
        combine = torch.zeros_like(probs).scatter(1, top_i, top_p / top_p.sum(-1, keepdim=True))
        h = torch.einsum("td,edf->etf", x, self.w_in)
        g = torch.einsum("td,edf->etf", x, self.w_gate)
        y = torch.einsum("etf,efd->etd", F.silu(g) * h, self.w_out)
        return torch.einsum("te,etd->td", combine, y)


def test_gather_scatter_einsum_formulation_is_recognised():
    torch.manual_seed(0)
    model, x = EinsumMoE().eval(), torch.randn(12, 16)
    cm = _compile(model, (x,))
    (node,) = [n for n in cm.graph.nodes if n.op == MOE_EXPERTS]
    assert node.args[4] is not None and node.kwargs["act"] == "silu"
    assert node.args[1].producer.op == "aten.div.Tensor"  # the renormalised gathered weights
    assert "aten.bmm.default" not in cm.graph.op_counts()
    _assert_matches_eager(model, cm, (x,), "EinsumMoE")


def test_near_miss_fails_validation_and_stays_dense():
    torch.manual_seed(0)
    model, x = StackedMoE(combine_power=2).eval(), torch.randn(12, 16)
    cm = _compile(model, (x,))
    assert MOE_EXPERTS not in cm.graph.op_counts()
    assert cm.graph.op_counts()["aten.bmm.default"] == 2  # the dense form, untouched
    (block,) = cm.graph.meta["moe"].blocks
    assert not block.recognised
    assert "no candidate moe.experts call computes what the block does" in block.reason
    assert "stays dense" in cm.explain() and "0 of 1 MoE blocks" in cm.explain()
    _assert_matches_eager(model, cm, (x,), "squared-combine near miss")


def test_skewed_routing_stays_exact():
    """Every token routed to the same experts (a zero router: uniform scores, top-k ties):
    moe.experts is dropless, so the one busy expert pair computes all the tokens."""
    model, inputs = build_model("moe-tiny", batch=2, seq=8)
    for layer in model.layers:
        layer.moe.router.gate.weight.data.zero_()
    cm = _compile(model, inputs)
    assert cm.graph.op_counts()[MOE_EXPERTS] == 2
    routed = []
    model.layers[0].moe.router.register_forward_hook(lambda m, i, out: routed.append(out))
    _assert_matches_eager(model, cm, inputs, "moe-tiny, skewed routing")
    busy = (routed[0] != 0).sum(dim=0)  # tokens per expert
    assert int((busy > 0).sum()) == 2 and int(busy.max()) == 2 * 8  # all 16 tokens, 2 experts


def test_biased_router_sends_every_token_to_one_expert():
    torch.manual_seed(0)
    model, x = StackedMoE(k=1, bias=True).eval(), torch.randn(12, 16)
    with torch.no_grad():
        model.router.bias.copy_(torch.tensor([0.0, 0.0, 50.0, 0.0]))
        assert bool((model.router(x).argmax(-1) == 2).all())
    cm = _compile(model, (x,))
    assert cm.graph.op_counts()[MOE_EXPERTS] == 1
    _assert_matches_eager(model, cm, (x,), "top-1, every token to expert 2")


@pytest.mark.parametrize("name", ["moe-tiny", "hf:mixtral"])
def test_blocks_too_large_to_run_validate_at_a_smaller_width(name):
    """Under a tiny FLOP budget the block is validated at 1/8 of its width (d 64 -> 8) and
    still rewritten; the rewritten graph runs at full width and matches eager."""
    from meshweave.passes.moe import recognize_moe
    from meshweave.runtime.reference import run_graph

    model, inputs = build_model(name, batch=2, seq=8)
    traced = _compile(model, inputs, passes=("shape_prop",)).graph
    g = recognize_moe(traced, max_validation_flops=1e5)
    assert g.op_counts()[MOE_EXPERTS] == 2
    assert all("validated at 1/8 width" in b.experts for b in g.meta["moe"].blocks)
    with torch.no_grad():
        torch.testing.assert_close(run_graph(g, list(inputs))[0], _logits(model(*inputs)),
                                   rtol=1e-4, atol=1e-5)


def test_width_scale_keeps_ratios_and_the_smallest_width():
    from meshweave.passes.moe.shrink import IDENTITY, width_scale

    s = width_scale(16, 2, 8, 4096, [(8, 4096, 14336), (8, 14336, 4096)])
    assert s.factor == 512 and s.sizes == {4096: 8, 14336: 28}
    assert s.literals([16, 2, 4096, [28672 // 2, -1]]) == [16, 2, 8, [28, -1]]  # T, k kept
    fused = width_scale(8, 2, 4, 64, [(4, 256, 64), (4, 64, 128)])  # [E, 2f, d], [E, d, f]
    assert fused.sizes == {64: 8, 128: 16, 256: 32}
    tied = width_scale(64, 2, 4, 64, [(4, 64, 128)])  # T == d: T scales, and T * k with it
    assert tied.dim(64) == 8 and tied.dim(128) == 16 and tied.sizes[64 * 4] == 32
    assert width_scale(8, 2, 4, 17, [(4, 17, 34)]) is IDENTITY  # no common factor


def test_identical_layers_are_validated_once(monkeypatch):
    from meshweave.passes.moe import validate as validate_mod

    calls = []
    real = validate_mod.validate
    monkeypatch.setattr(validate_mod, "validate",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    model, inputs = build_model("moe-tiny", batch=2, seq=8, num_layers=3)
    cm = _compile(model, inputs)
    assert cm.graph.op_counts()[MOE_EXPERTS] == 3 and len(calls) == 1


def test_mixtral_scale_block_on_meta_is_recognised():
    from meshweave.models import get_model_spec

    spec = get_model_spec("moe-tiny", hidden_size=4096, expert_ffn_size=14336, num_experts=8,
                          num_layers=1, num_heads=32, num_kv_heads=8, shared_expert=False)
    model = spec.build(device="meta")
    cm = meshweave.compile(model, spec.example_inputs(batch=1, seq=16, device="meta"))
    (block,) = cm.graph.meta["moe"].blocks
    assert block.recognised and block.num_experts == 8, block.describe()
    assert "validated at 1/512 width" in block.experts  # 4096 -> 8, 14336 -> 28


def test_onnx_export_of_moe_experts_matches():
    pytest.importorskip("onnxruntime")
    model, inputs = build_model("moe-tiny", batch=2, seq=8)
    cm = _compile(model, inputs)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        result = cm.export_onnx(d)  # checked in onnxruntime against the reference executor
    assert result.max_error < 1e-4


def test_mlir_dump_of_moe_experts_uses_the_dense_form():
    pytest.importorskip("torch_mlir")
    from meshweave.codegen.mlir.dump import dump_mlir

    model, inputs = build_model("moe-tiny", batch=2, seq=8)
    text = dump_mlir(_compile(model, inputs).graph, dialect="torch")
    assert "torch.aten.bmm" in text and "torch.aten.scatter_add" in text


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_onnx_dense_form_equals_the_sparse_rule(capacity_factor):
    from meshweave.codegen.onnx.translations import moe_experts_dense

    g = torch.Generator().manual_seed(0)
    t, d, f, e, k = 10, 8, 12, 4, 2
    x = torch.randn(t, d, generator=g)
    w = torch.rand(t, k, generator=g)
    ids = torch.zeros(t, k, dtype=torch.int64)  # skewed: everyone to experts 0 and 1
    ids[:, 1] = 1
    ids[::3] = torch.tensor([3, 2])  # capacity ceil(0.5 * 20 / 4) = 3: drops 3 + 3 + 1 + 1
    w_in, w_out = torch.randn(e, 2 * f, d, generator=g), torch.randn(e, d, f, generator=g)
    kw = dict(act="silu", layout="nk", fused_gate_up=True, capacity_factor=capacity_factor)
    want, want_dropped = moe_experts(x, w, ids, w_in, None, w_out, **kw)
    got, got_dropped = moe_experts_dense(x, w, ids, w_in, None, w_out, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert int(got_dropped) == int(want_dropped) == (0 if capacity_factor is None else 8)


def test_training_compile_keeps_joint_graphs_dense_and_inference_rewritten():
    model, inputs = build_model("moe-tiny", batch=2, seq=8)
    model.train()
    cm = _compile(model, inputs, training=True)
    assert cm.graph.op_counts()[MOE_EXPERTS] == 2  # the inference program
    for g in (cm.joint.forward, cm.joint.backward):  # parameters are inputs with gradients
        assert MOE_EXPERTS not in g.op_counts()


# ------------------------------------------------------------------ the op's argument checks
def _args(t=6, d=8, f=12, e=4, k=2):
    return (torch.randn(t, d), torch.rand(t, k), torch.zeros(t, k, dtype=torch.int64),
            torch.randn(e, d, f), torch.randn(e, d, f), torch.randn(e, f, d))


@pytest.mark.parametrize("change, message", [
    (lambda a: dict(act="tanh"), r"act='tanh'; expected one of \['gelu', 'gelu_tanh'"),
    (lambda a: dict(layout="mk"), r"layout='mk'; expected 'kn' or 'nk'"),
    (lambda a: dict(x=a[0][None]), r"expected x \[T, d\], weights and ids \[T, k\]; got x "
                                   r"\(1, 6, 8\)"),
    (lambda a: dict(weights=a[1][:, :1]), r"weights \(6, 1\), ids \(6, 2\)"),
    (lambda a: dict(w_out=a[5][:3]), r"one E; got w_in \(4, 8, 12\), w_out \(3, 12, 8\)"),
    (lambda a: dict(w_gate=a[4][..., :6]), r"w_gate \(4, 8, 6\) must match w_in \(4, 8, 12\)"),
    (lambda a: dict(fused_gate_up=True), r"give w_gate or fused_gate_up=True, not both"),
])
def test_bad_arguments_name_what_is_wrong(change, message):
    a = _args()
    names = ("x", "weights", "ids", "w_in", "w_gate", "w_out")
    call = dict(zip(names, a), act="silu", layout="kn", fused_gate_up=False)
    call.update(change(a))
    with pytest.raises(ValueError, match=r"^moe\.experts: .*" + message):
        check_args(**call)
    with pytest.raises(ValueError, match=message):  # the eager rule checks the same
        moe_experts(*(call[n] for n in names), act=call["act"], layout=call["layout"],
                    fused_gate_up=call["fused_gate_up"])


class LeakyMoE(StackedMoE):
    """StackedMoE that also returns a value of the experts' side of the block (the hidden
    activations' mean): the region is not closed, so it must stay dense."""

    def forward(self, x):
        probs = F.softmax(self.router(x), dim=-1)
        top_p, top_i = probs.topk(self.k, dim=-1)
        one_hot = (top_i[..., None] == torch.arange(self.w_in.shape[0])).to(x.dtype)
        combine = (one_hot * top_p[..., None]).sum(dim=1)
        xe = x.unsqueeze(0).expand(self.w_in.shape[0], -1, -1)
        h = F.relu(torch.bmm(xe, self.w_in))
        return (combine.t().unsqueeze(-1) * torch.bmm(h, self.w_out)).sum(dim=0), h.mean()


def test_a_load_balancing_loss_keeps_the_block_recognised_and_exact():
    """moe-tiny with router_aux_loss_coef: the loss counts each expert's one-hot choices,
    values inside the block made from the routing alone. They stay in the graph beside
    moe.experts, so both blocks are still recognised; the loss, the logits and every
    gradient (the router's gets the loss's share) equal eager."""
    import copy

    model, inputs = build_model("moe-tiny", batch=2, seq=8, router_aux_loss_coef=0.01)
    cm = _compile(model, inputs)
    assert cm.graph.op_counts()[MOE_EXPERTS] == 2, cm.explain()
    with torch.no_grad():
        (logits, aux), (want_logits, want_aux) = cm(*inputs), model(*inputs)
    torch.testing.assert_close(logits, want_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, want_aux)
    assert 0.01 <= float(aux) <= 0.01 * 2 * 4  # per layer: 1 uniform ... E all to one expert

    ref = copy.deepcopy(model)
    tr = meshweave.compile(model, inputs, options=meshweave.CompileOptions(training=True))
    for fn, m in ((tr, model), (ref, ref)):
        out, a = fn(*inputs)
        (F.cross_entropy(out.reshape(-1, out.shape[-1]), inputs[0].reshape(-1)) + a).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
    plain = build_model("moe-tiny", batch=2, seq=8)[0]
    out = plain(*inputs)
    F.cross_entropy(out.reshape(-1, out.shape[-1]), inputs[0].reshape(-1)).backward()
    gate = "layers.0.moe.router.gate.weight"
    assert not torch.allclose(dict(plain.named_parameters())[gate].grad,
                              dict(ref.named_parameters())[gate].grad)


def test_a_negative_load_balancing_coefficient_is_refused():
    with pytest.raises(ValueError, match=r"router_aux_loss_coef must be >= 0 .* got -0.1"):
        build_model("moe-tiny", router_aux_loss_coef=-0.1)


def test_a_value_of_the_experts_side_read_outside_keeps_the_block_dense():
    torch.manual_seed(0)
    model, x = LeakyMoE().eval(), torch.randn(12, 16)
    cm = _compile(model, (x,))
    (block,) = cm.graph.meta["moe"].blocks
    assert not block.recognised and "inside the block is also read by" in block.reason
    with torch.no_grad():
        for got, want in zip(cm(x), model(x)):
            torch.testing.assert_close(got, want)


def test_hf_mixtrals_router_loss_keeps_its_blocks_recognised():
    """HF Mixtral with output_router_logits: its load-balancing loss (from the router logits,
    outside the blocks) comes out of the compiled model equal to eager's, both blocks are
    moe.experts, and training on cross-entropy + that loss gives eager's gradients."""
    pytest.importorskip("transformers")
    import copy

    model, (x,) = build_model("hf:mixtral", batch=2, seq=8)
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.02
    ref = copy.deepcopy(model)
    cm = _compile(model, (x,))
    assert cm.graph.op_counts()[MOE_EXPERTS] == 2, cm.explain()
    with torch.no_grad():
        got, want = cm(x), ref(x)
    torch.testing.assert_close(got.aux_loss, want.aux_loss)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-5, atol=1e-5)
    tr = meshweave.compile(model, (x,), options=meshweave.CompileOptions(training=True))
    for fn in (tr, ref):
        out = fn(x)
        (F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), x.reshape(-1))
         + out.aux_loss).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)
