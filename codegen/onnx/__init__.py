"""The ONNX target: export.py is the entry point (export_onnx, run_manifest).

  export.py        export_onnx: one file without a plan, per-rank segments with one
  single.py        one Graph -> one .onnx file through torch.onnx; verify_onnx, run_onnx
  partition.py     per-rank programs cut at collectives, the manifest, its numpy runner
  translations.py  custom translations (ONNX_TRANSLATIONS) for ops torchlib lacks
  matmul_nbits.py  quant.linear -> com.microsoft::MatMulNBits (a dequantize fallback for 3 bits)
  scalars.py       non-tensor user inputs (use_cache=False) folded as constants of the trace
  shards.py        export_sharded: per-rank files from each rank's shards only, rank by rank
                   (big and meta-traced models; `meshweave export --checkpoint/--init-seed`)
  weights.py       where those shards come from: safetensors / weights.pt slices, seeded init

May import: meshweave.ir (packing.py and ops/quant.py for quantized linears),
runtime/reference.py, passes/parallel/lower/ (per-rank programs), runtime/distributed/
checkpoint.py (weights.py reads the runtime's weights.pt).
"""
