"""The core op set: the ops meshweave's registry knows, with shape and cost rules.

The frontend decomposes a torch.export trace to torch's Core ATen IR (the documented set in
torch/_decomp, `torch.export.default_decompositions()`), keeping three higher-level ops whole
because later passes exploit them: aten.linear (Megatron row/column parallelism, matmul
epilogues), aten.scaled_dot_product_attention (flash attention, head sharding) and
aten.embedding (vocab-parallel embedding). Size arithmetic on SymInts uses the `sym.*` ops.

Modules, by op category:
  pointwise.py   elementwise and type-conversion ops (broadcasting shape rule)
  reductions.py  sum/mean/amax/softmax/layer_norm and friends
  shape_ops.py   views, reshapes, permutes, slicing, concatenation, indexing
  linalg.py      mm/bmm/addmm/linear/sdpa/convolution/embedding
  attention.py   meshweave.attention(_backward): the training step's attention pair (torch ops)
  misc.py        tensor creation, random-free utilities and SymInt arithmetic
  quant.py       quant.linear: weight-only quantized linear on packed int2/3/4/8 weights
  moe.py         moe.experts: MoE dispatch, expert MLPs and combine (sparse, dropless)
  moe_ep.py      moe.experts_ep: its expert-parallel form in per-rank programs (all_to_all)
"""

from . import collectives, linalg, misc, moe, moe_ep, pointwise  # noqa: F401
from . import attention, quant, reductions, shape_ops  # noqa: F401
