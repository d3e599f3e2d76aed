"""Grouped GEMM over rows sorted by expert: every local expert's matmul in one Triton launch.

    out[p] = epilogue(x[rows[p]] @ W[e(p)])      p in [0, P), e(p) the expert owning row p

Rows are (token, expert) pairs sorted by expert; `offsets` [E+1] (int32) delimits expert e's
segment [offsets[e], offsets[e+1]), of which the first counts[e] rows are computed (all of them
by default; fewer when a capacity drops the rest). The grid is (M tiles, N tiles). An M tile
never straddles two experts: expert e gets cdiv(counts[e], BLOCK_M) tiles of its own, and a
tile table built on the device (tile_table: tile -> expert, first row, end row) tells each
program which expert's weight tile to load -- the grouped-GEMM scheduling of Triton's
tutorial and MegaBlocks, here with a fixed upper bound on the tile count (cdiv(P, BLOCK_M) + E)
so that no host sync is needed to size the grid (and a CUDA graph can capture it); programs
past the last real tile return at once. An empty expert gets no tile; one expert holding every
row gets them all.

Fused in the first GEMM: the row gather (x is read through `rows`, so the sorted copy of x
is never written) and the gated activation -- gate and up tiles are accumulated side by side
in fp32 and act(gate) * up is stored, with the gate either a separate stacked weight or the
first half of a fused [gate; up] weight. In the second GEMM's epilogue: the per-row routing
weight, and a scattered store (`out_rows`) that puts each row back at its (token, slot)
position, so the combine needs no scatter-add. Accumulation is fp32 (tl.dot); weights are
read through strides, so both stacked layouts of ir/ops/moe.py ("kn": [E, K, N],
"nk": [E, N, K]) run the same kernel.

The kernel is source text (pasted into generated modules, as quant_matmul.py does) so that
importing this file never imports triton before the interpreter mode is settled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import linecache

import torch

from .pointwise import interpreter_loops

ACTS = ("silu", "gelu", "gelu_tanh", "relu", "none")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LAYOUTS = ("kn", "nk")


class GroupedGemmError(ValueError):
    """Bad input to the grouped GEMM: which argument, what it was, what was expected."""


@dataclasses.dataclass(frozen=True)
class GroupedTile:
    block_m: int
    block_n: int
    block_k: int
    warps: int = 4
    stages: int = 3


_KERNEL = """\
@triton.jit
def triton_moe_act(h, ACT: tl.constexpr):
    if ACT == "silu":
        out = h * tl.sigmoid(h)
    elif ACT == "gelu":
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == "gelu_tanh":
        # 1 + tanh(u) = 2 - 2 / (exp(2u) + 1): exact at both tails (no libdevice tanh needed)
        u = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
    elif ACT == "relu":
        out = tl.maximum(h, 0.0)
    else:
        out = h
    return out


