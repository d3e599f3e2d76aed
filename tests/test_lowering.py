"""The parallel lowering, checked numerically without processes (simulate_plan runs every
rank's program in one process) against the reference executor.

Each failure message carries a `meshweave dump --what rank:N` command that prints the rank's
program.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_same_outputs
from meshweave.ir.mesh import DeviceMesh
from meshweave.models import build_model
from meshweave.passes.parallel import (
    Plan,
    lower_for_rank,
    megatron_plan,
    plan_parallel,
    shard_tensor,
    simulate_plan,
)
from meshweave.passes.parallel.plan import StagePlan
from meshweave.runtime.reference import run_graph
from torch import nn

import meshweave

BATCH, SEQ = 4, 8
CASES = {  # name: (dp, tp, pp, micro-batches)
    "dp": (2, 1, 1, 1),
    "tp": (1, 2, 1, 1),
    "pp": (1, 1, 2, 2),
    "dpxtp": (2, 2, 1, 1),
    "ppxtp": (1, 2, 2, 2),
}


@functools.cache
def _traced(name: str):
    model, inputs = build_model(name, batch=BATCH, seq=SEQ)
    graph = meshweave.compile(model, inputs).graph
    return name, graph, list(inputs), run_graph(graph, list(inputs))


@pytest.fixture(scope="module", params=["gpt-tiny", "llama-tiny", "moe-tiny", "hf:gpt2"])
def zoo(request):
    if request.param.startswith("hf:"):
        pytest.importorskip("transformers")
    return _traced(request.param)


def _repro(name: str, mesh: str) -> str:
    return f"meshweave dump --model {name} --batch {BATCH} --seq {SEQ} --what rank:0 --mesh {mesh}"


@pytest.mark.parametrize("case", list(CASES))
def test_megatron_layouts_match_reference(zoo, case):
    name, graph, inputs, expected = zoo
    dp, tp, pp, mb = CASES[case]
    plan = megatron_plan(graph, dp, tp, pp, micro_batches=mb)
    got = simulate_plan(graph, plan, inputs)
    assert_same_outputs(
        expected, got, rtol=1e-4, atol=1e-5, repro=_repro(name, f"dp={dp},tp={tp},pp={pp}")
    )


def test_searched_plan_matches_reference(zoo):
    name, graph, inputs, expected = zoo
    plan = plan_parallel(graph, 8, "h100", batch=BATCH, training=True)
    plan = Plan.from_json(plan.to_json())  # what the runtime would load
    got = simulate_plan(graph, plan, inputs)
    assert_same_outputs(expected, got, rtol=1e-4, atol=1e-5, repro=_repro(name, "8"))


def test_megatron_tp_collectives_and_local_shapes():
    """Megatron on tp=2: per layer one all-reduce after attention and one after the MLP,
    half the heads and half the weight rows per rank."""
    model, inputs = build_model("gpt-tiny", batch=BATCH, seq=SEQ)
    graph = meshweave.compile(model, inputs).graph
    plan = megatron_plan(graph, 1, 2, 1)
    prog = lower_for_rank(graph, plan, 1)
    counts = prog.op_counts()
    layers = 2
    # + 1 after the vocab-parallel embedding, + 1 gather of the vocab-parallel logits
    assert counts.get("dist.all_reduce", 0) == 2 * layers + 1, counts
    assert counts.get("dist.all_gather", 0) == 1, counts
    qkv = prog.value("p_blocks_0_attn_qkv_weight")
    assert qkv.type.shape == (96, 64)
    full = graph.tensors["p_blocks_0_attn_qkv_weight"]
    spec = prog.meta["shard_specs"]["p_blocks_0_attn_qkv_weight"]
    assert torch.equal(shard_tensor(full, spec), prog.tensors["p_blocks_0_attn_qkv_weight"])
    views = [n for n in prog.nodes if n.op == "aten.view.default" and len(n.args[1]) == 4]
    assert views and all(n.args[1][2] == 2 for n in views)  # 4 heads / tp 2


def test_moe_expert_parallel_pins():
    """Stacked expert weights sharded on the expert dim (expert parallelism): each tp rank
    holds and runs half the experts; the planner completes the layout around the pins."""
    name, graph, inputs, expected = _traced("moe-tiny")
    experts = [f"p_layers_0_moe_experts_{w}" for w in ("w_in", "w_gate", "w_out")]
    mesh = DeviceMesh((2, 2), ("dp", "tp"))
    plan = plan_parallel(graph, mesh, "h100", batch=BATCH, pins={w: ("R", "S(0)") for w in experts})
    for w in experts:  # the pin on the representative layer holds for every layer
        assert plan.placements[w] == plan.placements[w.replace("_0_", "_1_")] == ("R", "S(0)")
    got = simulate_plan(graph, plan, inputs)
    assert_same_outputs(expected, got, rtol=1e-4, atol=1e-5, repro=_repro(name, "2x2"))
    prog = lower_for_rank(graph, plan, 1)
    assert prog.value("p_layers_1_moe_experts_w_out").type.shape == (2, 128, 64)


def test_pipeline_programs_send_and_receive():
    model, inputs = build_model("gpt-tiny", batch=BATCH, seq=SEQ)
    graph = meshweave.compile(model, inputs).graph
    plan = megatron_plan(graph, 1, 1, 2, micro_batches=2)
    first, last = lower_for_rank(graph, plan, 0), lower_for_rank(graph, plan, 1)
    sends = [n for n in first.nodes if n.op == "dist.send"]
    recvs = [n for n in last.nodes if n.op == "dist.recv"]
    assert sends and len(sends) == len(recvs) and not first.outputs
    assert {n.kwargs["tag"] for n in sends} == {n.kwargs["tag"] for n in recvs}
    assert all(n.kwargs["dst"] == 1 for n in sends) and all(n.kwargs["src"] == 0 for n in recvs)
    assert last.user_inputs == [] and first.meta["micro_batch_dim"] == {"input_ids": 0}
    assert recvs[0].outputs[0].type.shape[0] == BATCH // 2  # one micro-batch


# ------------------------------------------------------------------ single-op sharding rules
class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.out = nn.Linear(16, 16)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = (t.view(b, s, 4, 4).transpose(1, 2) for t in (q, k, v))
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, 16))


class _Embed(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 6)

    def forward(self, ids):
        return self.emb(ids) * 2.0


def _one_stage(graph, mesh: DeviceMesh, placements: dict[str, tuple[str, ...]]) -> Plan:
    """A hand-written single-stage plan; the lowering derives each node's input placements
    from the sharding rules."""
    return Plan(
        mesh,
        1,
        placements,
        [StagePlan(0, [n.outputs[0].name for n in graph.nodes], list(range(mesh.size)))],
    )


def _check(module, inputs, mesh, placements, collectives):
    graph = meshweave.compile(module.eval(), inputs).graph
    names = {v.name for v in graph.all_values()}
    assert set(placements) <= names, sorted(names)
    plan = _one_stage(graph, mesh, placements)
    with torch.no_grad():
        expected = module(*inputs)
    got = simulate_plan(graph, plan, list(inputs))
    assert_same_outputs([expected], got, rtol=1e-5, atol=1e-6, repro=str(placements))
    counts = lower_for_rank(graph, plan, 0).op_counts()
    for op, n in collectives.items():
        assert counts.get(op, 0) == n, (op, counts)
    return graph


def test_column_then_row_linear():
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    x = torch.randn(4, 8)
    tp = DeviceMesh((2,), ("tp",))
    _check(
        mlp,
        (x,),
        tp,
        {
            "p_0_weight": ("S(0)",),
            "p_0_bias": ("S(0)",),
            "linear": ("S(1)",),
            "relu": ("S(1)",),
            "p_2_weight": ("S(1)",),
            "linear_1": ("P",),
        },
        {"dist.all_reduce": 1, "dist.all_gather": 0},
    )


def test_attention_split_by_heads_and_views():
    """Fused QKV column-parallel (blocked weight), [b,s,h*d] S(2) -> [b,s,h,d] S(2) views,
    attention by heads, row-parallel output: one all-reduce, nothing gathered."""
    x = torch.randn(2, 6, 16)
    tp = DeviceMesh((2,), ("tp",))
    s2, s1 = ("S(2)",), ("S(1)",)
    placements = {
        "p_qkv_weight": ("S(0)",),
        "p_qkv_bias": ("S(0)",),
        "linear": s2,
        "split_with_sizes_0": s2,
        "split_with_sizes_1": s2,
        "split_with_sizes_2": s2,
        "view": s2,
        "view_1": s2,
        "view_2": s2,
        "permute": s1,
        "permute_1": s1,
        "permute_2": s1,
        "scaled_dot_product_attention": s1,
        "permute_3": s2,
        "view_3": s2,
        "p_out_weight": ("S(1)",),
        "linear_1": ("P",),
    }
    _check(
        _Attention(),
        (x,),
        tp,
        placements,
        {"dist.all_reduce": 1, "dist.all_gather": 0, "dist.local_shard": 0},
    )


def test_vocab_parallel_embedding_and_2d_mesh():
    ids = torch.randint(0, 12, (4, 3))
    mesh = DeviceMesh((2, 2), ("dp", "tp"))
    _check(
        _Embed(),
        (ids,),
        mesh,
        {"ids": ("S(0)", "R"), "p_emb_weight": ("R", "S(0)"), "embedding": ("S(0)", "P")},
        {"dist.all_reduce": 1},
    )


def test_sequence_sharded_view_merge():
    class M(nn.Module):
        def forward(self, x):
            return (x * 3).reshape(4 * 6, 5) + 1

    x = torch.randn(4, 6, 5)
    _check(
        M(),
        (x,),
        DeviceMesh((2,), ("dp",)),
        {"mul": ("S(0)",), "view": ("S(0)",)},
        {"dist.all_gather": 1},
    )
