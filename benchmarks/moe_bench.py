"""Benchmark: moe.experts on the grouped-GEMM Triton kernel against the usual ways to run MoE
experts, in one run.

    python benchmarks/moe_bench.py                # GPU: Mixtral-like experts (d 4096, f 14336)
    python benchmarks/moe_bench.py --cpu          # tiny shapes under the Triton interpreter
    python benchmarks/moe_bench.py --no-inductor  # skip torch.compile (its compile is slow)

Per token count it times, on the same inputs and weights:
  grouped   codegen/triton/kernels/moe_dispatch.py: pairs sorted by expert, two grouped-GEMM
            launches (gate fused into the first, routing weight into the second), index_add
  loop      a Python loop over experts, each on its own tokens (what HF Mixtral does)
  dense     every expert on every token (two bmm), combined with a [T, E] gate matrix
  inductor  torch.compile of `loop` (dynamic shapes), or why it did not compile
and prints each time, the ratios (other / grouped: > 1 means grouped is faster) and the max
error of each against the fp64 loop. The last line is

    grouped-gemm vs eager loop: R×; vs inductor: R×

for the largest token count (vs inductor: n/a when it was skipped or failed). On the GPU the
times come from triton.testing.do_bench; without one (or with --cpu) from perf_counter medians
on tiny shapes under the Triton interpreter, where the kernel runs in numpy one program at a
time and is not expected to be fast: those lines show that the paths run and agree, not
performance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPU = dict(d=4096, f=14336, experts=8, top_k=2, tokens=[128, 512, 2048])  # Mixtral-8x7B MLP
CPU = dict(d=32, f=64, experts=8, top_k=2, tokens=[16, 64])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes under the Triton interpreter")
    p.add_argument("--tokens", type=int, nargs="*", help="token counts (default by device)")
    p.add_argument("--d", type=int, help="model width")
    p.add_argument("--f", type=int, help="expert inner width")
    p.add_argument("--experts", type=int)
    p.add_argument("--no-inductor", action="store_true", help="skip torch.compile of the loop")
    return p.parse_args(argv)


def loop_experts(x, weights, ids, w_in, w_out):
    """HF Mixtral's block: for each expert, gather its tokens, run its MLP, index_add back.
    Weights "kn" with fused [gate; up]."""
    import torch
    import torch.nn.functional as F

    y = torch.zeros_like(x)
    for e in range(w_in.shape[0]):
        tok, slot = torch.where(ids == e)
        gate, up = (x[tok] @ w_in[e]).chunk(2, dim=-1)
        out = (F.silu(gate) * up) @ w_out[e]
        y.index_add_(0, tok, out * weights[tok, slot, None].to(x.dtype))
    return y


def dense_experts(x, weights, ids, w_in, w_out):
    """Every expert on every token, then zero weights for the unrouted pairs."""
    import torch
    import torch.nn.functional as F

    e = w_in.shape[0]
    h = torch.bmm(x.unsqueeze(0).expand(e, -1, -1), w_in)
    gate, up = h.chunk(2, dim=-1)
    out = torch.bmm(F.silu(gate) * up, w_out)  # [E, T, d]
    mix = torch.zeros(x.shape[0], e, dtype=x.dtype, device=x.device)
    mix.scatter_(1, ids, weights.to(x.dtype))
    return torch.einsum("etd,te->td", out, mix)


def timer(cuda: bool):
    if cuda:
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50)

    def cpu_ms(fn, reps: int = 3) -> float:  # fn has run once already (warm)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_ms


def make_inputs(t, cfg, device, dtype, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    d, f, e, k = cfg["d"], cfg["f"], cfg["experts"], cfg["top_k"]
    x = torch.randn(t, d, generator=g).to(device, dtype)
    w, ids = torch.randn(t, e, generator=g).softmax(-1).topk(k, dim=-1)
    w_in = (torch.randn(e, d, 2 * f, generator=g) / d ** 0.5).to(device, dtype)
    w_out = (torch.randn(e, f, d, generator=g) / f ** 0.5).to(device, dtype)
    return x, (w / w.sum(-1, keepdim=True)).to(device), ids.to(device), w_in, w_out


def bench_tokens(t, cfg, cuda, inductor, bench) -> dict:
    import torch

    from meshweave.codegen.triton.kernels.moe_dispatch import moe_experts_grouped

    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    x, w, ids, w_in, w_out = make_inputs(t, cfg, device, dtype)

    def grouped():
        return moe_experts_grouped(x, w, ids, w_in, None, w_out, act="silu", layout="kn",
                                   fused_gate_up=True)[0]

    sides = {"grouped": grouped, "loop": lambda: loop_experts(x, w, ids, w_in, w_out),
             "dense": lambda: dense_experts(x, w, ids, w_in, w_out)}
    if inductor is not None:
        sides["inductor"] = lambda: inductor(x, w, ids, w_in, w_out)
    want = loop_experts(x.double(), w, ids, w_in.double(), w_out.double())
    row, errs, notes = {"T": t}, {}, {}
    for name, fn in sides.items():
        try:
            got = fn()  # compiles / warms up, untimed
        except Exception as e:  # noqa: BLE001  inductor may fail on data-dependent shapes
            if name != "inductor":
                raise
            notes[name] = f"did not compile ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            continue
        errs[name] = (got.double() - want).abs().max().item()
        row[name] = bench(fn)
    scale = want.abs().max().item()
    tol = (2e-2 if dtype == torch.bfloat16 else 1e-4) * max(1.0, scale)
    row["matched"] = all(err <= tol for err in errs.values())
    parts = [f"{n} {row[n]:.3f} ms (err {errs[n]:.1e})" for n in sides if n in row]
    parts += [f"{n} {why}" for n, why in notes.items()]
    ratios = [f"{n}/grouped {row[n] / row['grouped']:.3g}x" for n in sides if n in row
              and n != "grouped"]
    print(f"T={t} d={cfg['d']} f={cfg['f']} E={cfg['experts']} k={cfg['top_k']}: "
          + ", ".join(parts) + "; " + ", ".join(ratios)
          + f"; outputs matched: {'yes' if row['matched'] else 'NO'}", flush=True)
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    if not cuda:
        torch.set_num_threads(1)  # the interpreter is single-threaded; a shared CPU stays calm
    cfg = dict(GPU if cuda else CPU)
    for key in ("d", "f", "experts"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    tokens = args.tokens or cfg["tokens"]
    dev = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    print(f"moe_bench: moe.experts, fused SiLU-gated experts, on {dev}, torch "
          f"{torch.__version__}, timed by {'do_bench' if cuda else 'perf_counter'}")
    if not cuda:
        print("note: under the interpreter the grouped kernel runs in numpy and is not expected "
              "to be fast; these times are not a performance measurement")
    inductor = None if args.no_inductor else torch.compile(loop_experts, dynamic=True)
    rows = [bench_tokens(t, cfg, cuda, inductor, timer(cuda)) for t in tokens]
    last = rows[-1]
    vs_inductor = (f"{last['inductor'] / last['grouped']:.3g}×" if "inductor" in last
                   else "n/a (skipped)" if inductor is None else "n/a (did not compile)")
    ok = all(r["matched"] for r in rows)
    print(f"all outputs matched the fp64 loop: {'yes' if ok else 'NO'}")
    print(f"speedups below: the other path's time / grouped time at T={last['T']} "
          f"(> 1: the grouped kernel is faster)")
    print(f"grouped-gemm vs eager loop: {last['loop'] / last['grouped']:.3g}×; "
          f"vs inductor: {vs_inductor}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
