"""Triton kernel templates, one module per kernel family, each with its rule table.

  pointwise.py        a fused chain of elementwise ops over one output shape
  reduction.py        reductions and norms (REDUCTIONS): sum, mean, amax, var, softmax, LayerNorm
  matmul.py           a tl.dot template with a fused epilogue (MATMULS)
  flash_attention.py  flash attention forward (ATTENTION; with STORE_LSE its logsumexp)
  flash_attention_bwd.py  training attention (ATTENTION_TRAINING): meshweave.attention's
                      launcher and its backward's dK/dV and dQ kernels
  quant_matmul.py     weight-only int4/int8 GEMM for quant.linear, split-K (QUANT_MATMULS)
  grouped_gemm.py     one launch for every expert's GEMM over rows sorted by expert
  moe_dispatch.py     moe.experts on it: sort, gated up + down launches, combine (MOE_KERNELS)

May import: meshweave.ir and the shared pieces of codegen/triton/ (emitter, indexing,
tvalues, lowering); never schedule.py or wrapper.py, which import these.
"""
