"""The ONNX target: export.py is the entry point (export_onnx, run_manifest).

  export.py        export_onnx: one file without a plan, per-rank segments with one
  single.py        one Graph -> one .onnx file through torch.onnx; verify_onnx, run_onnx
  partition.py     per-rank programs cut at collectives, the manifest, its numpy runner
  translations.py  custom translations (ONNX_TRANSLATIONS) for ops torchlib lacks

May import: meshweave.ir, runtime/reference.py, passes/parallel/lower/ (per-rank programs).
"""
