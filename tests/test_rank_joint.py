"""A rank's training step as IR under compile(mesh=...) (runtime/distributed/rank_joint.py): the
traced collectives are the exact adjoints of the executor's, the backward IR holds those
adjoints with the forward's source lines, and its gradients equal one device's."""

from __future__ import annotations

import collections
import json
import re

import pytest
import torch
import torch.nn.functional as F
from meshweave.ir.graph import Node, Value
from meshweave.models import build_model
from meshweave.passes.parallel.lower.rank import lower_for_rank
from meshweave.passes.parallel.plan import Plan
from meshweave.runtime.distributed import DistributedError
from meshweave.runtime.distributed import autograd_collectives as ac
from meshweave.runtime.distributed.launch import launch
from meshweave.runtime.distributed.rank_joint import TRACED, transfers_outside, untraceable

import meshweave

CASES = [  # IR op, its keywords, the executor's differentiable version
    ("dist.all_reduce", {"reduce": "sum"}, lambda x, g: ac.all_reduce(x, g)),
    ("dist.all_gather", {"dim": 1}, lambda x, g: ac.all_gather(x, 1, g)),
    ("dist.reduce_scatter", {"dim": 0, "reduce": "sum"}, lambda x, g: ac.reduce_scatter(x, 0, g)),
    ("dist.all_to_all", {"dim": 0, "concat_dim": 1}, lambda x, g: ac.all_to_all(x, 0, 1, g)),
]


def _adjoints(rank, world):
    from meshweave.runtime.distributed.groups import init_groups
    from torch._subclasses.fake_tensor import FakeTensorMode

    init_groups(2, [[0, 1]])
    out = []
    for op, kw, reference in CASES:
        gen = torch.Generator().manual_seed(10 + rank)
        x = torch.randn(4, 6, generator=gen, requires_grad=True)
        kw = {**kw, "group": [0, 1], "axis": "tp"}
        y = TRACED[op](x, kw)
        w = torch.randn(y.shape, generator=gen)
        (gx,) = torch.autograd.grad((y * w).sum(), x)
        x2 = x.detach().clone().requires_grad_(True)
        y2 = reference(x2, [0, 1])
        (gx2,) = torch.autograd.grad((y2 * w).sum(), x2)
        mode = FakeTensorMode()
        fake_x = mode.from_tensor(x.detach())
        with mode:  # tracing communicates nothing: shapes from fakes
            fake = TRACED[op](fake_x, kw)
        out.append((op, float((y - y2).abs().max()), float((gx - gx2).abs().max()),
                    tuple(fake.shape) == tuple(y.shape)))
    return out


def test_traced_collectives_are_the_executors_exact_adjoints():
    """On 2 gloo ranks: each traceable collective's value and gradient equal the executor's
    autograd collectives (autograd_collectives.py), and its fake gives the real shape."""
    for rank_result in launch(_adjoints, 2, timeout_s=60):
        for op, err, grad_err, shape_ok in rank_result:
            assert err == 0 and grad_err < 1e-6 and shape_ok, (op, err, grad_err, shape_ok)


def _lm_loss(out, x):
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), x.reshape(-1))


def _eager_gpt():
    """(gpt-tiny, its batch, eager's gradients by parameter name, eager's loss) for the
    cross-entropy on the batch itself: what every rank's result is checked against."""
    model, (x,) = build_model("gpt-tiny", batch=2, seq=8)
    ref = build_model("gpt-tiny", batch=2, seq=8)[0]
    ref.load_state_dict(model.state_dict())
    loss = _lm_loss(ref(x), x)
    loss.backward()
    return model, x, {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False)}, \
        float(loss.detach())


def _grad_errors(cm, want: dict) -> dict:
    """Max |rank gradient - eager's| of each parameter the rank holds whole (replicated)."""
    return {n: float((p.grad - want[n]).abs().max())
            for n, p in cm.named_parameters() if p.shape == want[n].shape}


def _train_tp(rank, world, cm, x, want_loss, want_grads):
    loss = _lm_loss(cm(x), x)
    loss.backward()
    grads = _grad_errors(cm, want_grads)
    count = collections.Counter
    ops = {k: count(n.op for n in g.nodes if n.op.startswith(("dist.", "meshweave.attention")))
           for k, g in (("forward", cm.forward_graph), ("backward", cm.backward_graph))}
    sources = sum(bool(n.source) for n in cm.backward_graph.nodes) / len(cm.backward_graph.nodes)
    return cm.backward_kind, float(loss) - want_loss, grads, ops, sources


