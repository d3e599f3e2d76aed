"""The MLIR target: dump.py prints the IR (or a rank's program) as MLIR through torch-mlir.

May import: meshweave.ir, runtime/reference.py and codegen/onnx/single.py (the IR rebuilt as
torch.fx, which torch-mlir's FX importer reads).
"""
