"""Views and data movement: view/reshape, permute, expand, slicing, cat, gather, indexing.

These cost no FLOPs; codegen turns most of them into index arithmetic.
"""

from __future__ import annotations

import sympy
import torch

from ..registry import register_op
from ..types import TensorType, simplify_dim
from .common import as_dim, norm_dim, numel


def _zero_flops(args, kwargs, outs):
    return 0


def _view(name: str, rule, category: str = "view") -> None:
    register_op(name, shape=rule, flops=_zero_flops, category=category)


def _resolve_view_shape(x: TensorType, sizes) -> tuple:
    sizes = [as_dim(s) for s in sizes]
    if sum(1 for s in sizes if isinstance(s, int) and s == -1) > 1:
        raise ValueError(f"view shape {sizes} has more than one -1")
    if any(isinstance(s, int) and s == -1 for s in sizes):
        known = numel([s for s in sizes if not (isinstance(s, int) and s == -1)])
        missing = simplify_dim(sympy.sympify(numel(x.shape)) / known)
        sizes = [missing if (isinstance(s, int) and s == -1) else s for s in sizes]
    if simplify_dim(sympy.sympify(numel(sizes)) - numel(x.shape)) != 0:
        raise ValueError(f"cannot view {x} as {sizes}: element counts differ")
    return tuple(simplify_dim(s) if isinstance(s, sympy.Expr) else s for s in sizes)


def _view_rule(x, sizes):
    return [x.with_shape(_resolve_view_shape(x, sizes))]


_view("aten.view.default", _view_rule)
_view("aten.reshape.default", _view_rule)
_view("aten._unsafe_view.default", _view_rule)


def _permute_rule(x, dims):
    dims = [norm_dim(d, x.rank) for d in dims]
    if sorted(dims) != list(range(x.rank)):
        raise ValueError(f"permute dims {dims} are not a permutation of rank {x.rank}")
    return [x.with_shape([x.shape[d] for d in dims])]


_view("aten.permute.default", _permute_rule)


def _transpose_rule(x, d0, d1):
    dims = list(range(x.rank))
    a, b = norm_dim(d0, x.rank), norm_dim(d1, x.rank)
    dims[a], dims[b] = dims[b], dims[a]
    return [x.with_shape([x.shape[d] for d in dims])]


_view("aten.transpose.int", _transpose_rule)
_view("aten.t.default", lambda x: [x.with_shape(list(reversed(x.shape)))])


def _expand_rule(x, sizes, *, implicit=False):
    sizes = [as_dim(s) for s in sizes]
    lead = len(sizes) - x.rank
    out = []
    for i, s in enumerate(sizes):
        if isinstance(s, int) and s == -1:
            out.append(x.shape[i - lead])
        else:
            out.append(s)
    return [x.with_shape(out)]


_view("aten.expand.default", _expand_rule)


def _unsqueeze_rule(x, dim):
    d = norm_dim(dim, x.rank + 1)
    shape = list(x.shape)
    shape.insert(d, 1)
    return [x.with_shape(shape)]


_view("aten.unsqueeze.default", _unsqueeze_rule)


def _squeeze_rule(x, dims=None):
    if dims is None:
        dims = [i for i, s in enumerate(x.shape) if s == 1]
    if isinstance(dims, int):
        dims = [dims]
    dims = {norm_dim(d, x.rank) for d in dims}
    return [x.with_shape([s for i, s in enumerate(x.shape) if not (i in dims and s == 1)])]


_view("aten.squeeze.dim", _squeeze_rule)
_view("aten.squeeze.dims", _squeeze_rule)
_view("aten.squeeze.default", _squeeze_rule)