def test_the_rank_backward_is_ir_holding_the_collectives_adjoints():
    """tp=2 on gpt-tiny: each rank's backward is IR in which every forward all-reduce has its
    all-reduce and the logits' all-gather its reduce-scatter, and attention is meshweave's
    forward/backward pair (as on one device); most backward nodes carry a
    source line; the loss and the replicated parameters' gradients equal one device's."""
    model, x, want, loss = _eager_gpt()
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2,), ("tp",)), training=True))
    for kind, loss_err, grads, ops, sources in launch(_train_tp, 2, (cm, x, loss, want),
                                                     timeout_s=120):
        assert kind.startswith("meshweave IR"), kind
        assert abs(loss_err) < 1e-5 and grads and max(grads.values()) < 1e-5, (loss_err, grads)
        fw, bw = ops["forward"], ops["backward"]
        assert fw["dist.all_reduce"] >= 4 and bw["dist.all_reduce"] == fw["dist.all_reduce"], ops
        assert bw["dist.reduce_scatter"] == fw["dist.all_gather"] == 1, ops
        # attention routed as on one device: meshweave's pair, the Triton flash kernels' ops
        assert fw["meshweave.attention.default"] == bw["meshweave.attention_backward.default"] \
            == 2, ops
        assert sources > 0.8, sources


def _train_budget(rank, world, cm, x, want_grads):
    _lm_loss(cm(x), x).backward()
    sol = cm.rank_remat["solution"]
    grads = list(_grad_errors(cm, want_grads).values())
    marked = sum(bool(n.attrs.get("recompute")) for n in cm.backward_graph.nodes)
    collectives_recomputed = [n for n in cm.backward_graph.nodes
                              if n.attrs.get("recompute") and n.op.startswith("dist.")]
    return sol.saved_bytes, sol.full_bytes, len(sol.recomputed), marked, max(grads), \
        collectives_recomputed


def test_a_memory_budget_under_a_mesh_is_each_ranks_own():
    """memory_budget=0.4 with tp=2: passes/remat/ partitions each rank's joint graph under 40%
    of the rank's own saved bytes, the recomputed nodes are marked in the rank's backward IR
    (collectives never recomputed), and the gradients still equal one device's."""
    model, x, want, _ = _eager_gpt()
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2,), ("tp",)), training=True, memory_budget=0.4))
    for saved, full, recomputed, marked, grad_err, bad in launch(
            _train_budget, 2, (cm, x, want), timeout_s=120):
        assert saved <= 0.4 * full + 1 and recomputed > 0 and marked > 0, \
            (saved, full, recomputed, marked)
        assert grad_err < 1e-5 and not bad, (grad_err, bad)


def _train_triton(rank, world, cm, x, want_grads):
    _lm_loss(cm(x), x).backward()
    grads = list(_grad_errors(cm, want_grads).values())
    art = {k: g.meta["kernels"] for k, g in (("forward", cm.forward_graph),
                                             ("backward", cm.backward_graph))}
    return (max(grads), {k: sum(x.kind == "matmul" for x in a.kernels) for k, a in art.items()},
            {k: {f["op"] for f in a.fallbacks} for k, a in art.items()})


@pytest.mark.usefixtures("kernel_cache")
def test_the_triton_backend_runs_each_ranks_forward_and_backward():
    """backend="triton" under tp=2: both of a rank's graphs become generated modules (the
    interpreter here), their collectives run through torch inside them, and the gradients
    equal one device's."""
    model, x, want, _ = _eager_gpt()
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2,), ("tp",)), training=True, backend="triton"))
    for err, matmuls, fallbacks in launch(_train_triton, 2, (cm, x, want), timeout_s=240):
        assert err < 1e-5, err
        assert matmuls["forward"] >= 4 and matmuls["backward"] >= 4, matmuls
        assert "dist.all_reduce" in fallbacks["forward"] | fallbacks["backward"], fallbacks


