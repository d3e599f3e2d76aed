"""Benchmark: meshweave's W4A16 GEMM (codegen/triton/kernels/quant_matmul.py) against fp16
cuBLAS and torch's int4 kernel, in one run.

    python benchmarks/quant_bench.py           # GPU: K=N=8192 and llama-7B's linears
    python benchmarks/quant_bench.py --cudagraph  # GPU, each side replayed from a CUDA graph
    python benchmarks/quant_bench.py --cpu     # tiny shapes under the Triton interpreter

Per (K, N) shape and M in 1..256 it times, with triton.testing.do_bench on the GPU:
  ours        quant_matmul(x fp16, int4 g128 asymmetric weights) (autotuned on its first call)
  cublas      torch.matmul(x, W) with W the same weight dequantized to fp16 [K, N]
  torch_int4  torch.ops.aten._weight_int4pack_mm (bf16 activations: what it takes on CUDA)
              on the same codes, or 'unavailable: reason' where this torch lacks it or its
              signature differs,
and prints the times, the speedups (cublas / ours, torch_int4 / ours) and the max error of ours
and of torch_int4 against an fp32 matmul on the dequantized weight. do_bench times include
whatever host launch time its L2 flush between calls does not hide (quant_matmul checks its
inputs in Python on every call); --cudagraph removes host time from all three sides. The last lines give the worst
speedup per M bucket against issue 15's goals: >= 3.0x cuBLAS at M <= 16, >= 2.0x at 32,
>= 1.3x at 64, >= 1.0x at >= 128, and faster than torch int4 at every M.

Without a GPU (or with --cpu) the same lines come from tiny shapes under the Triton
interpreter (fp32 activations, perf_counter medians): they show that the script and the kernel
run; interpreter times say nothing about GPU performance.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GPU_SHAPES = [(8192, 8192), (4096, 4096), (4096, 11008), (11008, 4096)]  # (K, N)
CPU_SHAPES = [(128, 64), (64, 48)]  # interpreter time grows with the tile count
M_VALUES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
GROUP = 128
# (M bucket label, predicate, minimum speedup over cuBLAS) -- issue 15
GOALS = [("M<=16", lambda m: m <= 16, 3.0), ("M=32", lambda m: m == 32, 2.0),
         ("M=64", lambda m: m == 64, 1.3), ("M>=128", lambda m: m >= 128, 1.0)]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny shapes under the Triton interpreter")
    p.add_argument("--m", type=int, nargs="*", default=M_VALUES, help="M values to time")
    p.add_argument("--cudagraph", action="store_true",
                   help="GPU: time every side replayed from a CUDA graph (no host launch time)")
    return p.parse_args(argv)


def make_weights(k: int, n: int, device, dtype):
    """int4 codes [K, N] with g128 asymmetric scales/zeros, packed for our kernel."""
    import torch

    from meshweave.ir.packing import dequantize, pack

    g = torch.Generator().manual_seed(k * 7 + n)
    codes = torch.randint(0, 16, (k, n), generator=g, dtype=torch.int32)
    group = min(GROUP, k)
    scales = ((torch.rand(k // group, n, generator=g) + 0.5) / 64).to(dtype)
    zeros = torch.randint(0, 16, (k // group, n), generator=g, dtype=torch.uint8)
    qw = pack(codes, 4)
    w = dequantize(qw, scales, zeros, 4, group, dtype=dtype)
    return [t.to(device) for t in (codes, qw, scales, zeros, w)] + [group]


def torch_int4(codes, scales, zeros, group, cuda: bool):
    """A callable x -> x @ W through aten's int4 kernel, or the reason it is unavailable.
    aten dequantizes (q - 8) * scale + zero, so zero = (8 - z) * scale is our (q - z) * scale."""
    import torch

    act = torch.bfloat16 if cuda else torch.float32
    sz = torch.stack([scales.float(), (8 - zeros.float()) * scales.float()], dim=-1)
    sz = sz.to(act).contiguous()
    codes_nk = codes.t().contiguous()
    errors = []
    if cuda:
        convert, mm = torch.ops.aten._convert_weight_to_int4pack, torch.ops.aten._weight_int4pack_mm
        packed_u8 = ((codes_nk[:, ::2] << 4) | codes_nk[:, 1::2]).to(torch.uint8)
        candidates = [packed_u8, codes_nk]  # uint8 [N, K/2] since torch 2.5, int32 before
    else:
        convert = getattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu", None)
        mm = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
        if convert is None or mm is None:
            return None, "unavailable: this torch has no CPU int4 pack/mm ops"
        candidates = [codes_nk]
    for w in candidates:
        try:
            packed = convert(w, 8)

            def run(x, packed=packed):
                return mm(x, packed, group, sz)

            run(torch.zeros(1, codes.shape[0], dtype=act, device=codes.device))
            return (run, act), ""
        except Exception as e:  # noqa: BLE001  the op's signature differs by torch version
            errors.append(f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return None, "unavailable: " + " | ".join(errors)


def timer(cuda: bool, graphs: bool):
    if cuda:
        import triton.testing

        if graphs:  # no host time at all: the kernels replayed from a CUDA graph
            return lambda fn: triton.testing.do_bench_cudagraph(fn, rep=100)
        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu_ms(fn, reps: int = 2) -> float:  # the caller has already run fn once (warm)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    return cpu_ms


def bench_shape(k: int, n: int, ms: list[int], cuda: bool, graphs: bool, rows: list[dict]):
    import torch

    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    codes, qw, scales, zeros, w, group = make_weights(k, n, device, dtype)
    int4, why = torch_int4(codes, scales, zeros, group, cuda)
    if int4 is None:
        print(f"K={k} N={n}: torch_int4 {why}")
    bench = timer(cuda, graphs)
    for m in ms:
        rows.append(bench_m(k, n, m, (qw, scales, zeros, w, group), int4, bench, dtype, device))


def bench_m(k, n, m, weights, int4, bench, dtype, device) -> dict:
    import torch

    from meshweave.codegen.triton.kernels.quant_matmul import quant_matmul

    qw, scales, zeros, w, group = weights
    x = torch.randn(m, k, device=device, dtype=dtype)
    ref = torch.matmul(x.float(), w.float())
    got = quant_matmul(x, qw, scales, zeros, None, 4, group)  # autotunes on the GPU, untimed
    err = (got.float() - ref).abs().max().item()
    row = {"K": k, "N": n, "M": m,
           "ours": bench(lambda: quant_matmul(x, qw, scales, zeros, None, 4, group)),
           "cublas": bench(lambda: torch.matmul(x, w)), "int4": None}
    i4, i4x, i4e = "unavailable", "", ""
    if int4 is not None:
        run, act = int4
        xa = x.to(act)  # converted outside the timed call
        row["int4"] = bench(lambda: run(xa))
        i4 = f"{row['int4']:.4f} ms"
        i4x = f", vs torch_int4 {row['int4'] / row['ours']:.2f}x"
        i4e = f", torch_int4 err {(run(xa).float() - ref).abs().max():.2e}"
    print(f"K={k} N={n} M={m}: ours {row['ours']:.4f} ms, cublas {row['cublas']:.4f} ms, "
          f"torch_int4 {i4}; speedup vs cublas {row['cublas'] / row['ours']:.2f}x{i4x} "
          f"(ours err {err:.2e}{i4e})", flush=True)
    return row


def summary(rows: list[dict], cuda: bool) -> list[str]:
    lines = []
    for label, pick, goal in GOALS:
        sel = [r for r in rows if pick(r["M"])]
        if not sel:
            continue
        worst = min(sel, key=lambda r: r["cublas"] / r["ours"])
        s = worst["cublas"] / worst["ours"]
        with_i4 = [r for r in sel if r["int4"] is not None]
        i4 = (f"; worst vs torch_int4 {min(r['int4'] / r['ours'] for r in with_i4):.2f}x "
              f"(goal > 1.00x)" if with_i4 else "; torch_int4 unavailable")
        verdict = ("met" if s >= goal and all(r["int4"] > r["ours"] for r in with_i4)
                   else "MISSED") if cuda else "not judged (interpreter)"
        lines.append(f"{label}: worst speedup vs cublas {s:.2f}x at K={worst['K']} N={worst['N']} "
                     f"M={worst['M']} (goal >= {goal:.1f}x){i4}: {verdict}")
    note = "" if cuda else " [Triton interpreter on CPU: not a performance measurement]"
    return [f"summary{note}:"] + ["  " + x for x in lines]


def main(argv=None) -> int:
    args = parse_args(argv)
    if "triton" not in sys.modules:
        import torch

        cuda = torch.cuda.is_available() and not args.cpu
        if not cuda:
            os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    else:
        import torch

        cuda = torch.cuda.is_available() and not args.cpu
    if not cuda:
        torch.set_num_threads(1)  # the interpreter is single-threaded; a shared CPU stays calm
    dev = torch.cuda.get_device_name() if cuda else "CPU (Triton interpreter)"
    how = "CUDA-graph replay" if cuda and args.cudagraph else "do_bench" if cuda else "perf_counter"
    print(f"quant_bench: W4A16 g{GROUP} on {dev}, torch {torch.__version__}, timed by {how}")
    if not cuda:
        print("  on the CPU 'cublas' is torch.matmul in fp32 and torch_int4 aten's CPU int4 op")
    rows: list[dict] = []
    for k, n in GPU_SHAPES if cuda else CPU_SHAPES:
        bench_shape(k, n, args.m, cuda, args.cudagraph, rows)
    print("\n".join(summary(rows, cuda)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
