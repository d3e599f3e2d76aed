"""Triton kernel templates, one module per kernel family, each with its rule table.

  pointwise.py        a fused chain of elementwise ops over one output shape
  reduction.py        reductions and norms (REDUCTIONS): sum, mean, amax, var, softmax, LayerNorm
  matmul.py           a tl.dot template with a fused epilogue (MATMULS)
  flash_attention.py  flash attention forward (ATTENTION)
  quant_matmul.py     weight-only int4/int8 GEMM for quant.linear, split-K (QUANT_MATMULS)

May import: meshweave.ir and the shared pieces of codegen/triton/ (emitter, indexing,
tvalues, lowering); never schedule.py or wrapper.py, which import these.
"""
