"""A user's quantized inference script under torchrun, Python API only (tests/test_quant_parallel.py).

    torchrun --standalone --nproc-per-node 2 tests/torchrun_quant.py tp=2 --quantize w4g32 \
        --quant-skip down_proj

Every rank builds the same seeded model and compiles it twice with the same QuantConfig: on one
device, and with mesh= (tensor parallel over the packed weights). It compares the outputs of
the two, the packed tensors gathered back by cm.state_dict() with the single-device graph's
(bit for bit: the shards are row/column slices of the int32 words), and counts the bytes of
packed weights this rank holds. Rank 0 prints the figures; exit 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.distributed as dist

import meshweave
from meshweave.models import build_model

TOL = 1e-5  # fp32 outputs of magnitude ~1: only the all-reduce's summation order differs


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mesh")
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--quantize", default="w4g32")
    ap.add_argument("--quant-skip", default="")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    model, inputs = build_model(args.model, batch=2, seq=8)
    model.eval()
    skip = tuple(s for s in args.quant_skip.split(",") if s)
    config = meshweave.QuantConfig.parse(args.quantize, skip=skip)
    with torch.no_grad():
        single = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
            quantize=config, backend="eager"))
        want = single(*inputs)
        cm = meshweave.compile(model, inputs, options=meshweave.CompileOptions(
            quantize=config, mesh=meshweave.DeviceMesh.parse(args.mesh)))
        got = cm(*inputs)
    err = float((got - want).abs().max())
    state = cm.state_dict()
    packed = {v.target: single.graph.tensors[v.name] for v in single.graph.inputs
              if v.kind == "param" and v.target and v.target.endswith((".qweight", ".scales",
                                                                        ".zeros"))}
    bad_packed = sorted(k for k, t in packed.items()
                        if k not in state or not torch.equal(state[k], t))
    mine = dict(cm._rank.named_parameters()) if cm._rank is not None else {}
    held = sum(p.numel() * p.element_size() for k, p in mine.items() if k in packed)
    full = sum(t.numel() * t.element_size() for t in packed.values())
    splits = {}
    for n in cm.graph.nodes:
        if n.op == "quant.linear":
            pl = cm.plan.placements.get(n.outputs[0].name, ())
            kind = "row" if "P" in pl else "col" if any(p.startswith("S") for p in pl) else "R"
            splits[kind] = splits.get(kind, 0) + 1
    if dist.get_rank() == 0:
        print(f"plan: {cm.plan.num_stages} stage(s) x {cm.plan.meshes_text()}")
        print(f"quant.linear splits: {dict(sorted(splits.items()))}")
        print(f"rank 0 holds {held} of {full} packed weight bytes")
        print(f"max |tp - single device| = {err:.3e}")
        print(f"packed tensors not gathered back bit for bit: {bad_packed}")
    dist.destroy_process_group()
    return 0 if err <= TOL and not bad_packed and 0 < held < full else 1


if __name__ == "__main__":
    sys.exit(main())