def test_stage_transfers_move_outside_and_a_receive_after_a_send_keeps_autograd():
    """pp=2,tp=2: stage 0's send becomes a trailing output and stage 1's receive a trailing
    input of the traced program; a program receiving after it sent (a transfer inside its
    stage) or with a collective nobody reads keeps torch autograd, and says why."""
    model, (x,) = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2, 2), ("pp", "tp")), training=True))
    first, last = lower_for_rank(cm.graph, cm.plan, 0), lower_for_rank(cm.graph, cm.plan, 2)
    assert untraceable(first) is None and untraceable(last) is None
    g, recvs, sends = transfers_outside(first)
    assert not recvs and sends and sends[0]["dst"] == 2
    assert len(g.outputs) == len(first.outputs) + len(sends)
    assert not any(n.op.startswith("dist.s") for n in g.nodes)
    g, recvs, sends = transfers_outside(last)
    assert recvs and recvs[0]["src"] == 0 and not sends
    assert g.user_inputs[-len(recvs):] and g.user_inputs[-1].producer is None
    recv = next(n for n in last.nodes if n.op == "dist.recv")
    first.nodes.append(recv)
    assert "receives a value after sending one" in untraceable(first)
    tp = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2,), ("tp",)), training=True))
    g = lower_for_rank(tp.graph, tp.plan, 0)
    assert untraceable(g) is None
    reduce = next(n for n in g.nodes if n.op == "dist.all_reduce")
    dangling = Node("dist.all_reduce", (reduce.inputs[0],), dict(reduce.kwargs), ())
    dangling.outputs = (Value("unread", reduce.outputs[0].type, dangling),)
    g.nodes.insert(g.nodes.index(reduce) + 1, dangling)
    assert "%unread is never read" in untraceable(g)


@pytest.mark.parametrize("op,kw,match", [
    ("dist.all_reduce", {"reduce": "min"}, "reduce must be 'sum' or 'max', got 'min'"),
    ("dist.reduce_scatter", {"dim": 0, "reduce": "max"}, "only 'sum', got 'max'"),
])
def test_a_collective_with_an_unknown_reduction_is_refused(op, kw, match):
    with pytest.raises(DistributedError, match=match):
        TRACED[op](torch.ones(2, 2), {**kw, "group": [0, 1], "axis": "tp"})


def _plan_budget(rank, world, cm, x):
    _lm_loss(cm(x), x).backward()
    return cm.rank_remat["budget"], cm.memory_stats(x)


def test_the_planners_stage_budget_is_what_each_rank_recomputes_to():
    """A planner memory cap that forces recompute: the plan's stage holds the fraction of its
    activation bytes it keeps (StagePlan.memory_budget, in the JSON); compiled with that plan,
    each rank's remat pass gets it (raised to the smallest feasible if need be), and the
    rank's measured saved and peak bytes match the IR's estimates within 10%."""
    from meshweave.api import plan_for

    model, (x,) = build_model("gpt-tiny", batch=4, seq=8)
    graph = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=2, training=True)).graph
    plan = plan_for(graph, 2, training=True, memory_budget=1e6)
    stage = plan.stages[0]
    assert stage.recompute and 0 < stage.memory_budget < 1, stage
    assert Plan.from_json(plan.to_json()).stages[0].memory_budget == stage.memory_budget
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        plan=plan, training=True))
    for budget, m in launch(_plan_budget, 2, (cm, x), timeout_s=120):
        assert budget.fraction == stage.memory_budget and budget.at_least_feasible, budget
        assert abs(m["peak_bytes_measured"] / m["peak_bytes_estimated"] - 1) < 0.1, m
        assert abs(m["saved_bytes_measured"] / m["saved_bytes_estimated"] - 1) < 0.1, m


def test_a_plan_file_without_stage_budgets_reads_as_saving_everything():
    model, (x,) = build_model("gpt-tiny", batch=2, seq=8)
    cm = meshweave.compile(model, (x,), options=meshweave.CompileOptions(
        mesh=meshweave.DeviceMesh((2,), ("tp",)), training=True))
    d = json.loads(cm.plan.to_json())
    for s in d["stages"]:
        s.pop("memory_budget")  # a plan written before stage budgets existed
    assert Plan.from_json(json.dumps(d)).stages[0].memory_budget is None


@pytest.mark.timeout(150)
def test_meshweave_run_check_shows_each_ranks_memory(capsys):
    """`meshweave run --train --memory-budget 0.3 --check` on tp=2: each rank's saved and
    peak bytes, estimated beside measured, within 10%; bad budgets are one-line errors."""
    from meshweave.cli import main

    argv = ["run", "--model", "gpt-tiny", "--mesh", "tp=2", "--train", "--seq", "8"]
    assert main([*argv, "--memory-budget", "0.3", "--check"]) == 0
    out = capsys.readouterr().out
    lines = re.findall(r"rank (\d) memory, budget 0.3: .* peak ([\d.]+) KiB estimated, "
                       r"([\d.]+) KiB measured", out)
    assert sorted(r for r, _, _ in lines) == ["0", "1"], out
    for _, est, got in lines:
        assert abs(float(got) / float(est) - 1) < 0.1, out
    assert main([*argv, "--memory-budget", "2"]) == 2
    assert "--memory-budget 2.0: a number is a fraction" in capsys.readouterr().err
    assert main([*argv[:-3], "--memory-budget", "0.5"]) == 2
    assert "--memory-budget chooses what the backward recomputes: it needs --train" \
        in capsys.readouterr().err
