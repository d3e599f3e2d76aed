"""A training step (forward, backward, AdamW) through meshweave, eager and torch.compile.

    python benchmarks/train_bench.py                 # GPU: GPT-2 small and a llama-1B-class
                                                     # config in bf16; CPU: tiny configs
    python benchmarks/train_bench.py --tiny --skip-inductor --steps 3   # the CI smoke run

Every configuration runs the three competitors in the same process on the same weights and
batch: eager PyTorch, `torch.compile` (default mode, Inductor) and `meshweave.compile(...,
CompileOptions(training=True))` (the joint forward+backward IR; backend triton on a GPU, on
the CPU the eager backend's generated Python, runtime/python_runner.py). Each prints its cold compile time (the first step, trace and
codegen included) and its median step time over the timed steps; the summary line per
configuration is

    train_bench <model>: step meshweave A ms, eager B ms, torch.compile C ms; meshweave /
    torch.compile D; cold compile meshweave E s, torch.compile F s (ratio G)

The goal (issue 13): a step no slower than torch.compile's, a cold compile at most half.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# cold means cold: Inductor's on-disk caches (FX graphs, kernels) start empty in each run
# unless the caller points TORCHINDUCTOR_CACHE_DIR somewhere (before torch is imported)
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="train_bench_inductor_")


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def configs(tiny: bool, device: str):
    """(name, model, token ids) of each configuration."""
    import torch
    from meshweave.models.gpt import GPT, GPTConfig
    from meshweave.models.llama import Llama, LlamaConfig

    if tiny:
        gpt = GPTConfig(vocab_size=128, max_seq_len=32, hidden_size=64, num_layers=2,
                        num_heads=4)
        llama = LlamaConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                            num_kv_heads=2, ffn_hidden_size=176, max_seq_len=32)
        batch, seq = 2, 16
    else:
        gpt = GPTConfig(vocab_size=50257, max_seq_len=1024, hidden_size=768, num_layers=12,
                        num_heads=12)
        llama = LlamaConfig(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                            num_kv_heads=8, ffn_hidden_size=8192, max_seq_len=2048)
        batch, seq = 4, 1024
    out = []
    for name, cls, cfg in (("gpt2-small" if not tiny else "gpt-tiny", GPT, gpt),
                           ("llama-1b" if not tiny else "llama-tiny", Llama, llama)):
        torch.manual_seed(0)
        model = cls(cfg).to(device)
        ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
        out.append((name, model, ids))
    return out


def _loss(logits, ids):
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           ids[:, 1:].reshape(-1))


def time_steps(fn, model, ids, steps: int, device: str) -> tuple[float, float]:
    """(seconds of the first step, median seconds of the rest) of fn = a callable model."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        _loss(fn(ids), ids).backward()
        opt.step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times[0], statistics.median(times[1:]) if len(times) > 1 else times[0]


def bench(name, model, ids, args, device: str) -> dict:
    import torch

    import meshweave

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = model.to(dtype).train()
    row: dict = {"model": name, "device": device, "dtype": str(dtype).split(".")[-1]}
    eager = copy.deepcopy(model)
    _, row["eager_ms"] = time_steps(eager, eager, ids, args.steps, device)
    row["eager_ms"] *= 1e3
    if not args.skip_inductor:
        ind = copy.deepcopy(model)
        compiled = torch.compile(ind)
        cold, step = time_steps(compiled, ind, ids, args.steps, device)
        row["inductor_ms"], row["inductor_cold_s"] = step * 1e3, cold
    mw = copy.deepcopy(model)
    backend = "triton" if device == "cuda" else None
    t0 = time.perf_counter()
    cm = meshweave.compile(mw, (ids,), options=meshweave.CompileOptions(training=True,
                                                                           backend=backend))
    compile_s = time.perf_counter() - t0
    cold, step = time_steps(cm, mw, ids, args.steps, device)
    row["mw_ms"], row["mw_cold_s"] = step * 1e3, compile_s + cold
    row["mw_backend"] = cm.backend
    row["mw_vs_eager"] = row["mw_ms"] / row["eager_ms"]
    if "inductor_ms" in row:
        row["mw_vs_inductor"] = row["mw_ms"] / row["inductor_ms"]
        row["cold_vs_inductor"] = row["mw_cold_s"] / row["inductor_cold_s"]
    return row


def summary(r: dict) -> str:
    ind = (f"{r['inductor_ms']:.2f} ms" if "inductor_ms" in r else "skipped")
    ratio = f"{r['mw_vs_inductor']:.2f}" if "mw_vs_inductor" in r else "-"
    ind_cold = f"{r['inductor_cold_s']:.1f} s" if "inductor_cold_s" in r else "skipped"
    cold_ratio = f"{r['cold_vs_inductor']:.2f}" if "cold_vs_inductor" in r else "-"
    return (f"train_bench {r['model']}: step meshweave {r['mw_ms']:.2f} ms, eager "
            f"{r['eager_ms']:.2f} ms, torch.compile {ind}; meshweave / torch.compile {ratio}; "
            f"cold compile meshweave {r['mw_cold_s']:.1f} s, torch.compile {ind_cold} "
            f"(ratio {cold_ratio})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="tiny configs (the default on CPU)")
    p.add_argument("--steps", type=int, default=6, help="steps per competitor (first is cold)")
    p.add_argument("--skip-inductor", action="store_true",
                   help="leave torch.compile out (its CPU C++ build takes minutes on 2 cores)")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is the cold one)")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    tiny = args.tiny or device == "cpu"
    print(f"train_bench on {torch.cuda.get_device_name() if device == 'cuda' else 'cpu'}, "
          f"torch {torch.__version__}, {'tiny' if tiny else 'full'} configs, {args.steps} steps")
    rows = []
    for name, model, ids in configs(tiny, device):
        r = bench(name, model, ids, args, device)
        rows.append(r)
        print(json.dumps(r), flush=True)
    for r in rows:
        assert all(math.isfinite(v) for v in r.values() if isinstance(v, float)), r
        print(summary(r))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
