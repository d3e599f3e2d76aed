"""The Triton backend: IR -> fused Triton kernels and one generated Python module per graph.

Pipeline: schedule.py groups nodes into kernels (fusion rules by op, via RuleTables) -> the
templates in kernels/ emit one Triton kernel per group (pointwise.py, reduction.py, matmul.py,
flash_attention.py, flash_attention_bwd.py (training), quant_matmul.py, grouped_gemm.py + moe_dispatch.py for moe.experts;
emitter.py is the body emitter they share, lowering.py
turns one op into a Triton expression (lowering_grads.py: the activation backwards), indexing.py views into index arithmetic, tvalues.py
typed expressions) ->
memory_plan.py reuses dead buffers -> wrapper.py writes a module with a call() that allocates
buffers and launches the kernels -> cache.py stores it on disk, keyed by the graph and versions
-> runtime.py serves call() at run time (launch sizes, the matmul template-vs-cuBLAS choice,
the reference executor for uncompiled nodes); fast_launch.py and precompile.py make launches
cheap, cuda_graphs.py replays them from a CUDA graph. mode.py settles GPU or interpreter before
triton is imported. gqa.py and causal_mask.py are IR rewrites that let attention read grouped
K/V heads and constant causal masks directly.

Rule tables (ir.registry.RuleTable, keyed by op name): LOWERINGS "triton_lowering"
(pointwise and indexed ops -> Triton expressions), VIEW_INDEX "triton_view_index" (views ->
index maps), REDUCTIONS "triton_reduction", MATMULS "triton_matmul", ATTENTION
"triton_attention", ATTENTION_TRAINING "triton_attention_training", QUANT_MATMULS "triton_quant_matmul" (quant.linear), MOE_KERNELS
"triton_moe_experts" (moe.experts: two grouped-GEMM launches). An op in none of
them runs through the reference executor and is listed with the reason in explain() and the
dump (kernels.txt). New kernels (a pass family's) go in
kernels/ and register in these tables.

May import: meshweave.ir, runtime/reference.py, passes/ (dce), codegen/folding.py.
"""
