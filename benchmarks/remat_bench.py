"""Rematerialization against torch's partitioner and checkpointing, at equal measured memory.

    python benchmarks/remat_bench.py            # tiny sizes measured on the CPU + full-size plans
    python benchmarks/remat_bench.py --no-meta  # tiny measured runs only (what the test runs)

Measured (tiny shapes, CPU; a GPT and a Llama config of the zoo), per memory budget 1.0, 0.7,
0.5, 0.3, 0.1, on one exported module and one AOTAutograd joint graph per partitioner:
  meshweave   passes/remat's partition function (what meshweave.compile uses)
  torch       min_cut_rematerialization_partition under
              torch._functorch.config.activation_memory_budget = the budget
and, once each, in eager torch: every block under torch.utils.checkpoint (use_reentrant=False),
and Megatron-style selective recompute (only the attention core, the SDPA call, checkpointed).

Saved bytes: torch.autograd.graph.saved_tensors_hooks over the forward of a real step, counted
per storage, parameters and inputs excluded (runtime/memory.SavedBytes); for checkpointing, the
tensors each checkpointed call keeps to recompute from (its inputs, held by a closure that the
hooks do not see) are added. Recompute FLOPs, the same method for all four: FLOPs of the
backward as run (torch.utils.flop_counter's formulas, matmul-class ops only, counted in a
dispatch mode; the CPU SDPA kernels added) minus eager autograd's backward, which recomputes
nothing. (AOTAutograd's default partition is not a zero: it recomputes the fused attention in
the backward, since its logsumexp output is read by the backward only.) Second count, for the
two partitioners: the backward's copies of forward nodes (by fx name), priced by meshweave's
registry FLOP rules (all ops) and its roofline seconds on the
device's spec ("cpu" preset for CPU runs, h100 otherwise; the solver's own objective).

Equal memory: at each budget, meshweave is compared with torch at the same budget when its
measured saved bytes are <= torch's; otherwise meshweave is re-solved with torch's measured
bytes as an absolute budget (its estimate bounds its measured bytes from above, so it then
saves no more than torch) and that run is compared. Ratio: meshweave / torch recompute FLOPs
(1.0 when both are 0, inf when only torch's is 0). The last line prints the worst ratio.

Full size (meta device, planning only, no execution): GPT-2-small (12 layers, d 768, seq 1024,
vocab 50257) and Llama-8B shapes with fewer layers; the joint graph is traced on meta tensors
and both partitioners run on it. Bytes are read off the graphs (meshweave: its estimate; torch:
the forward's saved outputs, views counted at their base), recompute FLOPs of both counted on
the backward's copies of forward nodes with meshweave's registry rules (the same rule for both).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import operator
import time

import torch
from torch._functorch import config as aot_config
from torch._functorch.aot_autograd import aot_module_simplified, make_boxed_func
from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition
from torch.utils.checkpoint import checkpoint
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

from meshweave.frontend.joint import _FlatOutputs
from meshweave.models.registry import build_model
from meshweave.passes.parallel.cost.hardware import get_spec
from meshweave.passes.remat.budget import MemoryBudget, RematError
from meshweave.passes.remat.partition import remat_partition
from meshweave.passes.remat.problem import _VIEW_OPS, _packet, build_problem
from meshweave.runtime.memory import SavedBytes, storage_ptrs

BUDGETS = (1.0, 0.7, 0.5, 0.3, 0.1)
# name -> (zoo model, config overrides, batch, seq)
TINY = {
    "gpt-tiny-4L": ("gpt-tiny", dict(num_layers=4, hidden_size=64, num_heads=4, max_seq_len=64,
                                     vocab_size=256), 2, 64),
    "llama-tiny-4L": ("llama-tiny", dict(num_layers=4), 2, 64),
}
FULL = {
    "gpt2-small": ("gpt-tiny", dict(num_layers=12, hidden_size=768, num_heads=12,
                                    max_seq_len=1024, vocab_size=50257), 1, 1024),
    "llama-8b-4L": ("llama-8b", dict(num_layers=4), 1, 2048),
}
# meshweave's cost model, as meshweave.compile picks it: the device the step runs on (the "cpu"
# preset for the measured CPU runs, h100 on a GPU and for the full-size plans on meta)
PLAN_SPEC = get_spec("h100")


def device_spec(device: str):
    return get_spec("cpu" if device == "cpu" else "h100")


class _Flops(TorchDispatchMode):
    """FlopCounterMode's formulas (torch.utils.flop_counter.flop_registry: matmul-class ops),
    without its module tracker, which fails on AOTAutograd's forward (outputs with no grad_fn)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rule = flop_registry.get(func._overloadpacket) or _EXTRA_RULES.get(func._overloadpacket)
        if rule is None and func is not torch.ops.prim.device.default:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        if rule is not None:
            self.total += int(rule(*args, **kwargs, out_val=out))
        return out


