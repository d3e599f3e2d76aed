"""End-to-end decode tokens/s of a llama model, fp16 weights against W4 (int4, group 128), both
through `meshweave.compile()` and `CompiledModel.generate` (issue 15's end-to-end figure).

    python benchmarks/quant_decode.py            # CUDA: a llama-1B-class model (random weights),
                                                 # fp16, backend="triton"
    python benchmarks/quant_decode.py --cpu      # llama-tiny-sized, fp32, eager backend: shows
                                                 # that it runs, not the speed of the kernels

Both sides generate the same greedy tokens from the same prompts; each runs once to compile
its prefill/decode programs, then is timed. W4's tokens are checked against the
dequantized-weights model (the oracle), fp16's are printed for reference (4-bit weights change
the argmax sometimes). Last line: `decode tokens/s fp16 T1, W4 T2: ratio R` (fp32 on CPU).
"""

from __future__ import annotations

import argparse
import time

import torch

import meshweave
from meshweave.models.llama import Llama, LlamaConfig
from meshweave.passes.quant import dequantized_model

# llama-3.2-1B's shape (16 layers, hidden 2048, GQA 32/8, ffn 8192), vocab cut to 32000
LLAMA_1B = dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_heads=32,
                num_kv_heads=8, ffn_hidden_size=8192, max_seq_len=512)
TINY = dict(vocab_size=256, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            ffn_hidden_size=256, max_seq_len=128)


def greedy_oracle(model, prompts, n: int) -> list[list[int]]:
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device=next(model.parameters()).device)
            for _ in range(n):
                ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
            out.append(ids[0, len(p):].tolist())
    return out


def run(model, prompts, n: int, options) -> tuple[float, list[list[int]], object]:
    with torch.no_grad():
        cm = meshweave.compile(model, (torch.tensor([prompts[0]], device=args_device(model)),),
                               options=options)
    cm.generate(prompts, n)  # compiles the prefill and decode programs
    t0 = time.perf_counter()
    out = cm.generate(prompts, n)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return sum(len(t) for t in out.tokens) / seconds, out.tokens, cm


def args_device(model) -> torch.device:
    return next(model.parameters()).device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="tiny model on CPU (default without CUDA)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=None)
    p.add_argument("--quantize", default="w4g128")
    args = p.parse_args()
    cpu = args.cpu or not torch.cuda.is_available()
    torch.manual_seed(0)
    cfg = LlamaConfig(**(TINY if cpu else LLAMA_1B))
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.float16)
    model = Llama(cfg).to(device=device, dtype=dtype).eval()
    n = args.new_tokens or (8 if cpu else 128)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, cfg.vocab_size, (args.prompt_len,), generator=g).tolist()
               for _ in range(args.batch)]
    backend = "eager" if cpu else "triton"
    base = meshweave.CompileOptions(backend=backend)
    quant = base.replace(quantize=meshweave.QuantConfig.parse(args.quantize))
    fp_tps, fp_tokens, _ = run(model, prompts, n, base)
    q_tps, q_tokens, cm = run(model, prompts, n, quant)
    oracle = greedy_oracle(dequantized_model(model, cm.graph), prompts, n)
    if not cpu and q_tokens != oracle:
        # fp16 kernels may break an argmax tie differently: report, do not hide it
        same = sum(a == b for t, o in zip(q_tokens, oracle) for a, b in zip(t, o))
        print(f"W4 tokens vs dequantized oracle: {same}/{n * len(prompts)} equal")
    elif q_tokens != oracle:
        raise SystemExit(f"W4 tokens {q_tokens} differ from the dequantized oracle {oracle}")
    where = "cpu fp32 eager (tiny)" if cpu else f"{torch.cuda.get_device_name()} fp16 triton"
    print(f"model {'tiny' if cpu else 'llama-1B-class'} on {where}, batch {args.batch}, "
          f"{n} new tokens, {args.quantize}")
    print(f"fp tokens == W4 tokens: {fp_tokens == q_tokens}")
    fp = "fp32" if cpu else "fp16"
    print(f"decode tokens/s {fp} {fp_tps:.1f}, W4 {q_tps:.1f}: ratio {q_tps / fp_tps:.2f}")


if __name__ == "__main__":
    main()