@triton.jit
def triton_moe_grouped_gemm(
    X, Rows, W, Wg, Scale, Out, OutRows, TileExpert, TileRow, TileEnd,
    N, K, up_off, stride_xm, stride_we, stride_wk, stride_wn, stride_om,
    HAS_ROWS: tl.constexpr, HAS_OUT_ROWS: tl.constexpr, GATED: tl.constexpr,
    ACT: tl.constexpr, HAS_SCALE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(TileExpert + pid_m)
    if e < 0:  # past the last expert's last tile: the grid is an upper bound
        return
    offs_m = tl.load(TileRow + pid_m) + tl.arange(0, BLOCK_M)
    m_ok = offs_m < tl.load(TileEnd + pid_m)  # a tile holds one expert's rows only
    if HAS_ROWS:  # gather: row p of the sorted pairs is row rows[p] of X
        src = tl.load(Rows + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        src = offs_m.to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_tile = e.to(tl.int64) * stride_we + offs_n[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < K
        a = tl.load(X + src[:, None] * stride_xm + kk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_at = w_tile + kk[:, None] * stride_wk
        w_ok = k_ok[:, None] & n_ok[None, :]
        b = tl.load(W + up_off + w_at, mask=w_ok, other=0.0)
        acc += tl.dot(a, b, input_precision=PRECISION)
        if GATED:
            g = tl.load(Wg + w_at, mask=w_ok, other=0.0)
            acc_g += tl.dot(a, g, input_precision=PRECISION)
    if GATED:
        acc = triton_moe_act(acc_g, ACT) * acc
    else:
        acc = triton_moe_act(acc, ACT)
    if HAS_SCALE:  # the routing weight of each (token, expert) pair
        acc = acc * tl.load(Scale + offs_m, mask=m_ok, other=0.0).to(tl.float32)[:, None]
    if HAS_OUT_ROWS:  # scatter: row p of the result goes to row out_rows[p]
        dst = tl.load(OutRows + offs_m, mask=m_ok, other=0).to(tl.int64)
    else:
        dst = offs_m.to(tl.int64)  # int64: P * N may pass 2**31 at prefill
    out_row = dst[:, None] * stride_om
    tl.store(Out + out_row + offs_n[None, :], acc.to(Out.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])
"""


def kernel_source(interpret: bool) -> str:
    """The kernels' source as pasted into a generated module (which imports triton, tl)."""
    if interpret:
        return "\n".join(interpreter_loops(_KERNEL.splitlines())) + "\n"
    return _KERNEL


_LOADED: dict[bool, object] = {}


def load_kernel(interpret: bool):
    """The grouped-GEMM kernel for this mode, compiled once per process. The text is put in
    linecache so that Triton (which reads a kernel's source) and tracebacks find it."""
    if interpret not in _LOADED:
        import triton
        import triton.language as tl

        src = kernel_source(interpret)
        name = f"<meshweave grouped_gemm {hashlib.sha256(src.encode()).hexdigest()[:12]}>"
        linecache.cache[name] = (len(src), None, src.splitlines(True), name)
        # a module name: Triton names the kernel's jit callees (triton_moe_act) by it
        scope = {"triton": triton, "tl": tl, "__name__": f"{__name__}.kernel_source"}
        exec(compile(src, name, "exec"), scope)  # noqa: S102  our own kernel text
        _LOADED[interpret] = scope["triton_moe_grouped_gemm"]
    return _LOADED[interpret]


def _pow2(n: int, lo: int, hi: int) -> int:
    return min(hi, max(lo, 1 << max(0, int(n) - 1).bit_length()))


def choose_tile(rows: int, experts: int, n: int, k: int, interpret: bool, itemsize: int,
                gated: bool = False) -> GroupedTile:
    """One tile per shape. BLOCK_M follows the mean rows per expert (each expert pads its last
    tile, so tall tiles waste work when experts hold few rows). Under the interpreter: big
    tiles, since numpy does the work and each program costs Python time. The GPU choice is a
    heuristic that has not been tuned on hardware yet."""
    per_expert = max(1, rows // max(1, experts))
    if interpret:
        return GroupedTile(_pow2(per_expert, 16, 64), _pow2(n, 16, 64), _pow2(k, 16, 64), 1, 1)
    bm = _pow2(per_expert, 16, 128)
    bn = 64 if gated and bm == 128 else 128
    bk = 64 if itemsize <= 2 else 32
    return GroupedTile(bm, bn, bk, 8 if bm * bn >= 128 * 128 else 4, 3)


def tile_table(offsets: torch.Tensor, block_m: int, rows: int,
               counts: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """(tile -> expert, tile -> first row, tile -> end row), int32 on offsets' device, for an
    upper bound of cdiv(rows, block_m) + E tiles; tiles past the last real one have expert
    -1. Expert e's tiles cover rows [offsets[e], offsets[e] + counts[e])."""
    e = offsets.numel() - 1
    start = offsets[:-1].to(torch.int64)
    counts = (offsets[1:] - offsets[:-1] if counts is None else counts).to(torch.int64)
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    bound = -(-rows // block_m) + e
    i = torch.arange(bound, device=offsets.device)
    expert = torch.searchsorted(ends, i, right=True)  # first expert whose tiles end after i
    valid = expert < e
    ec = expert.clamp(max=e - 1)
    first = start[ec] + (i - (ends - tiles)[ec]) * block_m
    end = torch.minimum(first + block_m, start[ec] + counts[ec])
    return (torch.where(valid, expert, -1).to(torch.int32),
            torch.where(valid, first, 0).to(torch.int32),
            torch.where(valid, end, 0).to(torch.int32))


def _check(x, w, offsets, counts, rows, out_rows, w_gate, fused_gate_up, act, scale,
           layout) -> tuple:
    """(P, N, K) after validating every argument; raises GroupedGemmError."""
    where = "grouped_gemm"
    if layout not in LAYOUTS:
        raise GroupedGemmError(f"{where}: layout={layout!r}; expected 'kn' or 'nk'")
    if act not in ACTS:
        raise GroupedGemmError(f"{where}: act={act!r}; expected one of {ACTS}")
    if x.dim() != 2 or w.dim() != 3:
        raise GroupedGemmError(f"{where}: expected x [rows, K] and stacked weights w [E, ., .]; "
                               f"got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if x.dtype not in DTYPES or w.dtype != x.dtype:
        raise GroupedGemmError(f"{where}: x is {x.dtype}, w is {w.dtype}; expected one dtype "
                               f"among {DTYPES}")
    e = w.shape[0]
    k, n = (w.shape[1], w.shape[2]) if layout == "kn" else (w.shape[2], w.shape[1])
    if x.shape[1] != k:
        raise GroupedGemmError(f"{where}: x has K={x.shape[1]} but w {tuple(w.shape)} "
                               f"(layout {layout!r}) has K={k}")
    if offsets.dim() != 1 or offsets.numel() != e + 1 or offsets.dtype != torch.int32:
        raise GroupedGemmError(f"{where}: offsets is {offsets.dtype} {tuple(offsets.shape)}; "
                               f"expected int32 [E+1] = [{e + 1}]")
    if counts is not None and (tuple(counts.shape) != (e,) or counts.dtype.is_floating_point):
        raise GroupedGemmError(f"{where}: counts is {counts.dtype} {tuple(counts.shape)}; "
                               f"expected integer rows computed per expert, [E] = [{e}]")
    if rows is not None and (rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64)):
        raise GroupedGemmError(f"{where}: rows is {rows.dtype} {tuple(rows.shape)}; expected "
                               f"an int32/int64 vector of row indices into x")
    p = rows.numel() if rows is not None else x.shape[0]
    if out_rows is not None and (tuple(out_rows.shape) != (p,)
                                 or out_rows.dtype not in (torch.int32, torch.int64)):
        raise GroupedGemmError(f"{where}: out_rows is {out_rows.dtype} "
                               f"{tuple(out_rows.shape)}; expected int32/int64 [{p}]")
    if w_gate is not None and (fused_gate_up or tuple(w_gate.shape) != tuple(w.shape)
                               or w_gate.dtype != w.dtype):
        raise GroupedGemmError(f"{where}: w_gate {w_gate.dtype} {tuple(w_gate.shape)}; expected "
                               f"w's {w.dtype} {tuple(w.shape)}, and not with fused_gate_up")
    if fused_gate_up and n % 2:
        raise GroupedGemmError(f"{where}: fused [gate; up] weight has odd width N={n}")
    if scale is not None and tuple(scale.shape) != (p,):
        raise GroupedGemmError(f"{where}: scale {tuple(scale.shape)}; expected one weight per "
                               f"row, [{p}]")
    tensors = (x, w, offsets, counts, rows, out_rows, w_gate, scale)
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise GroupedGemmError(f"{where}: tensors on {sorted(map(str, devices))}; expected one "
                               f"device")
    return p, (n // 2 if fused_gate_up else n), k


def grouped_gemm(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor, *,
                 counts: torch.Tensor | None = None, layout: str = "kn",
                 rows: torch.Tensor | None = None, out_rows: torch.Tensor | None = None,
                 w_gate: torch.Tensor | None = None, fused_gate_up: bool = False,
                 act: str = "none", scale: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, tiles: tuple | None = None,
                 tile: GroupedTile | None = None, kernel=None, interpret: bool | None = None,
                 allow_tf32: bool = False) -> torch.Tensor:
    """[P, N] = epilogue(x[rows] @ w[expert of each row]), one launch for all experts.

    x is the sorted rows [P, K], or with `rows` any [T, K] read at rows[p]. The epilogue is
    act(x @ w_gate) * (x @ w) with a gate (separate `w_gate`, or `fused_gate_up`: w's first
    N/2 outputs are the gate), else act(x @ w); then times `scale[p]` if given. With
    `out_rows`, result row p is stored at output row out_rows[p] (a permutation of [0, P)).
    With `counts`, only the first counts[e] rows of expert e's segment are computed; the
    other output rows are left unwritten (zero when out_rows scatters). `tiles` (tile_table's
    output, for `tile`) lets two launches over the same rows share one table.
    """
    p, n, k = _check(x, w, offsets, counts, rows, out_rows, w_gate, fused_gate_up, act, scale,
                     layout)
    if interpret is None:
        from ..mode import ensure_triton_mode

        interpret = ensure_triton_mode(x.is_cuda)
    if interpret and x.dtype == torch.bfloat16:
        raise GroupedGemmError("grouped_gemm: bfloat16 does not run under the Triton "
                               "interpreter (numpy has no bfloat16); use float16 or float32 "
                               "on the CPU")
    alloc = torch.zeros if out_rows is not None and counts is not None else torch.empty
    out = alloc((p, n), dtype=out_dtype or x.dtype, device=x.device)
    if p == 0 or n == 0:
        return out
    gated = w_gate is not None or fused_gate_up
    tile = tile or choose_tile(p, w.shape[0], n, k, interpret, x.element_size(), gated)
    if tiles is None:
        tiles = tile_table(offsets, tile.block_m, p, counts)
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate = w_gate if w_gate is not None else w
    if w_gate is not None and w_gate.stride() != w.stride():  # the kernel shares one stride set
        w, gate = w.contiguous(), w_gate.contiguous()
    # K and N strides of one expert's weight, whichever way the stack is stored
    sk, sn = (w.stride(1), w.stride(2)) if layout == "kn" else (w.stride(2), w.stride(1))
    up_off = n * sn if fused_gate_up else 0  # fused [gate; up]: up is the second half
    precision = "tf32" if allow_tf32 or x.dtype != torch.float32 else "ieee"
    kernel = kernel or load_kernel(interpret)
    grid = (tiles[0].numel(), -(-n // tile.block_n))
    kernel[grid](
        x, rows if rows is not None else offsets, w, gate, scale if scale is not None else out,
        out, out_rows if out_rows is not None else offsets, *tiles, n, k, up_off, x.stride(0),
        w.stride(0), sk, sn, out.stride(0), HAS_ROWS=rows is not None,
        HAS_OUT_ROWS=out_rows is not None, GATED=gated, ACT=act, HAS_SCALE=scale is not None,
        PRECISION=precision, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k,
        num_warps=tile.warps, num_stages=tile.stages)
    return out