_aten = torch.ops.aten
_EXTRA_RULES = {  # the CPU flash kernels are not in torch's table; the same formulas
    _aten._scaled_dot_product_flash_attention_for_cpu: lambda q, k, v, *a, **kw:
        sdpa_flop_count(q.shape, k.shape, v.shape),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: lambda g, q, k, v, *a, **kw:
        sdpa_backward_flop_count(g.shape, q.shape, k.shape, v.shape),
}


def _flops(fn) -> tuple[object, int]:
    with _Flops() as fc:
        return fn(), fc.total


def _keep(meter: SavedBytes, tensors) -> None:
    """Count tensors a checkpoint keeps to recompute from (not seen by the hooks)."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            if s.data_ptr() not in meter.exclude:
                meter.storages[s.data_ptr()] = s.nbytes()


_METER: list[SavedBytes] = []


def _step(forward, state, inputs) -> dict:
    """One measured step: saved bytes (forward), forward and backward FLOPs."""
    exclude = storage_ptrs(state) | storage_ptrs(inputs)
    with SavedBytes(exclude) as meter:
        _METER.append(meter)
        try:
            outs, fw = _flops(lambda: [o for o in forward() if isinstance(o, torch.Tensor)
                                       and o.requires_grad])
        finally:
            _METER.pop()
    _, bw = _flops(lambda: torch.autograd.backward(outs, [torch.ones_like(o) for o in outs]))
    for p in state:
        p.grad = None
    return {"saved": meter.nbytes, "fw": fw, "bw": bw}


def _math_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_kw):
    """softmax(Q K^T / sqrt(d)) V written out (Megatron's attention core, no fused kernel)."""
    s = (q @ k.transpose(-2, -1)) * (scale or q.shape[-1] ** -0.5)
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


@contextlib.contextmanager
def _attention(fn):
    """Within the block, F.scaled_dot_product_attention is `fn` (the models call it through F)."""
    saved = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = fn or saved
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = saved


class _Case:
    """One model at one shape: exported once; each partitioner gets its own joint trace."""

    def __init__(self, zoo: str, overrides: dict, batch: int, seq: int, device: str = "cpu",
                 attention: str = "sdpa"):
        torch.manual_seed(0)
        self.model, self.inputs = build_model(zoo, batch=batch, seq=seq, **overrides)
        self.model.train().to(device)
        self.inputs = tuple(t.to(device) for t in self.inputs)
        self.attn = _math_sdpa if attention == "math" else None
        with _attention(self.attn):
            self.ep = torch.export.export(self.model, self.inputs, strict=False)
        self.flat = _FlatOutputs(self.ep.module())
        self.spec = device_spec(device)
        self.state = list(self.flat.parameters()) + list(self.flat.buffers())

    def aot(self, partition, patch: dict | None = None) -> dict:
        """A step through AOTAutograd with `partition`; `rule`: meshweave's registry FLOPs and
        roofline seconds of the backward's copies of forward nodes (the same count for all)."""
        report = {}

        def part(joint, joint_inputs, **kw):
            problem = build_problem(joint, kw["num_fwd_outputs"], self.spec)
            fw, bw = partition(joint, joint_inputs, **kw)
            rec = [problem.candidates[n.name] for n in bw.graph.nodes
                   if n.op == "call_function" and n.name in problem.candidates]
            report["rule"] = (sum(c.flops for c in rec), sum(c.cost for c in rec))
            return fw, bw

        with aot_config.patch(**(patch or {})):
            fn = aot_module_simplified(self.flat, list(self.inputs),
                                       fw_compiler=lambda g, _: make_boxed_func(g),
                                       bw_compiler=lambda g, _: make_boxed_func(g),
                                       partition_fn=part)
        with torch.enable_grad():
            report.update(_step(lambda: list(fn(*self.inputs)), self.state, list(self.inputs)))
        return report

    def meshweave(self, budget) -> dict:
        info = {}
        r = self.aot(remat_partition(MemoryBudget.parse(budget), self.spec, info))
        r["solution"] = info["solution"]
        return r

    def torch_partitioner(self, budget: float) -> dict:
        return self.aot(min_cut_rematerialization_partition,
                        {"activation_memory_budget": budget})

    def eager(self, mode: str | None) -> dict:
        """Eager steps: no recompute, every block checkpointed, or the attention core only."""
        model = self.model
        blocks = getattr(model, "blocks", None) or getattr(model, "layers")
        patched = []
        core = self.attn or torch.nn.functional.scaled_dot_product_attention

        def ckpt(fn):
            def run(*args, **kw):
                if _METER:
                    _keep(_METER[-1], args)
                return checkpoint(fn, *args, use_reentrant=False, **kw)
            return run

        try:
            if mode == "full":
                for b in blocks:
                    patched.append(b)
                    b.forward = ckpt(type(b).forward.__get__(b))
            with _attention(ckpt(core) if mode == "selective" else self.attn), \
                    torch.enable_grad():
                return _step(lambda: [model(*self.inputs)], list(model.parameters()),
                             list(self.inputs))
        finally:
            for b in patched:
                del b.forward


def _ratio(mine: float, theirs: float) -> float:
    if theirs <= 0:
        return 1.0 if mine <= 0 else math.inf
    return mine / theirs


def bench_case(name: str, zoo: str, overrides: dict, batch: int, seq: int, out,
               budgets=BUDGETS, device: str = "cpu", attention: str = "sdpa") -> dict:
    t0 = time.perf_counter()
    case = _Case(zoo, overrides, batch, seq, device, attention)
    base = case.aot(default_partition)  # AOTAutograd's default partition, for reference
    eager = case.eager(None)  # eager autograd recomputes nothing: the FLOP baseline
    step = eager["fw"] + eager["bw"]
    out(f"\n== {name} ({zoo} {overrides}, batch {batch}, seq {seq}, {device}, attention "
        f"{attention}) ==")
    out(f"step FLOPs (eager fw+bw): {step:,}; saved bytes: eager {eager['saved']:,}, AOT "
        f"default partition {base['saved']:,} (its recompute {base['bw'] - eager['bw']:,})")
    out("columns: measured saved bytes | recompute FLOPs measured (matmul-class, primary) | "
        f"registry-rule FLOPs | roofline us (meshweave's cost model, {case.spec.name})")
    rows, ratios = [], []
    mesh_full = None

    def rec(r):  # measured: backward FLOPs over eager's; rule: the backward's forward copies
        return r["bw"] - eager["bw"], r["rule"][0], r["rule"][1] * 1e6

    def cols(r):
        m, f, us = rec(r)
        return f"{r['saved']:>10,} {m:>11,} {f:>11,.0f} {us:>7.2f}"

    out(f"{'budget':>6} | {'meshweave':>42} | {'torch min-cut':>42} | equal memory")
    for b in budgets:
        mw, tc = case.meshweave(b), case.torch_partitioner(b)
        if mesh_full is None:
            mesh_full = mw["saved"]
        note, cmp = "same budget", mw
        if mw["saved"] > tc["saved"]:
            try:
                cmp = case.meshweave(f"{max(tc['saved'], 1)}B")
                note = "mw re-solved at torch's bytes"
            except RematError:
                note, cmp = "torch below meshweave's floor: not compared", None
        r = _ratio(rec(cmp)[0], rec(tc)[0]) if cmp is not None else None
        r_us = _ratio(rec(cmp)[2], rec(tc)[2]) if cmp is not None else None
        if r is not None:
            ratios.append(r)
        tail = (f"{note}: mw {cmp['saved']:,} B, {rec(cmp)[0]:,} FLOPs; ratio {r:.3f} "
                f"(roofline-time ratio {r_us:.3f})" if cmp is not None else note)
        out(f"{b:>6} | {cols(mw)} | {cols(tc)} | {tail}")
        rows.append(dict(budget=b, mw_saved=mw["saved"], mw_rec=rec(mw)[0],
                         tc_saved=tc["saved"], tc_rec=rec(tc)[0],
                         cmp_saved=cmp["saved"] if cmp else None,
                         cmp_rec=rec(cmp)[0] if cmp else None, ratio=r))
    full, sel = case.eager("full"), case.eager("selective")
    for label, r in (("full per-block checkpoint", full), ("Megatron selective (attention core)",
                                                           sel)):
        d = r["bw"] - eager["bw"]
        out(f"{label}: saved {r['saved']:,} B ({r['saved'] / eager['saved'] - 1:+.1%} vs eager), "
            f"recompute {d:,} FLOPs ({d / (eager['fw'] + eager['bw']):.2%} of the step)")
    # Megatron's point: -70% activation memory; meshweave's recompute at the same saving
    target = int(0.3 * mesh_full)
    m70 = case.meshweave(f"{max(target, 1)}B")
    out(f"meshweave at -70% saved bytes ({m70['saved']:,} <= {target:,} B, "
        f"{m70['saved'] / mesh_full - 1:+.1%}): recompute {rec(m70)[0]:,} FLOPs = "
        f"{rec(m70)[0] / step:.2%} of step FLOPs (registry rule: {rec(m70)[1] / step:.2%}; "
        f"Megatron's selective recompute: -70% for +2.7% on GPT-3 shapes)")
    worst = max(ratios) if ratios else math.nan
    out(f"{name}: worst ratio {worst:.3f}; measured in {time.perf_counter() - t0:.1f} s")
    return {"name": name, "rows": rows, "worst": worst, "step_flops": step,
            "minus70_pct": rec(m70)[0] / step, "minus70_saved": m70["saved"],
            "full_saved": mesh_full, "checkpoint": full, "selective": sel, "eager": eager}


class _Done(Exception):
    pass


def _graph_saved_bytes(fw, num_fwd_outputs: int) -> float:
    """Bytes of the forward's saved outputs, views at their base; parameters, inputs and the
    forward's own outputs (held by the caller) free, as the measured runs count them."""
    args = list(fw.graph.find_nodes(op="output"))[0].args[0]
    outs = args[num_fwd_outputs:]

    def base(root):
        # by op, not Tensor._is_view(): meta tensors do not report views
        while (root.op == "call_function" and root.args and isinstance(root.args[0], torch.fx.Node)
               and (_packet(root) in _VIEW_OPS or root.target is operator.getitem
                    and _packet(root.args[0]) in _VIEW_OPS)):
            root = root.args[0]
        return root

    seen = {base(a).name for a in args[:num_fwd_outputs] if isinstance(a, torch.fx.Node)}
    total = 0.0
    for n in outs:
        root = base(n)
        v = root.meta.get("val")
        if root.op == "placeholder" or root.name in seen or not isinstance(v, torch.Tensor):
            continue
        seen.add(root.name)
        total += v.numel() * v.element_size()
    return total


def plan_case(name: str, zoo: str, overrides: dict, batch: int, seq: int, out) -> list:
    """Planning only, on the meta device: both partitioners on one joint graph, their saved
    bytes read off the forward graphs the same way, recompute priced by the same rules."""
    t0 = time.perf_counter()
    model, inputs = build_model(zoo, device="meta", batch=batch, seq=seq, **overrides)
    ep = torch.export.export(model.train(), inputs, strict=False)
    rows = []

    def partition(joint, joint_inputs, *, num_fwd_outputs, **kw):
        problem = build_problem(joint, num_fwd_outputs, PLAN_SPEC)
        c = problem.candidates
        out(f"\n== {name} on meta ({zoo} {overrides}, batch {batch}, seq {seq}): joint traced "
            f"in {time.perf_counter() - t0:.1f} s, {len(c)} candidates; columns: saved MiB "
            f"(graph), recompute GFLOP (registry rules), partition s ==")

        def plan(fn, **patch):
            t1 = time.perf_counter()
            with aot_config.patch(**patch):
                fw, bw = fn(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kw)
            copies = [c[n.name] for n in bw.graph.nodes
                      if n.op == "call_function" and n.name in c]
            return (_graph_saved_bytes(fw, num_fwd_outputs), sum(x.flops for x in copies),
                    time.perf_counter() - t1, sum(x.cost for x in copies))

        def mesh(budget):
            return plan(remat_partition(MemoryBudget.parse(budget), PLAN_SPEC, {}))

        for b in BUDGETS:
            mw = mesh(b)
            tc = plan(min_cut_rematerialization_partition, activation_memory_budget=b)
            eq, note = mw, "same budget"
            if mw[0] > tc[0]:
                eq, note = mesh(f"{max(int(tc[0]), 1)}B"), "mw at torch's bytes"
            rows.append((b, mw, tc, eq))
            out(f"{b:>4} | meshweave {mw[0] / 2**20:>9,.1f} {mw[1] / 1e9:>9,.2f} {mw[2]:>6.2f} | "
                f"torch {tc[0] / 2**20:>9,.1f} {tc[1] / 1e9:>9,.2f} {tc[2]:>6.2f} | {note}: "
                f"{eq[0] / 2**20:,.1f} MiB, ratio {_ratio(eq[1], tc[1]):.3f} (h100 "
                f"roofline-time ratio {_ratio(eq[3], tc[3]):.3f})")
        raise _Done

    try:
        aot_module_simplified(_FlatOutputs(ep.module()), list(inputs),
                              fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g,
                              partition_fn=partition)
    except _Done:
        pass
    except Exception as e:  # report and go on: the measured part is the benchmark's result
        out(f"\n== {name} on meta: planning failed: {type(e).__name__}: {e}")
    return rows


def run(models=tuple(TINY), budgets=BUDGETS, meta: bool = True, device: str | None = None,
        attention: str = "sdpa", out=print) -> dict:
    """Measured runs of `models` (TINY's names), then the full-size meta plans; the last line
    printed is the worst ratio."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out(f"torch {torch.__version__}; budgets {budgets}; measured on {device}, tiny sizes")
    results = [bench_case(n, *TINY[n], out, budgets, device, attention) for n in models]
    plans = {n: plan_case(n, *cfg, out) for n, cfg in FULL.items()} if meta else {}
    worst = max((r["worst"] for r in results), default=math.nan)
    for r in results:
        out(f"{r['name']}: meshweave at -70% saved bytes recomputes {r['minus70_pct']:.2%} of "
            f"step FLOPs (Megatron selective: +2.7% on GPT-3 shapes)")
    for n, rows in plans.items():
        if rows:
            fl = max(_ratio(eq[1], tc[1]) for _, _, tc, eq in rows)
            tm = max(_ratio(eq[3], tc[3]) for _, _, tc, eq in rows)
            out(f"{n} (full size on meta, estimated, not in R): worst recompute FLOP ratio "
                f"{fl:.3f}, worst h100 roofline-time ratio {tm:.3f}")
    out(f"goal R <= 1.0 at every budget (measured): {'met' if worst <= 1.0 else 'NOT met'}")
    out(f"worst recompute ratio vs torch at equal memory: {worst:.3f}")
    return {"results": results, "plans": plans, "worst": worst}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="measure on the CPU even with a GPU")
    ap.add_argument("--no-meta", action="store_true", help="skip the full-size meta plans")
    ap.add_argument("--meta-only", action="store_true", help="only the full-size meta plans")
    ap.add_argument("--math-attention", action="store_true",
                    help="softmax(QK^T)V written out instead of the fused SDPA (Megatron's case)")
    args = ap.parse_args(argv)
    run(() if args.meta_only else tuple(TINY), meta=not args.no_meta,
        device="cpu" if args.cpu else None,
        attention="math" if args.math_attention else "sdpa")


if __name__ == "__main__":
    main()