def _slice_len(size, start, end, step):
    start = 0 if start is None else as_dim(start)
    end = size if end is None else as_dim(end)
    if isinstance(size, int) and isinstance(start, int) and isinstance(end, int):
        start = max(start + size, 0) if start < 0 else min(start, size)
        end = max(end + size, 0) if end < 0 else min(end, size)
        return max(0, (end - start + step - 1) // step)
    if isinstance(end, int) and end >= 2**62:
        end = size
    if isinstance(start, int) and start < 0:
        start = size + start
    if isinstance(end, int) and end < 0:
        end = size + end
    length = sympy.Min(end, size) - start
    return simplify_dim(sympy.ceiling(length / step) if step != 1 else length)


def _slice_rule(x, dim=0, start=None, end=None, step=1):
    d = norm_dim(dim, x.rank)
    shape = list(x.shape)
    shape[d] = _slice_len(x.shape[d], start, end, step)
    return [x.with_shape(shape)]


_view("aten.slice.Tensor", _slice_rule)


def _select_rule(x, dim, index):
    d = norm_dim(dim, x.rank)
    return [x.with_shape([s for i, s in enumerate(x.shape) if i != d])]


_view("aten.select.int", _select_rule)


def _cat_rule(tensors, dim=0):
    tensors = [t for t in tensors if not (t.rank == 1 and t.shape[0] == 0)]
    ref = tensors[0]
    d = norm_dim(dim, ref.rank)
    total = sum((t.shape[d] for t in tensors), 0)
    shape = list(ref.shape)
    shape[d] = simplify_dim(total) if isinstance(total, sympy.Expr) else total
    dtype = ref.dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return [TensorType(tuple(shape), dtype, ref.device)]


_view("aten.cat.default", _cat_rule, category="copy")


def _stack_rule(tensors, dim=0):
    ref = tensors[0]
    shape = list(ref.shape)
    shape.insert(norm_dim(dim, ref.rank + 1), len(tensors))
    return [ref.with_shape(shape)]


_view("aten.stack.default", _stack_rule, category="copy")


def _split_rule(x, split_sizes, dim=0):
    d = norm_dim(dim, x.rank)
    outs = []
    for s in split_sizes:
        shape = list(x.shape)
        shape[d] = as_dim(s)
        outs.append(x.with_shape(shape))
    return outs


_view("aten.split_with_sizes.default", _split_rule)


def _gather_rule(x, dim, index, *, sparse_grad=False):
    return [TensorType(index.shape, x.dtype, x.device)]


_view("aten.gather.default", _gather_rule, category="gather")


def _index_select_rule(x, dim, index):
    d = norm_dim(dim, x.rank)
    shape = list(x.shape)
    shape[d] = index.shape[0]
    return [x.with_shape(shape)]


_view("aten.index_select.default", _index_select_rule, category="gather")


def _index_rule(x, indices):
    idx = [i for i in indices if i is not None]
    if any(t.dtype == torch.bool for t in idx):
        return None  # data-dependent: trust the traced shape
    from .common import broadcast_shapes

    first = next(k for k, i in enumerate(indices) if i is not None)
    bshape = broadcast_shapes(*(t.shape for t in idx))
    contiguous = all(indices[k] is not None for k in range(first, first + len(idx)))
    rest_before = list(x.shape[:first]) if contiguous else []
    rest_after = [x.shape[k] for k in range(len(indices), x.rank)]
    if contiguous:
        rest_after = [x.shape[k] for k in range(first + len(idx), x.rank)]
        return [x.with_shape(rest_before + list(bshape) + rest_after)]
    skipped = [x.shape[k] for k in range(len(indices)) if indices[k] is None]
    return [x.with_shape(list(bshape) + skipped + rest_after)]


_view("aten.index.Tensor", _index_rule, category="gather")


def _same_as_first(x, *args, **kwargs):
    return [x]


_view("aten.index_put.default", _same_as_first, category="scatter")
_view("aten.scatter.src", _same_as_first, category="scatter")
_view("aten.scatter.value", _same_as_first, category="scatter")
_view("aten.scatter_add.default", _same_as_first, category="scatter")
_view("aten.slice_scatter.default", _same_as_first, category="scatter")
_view("aten.select_scatter.default", _same_as_first, category="scatter")
_view("aten.flip.default", _same_as_first, category="copy")
_view("aten.roll.default", _same_as_first, category="copy")
_view("aten.tril.default", _same_as_first, category="pointwise")
_view("aten.triu.default", _same_as_first, category="pointwise")
def _repeat_rule(x, repeats):
    shape = [1] * (len(repeats) - x.rank) + list(x.shape)
    return [x.with_shape([d * as_dim(r) for d, r in zip(shape, repeats)])]


_view("aten.repeat.default", _repeat_rule, category="copy")


def _constant_pad_rule(x, pad, value=0.0):
    shape = list(x.shape)
    for i in range(len(pad) // 2):
        d = x.rank - 1 - i
        shape[d] = shape[d] + as_dim(pad[2 * i]) + as_dim(pad[2 * i + 1])
    return [x.with_shape(shape)]


_view("aten.constant_pad_nd.default", _constant_pad_rule, category="copy")
