"""Weight-only quantized GEMM (W4A16 / W8A16) in Triton, and the QUANT_MATMULS rule table.

out[M, N] = x[M, K] @ dequantize(qweight, scales, zeros) + bias, with the weight in
ir/packing.py's format: int32 words [K * bits / 32, N], each column's codes a little-endian bit
stream along K. One program computes a BLOCK_M x BLOCK_N tile over one K slice:

  * it loads BLOCK_K / PACK whole packed words per column (the weight crosses memory packed,
    which is the point), unpacks them in registers with a shift and a mask into a
    [BLOCK_K, BLOCK_N] code tile, subtracts the zero point (stored uint8, or 2**(bits-1) for
    the symmetric scheme), multiplies by the group's scale in fp32 and casts to the
    activations' dtype -- the exact values `ir.packing.dequantize` gives -- then feeds tl.dot
    with fp32 accumulation. Loads are software-pipelined by Triton (num_stages) on the GPU;
  * for small M (decode) the tiles along N alone do not fill the GPU, so a second grid
    dimension splits K (split-K). Each slice writes its fp32 partial into a workspace
    [SPLIT_K, M, N] and a second kernel sums the slices in a fixed order, adds the bias and
    casts. That costs a little traffic over atomics, but it is deterministic and the
    autotuner may re-run any config (no output to zero between runs);
  * a group's scale row is loaded once per K step when the step lies in one group
    (BLOCK_K divides the group, or per channel), else per row of the tile (BLOCK_K > group).

Tile sizes follow M: the GPU kernel is a `triton.autotune` over GPU_CONFIGS keyed on
(M bucket, N, K, group size, bits), pruned to the configs meant for the M bucket; under the
interpreter one fixed config per M bucket (interpreter_config). Bits other than 4 and 8 run
through the reference executor (the rule says why).

The kernels are kept as source text (pasted into generated modules, as flash attention is) so
that this file never imports triton before the interpreter mode is settled; `quant_matmul`
loads them itself when called outside a generated module.
"""

from __future__ import annotations

import dataclasses
import hashlib
import linecache

import torch

from meshweave.ir.graph import Node, Value
from meshweave.ir.registry import RuleTable

from .pointwise import interpreter_loops

QUANT_MATMULS = RuleTable("triton_quant_matmul")
KERNEL_BITS = (4, 8)
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
M_BUCKETS = (16, 32, 64, 128)  # M <= 16, <= 32, <= 64, larger
PER_CHANNEL_ROUND = 512  # a multiple of every BLOCK_K


class QuantKernelError(ValueError):
    """Bad input to the quantized GEMM: says which argument, what it was and what was expected."""


@dataclasses.dataclass(frozen=True)
class QuantTile:
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3
    gather: bool = False  # load a word per code row instead of unpacking with a reshape

    def kwargs(self) -> dict:
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k,
                "SPLIT_K": self.split_k, "GATHER_ROWS": self.gather}


def m_bucket(m: int) -> int:
    return next((b for b in M_BUCKETS if m <= b), M_BUCKETS[-1] * 2)


# (M bucket) -> tiles the autotuner tries on the GPU. Decode (M <= 16) streams the weight once:
# narrow M tiles, wide K steps and split-K so that ~132 SMs get work at N = 4096.
GPU_CONFIGS: dict[int, list[QuantTile]] = {
    16: [QuantTile(16, 64, 128, s, 4, 4) for s in (1, 2, 4, 8)]
    + [QuantTile(16, 128, 128, s, 4, 4) for s in (1, 2, 4)]
    + [QuantTile(16, 256, 64, s, 8, 3) for s in (1, 2)]
    + [QuantTile(16, 128, 64, 4, 4, 5)]
    + [QuantTile(16, 64, 64, s, 4, 3, gather=True) for s in (2, 4)],
    32: [QuantTile(32, 64, 128, s, 4, 4) for s in (1, 2, 4)]
    + [QuantTile(32, 128, 64, s, 4, 4) for s in (1, 2)]
    + [QuantTile(32, 64, 64, 2, 4, 3, gather=True)],
    64: [QuantTile(64, 64, 128, s, 4, 4) for s in (1, 2)]
    + [QuantTile(64, 128, 64, s, 4, 4) for s in (1, 2)]
    + [QuantTile(64, 256, 64, 1, 8, 3)],
    128: [QuantTile(128, 128, 64, 1, 8, 3), QuantTile(128, 256, 64, 1, 8, 3),
          QuantTile(64, 128, 64, 1, 4, 4), QuantTile(128, 64, 64, 1, 4, 4),
          QuantTile(64, 256, 64, 1, 8, 4)],
}
GPU_CONFIGS[256] = GPU_CONFIGS[128]


def interpreter_config(m: int, k: int, split_k: int | None = None) -> QuantTile:
    """The fixed tile under the interpreter: small tiles (numpy runs each program), split-K
    in two when M is small and K has at least four steps, so that path is exercised."""
    block_m = 16 if m <= 16 else 32
    steps = -(-k // 32)
    split = split_k if split_k is not None else (2 if m <= 16 and steps >= 4 else 1)
    return QuantTile(block_m, 32, 32, split, 1, 1)


_KERNEL = """\
@triton.jit
def triton_quant_matmul(
    X, QW, S, Z, Bias, Out, Ws, M, N, K, M_BUCKET, stride_xm, stride_om,
    GROUP_SIZE: tl.constexpr, BITS: tl.constexpr,
    HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, ALLOW_TF32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    GATHER_ROWS: tl.constexpr, DEQUANT_IN_ACT: tl.constexpr, M_BUCKET_OF: tl.constexpr = 0,
):
    PACK: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WORDS: tl.constexpr = BLOCK_K // PACK
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    # consecutive programs share one weight tile: it is read from DRAM once, x from L2
    pid_m = pid % tiles_m
    pid_n = pid // tiles_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
    k_lo = pid_k * steps * BLOCK_K
    k_len = tl.minimum(steps * BLOCK_K, K - k_lo)
    offs_k = tl.arange(0, BLOCK_K)
    offs_w = tl.arange(0, WORDS)
    shifts = tl.arange(0, PACK) * BITS
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, k_len, BLOCK_K):
        kk = k_lo + k0 + offs_k
        k_ok = kk < K
        x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :],
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if GATHER_ROWS:  # one word load per code row (L1 serves the repeats); no reshape
            words = tl.load(QW + (kk // PACK)[:, None] * N + offs_n[None, :],
                            mask=k_ok[:, None] & n_ok[None, :], other=0)
            q = (words >> ((kk % PACK) * BITS)[:, None]) & MASK
        else:  # each packed word loaded once, unpacked in registers
            rows = (k_lo + k0) // PACK + offs_w
            words = tl.load(QW + rows[:, None] * N + offs_n[None, :],
                            mask=(rows[:, None] < K // PACK) & n_ok[None, :], other=0)
            # code j of a word sits at bits [j * BITS, (j + 1) * BITS): row k = word * PACK + j
            codes = (words[:, None, :] >> shifts[None, :, None]) & MASK
            q = tl.reshape(codes, (BLOCK_K, BLOCK_N))
        if GROUP_SIZE % BLOCK_K == 0:
            g = (k_lo + k0) // GROUP_SIZE
            s = tl.load(S + g * N + offs_n, mask=n_ok, other=0.0)[None, :]
            if HAS_ZEROS:
                z = tl.load(Z + g * N + offs_n, mask=n_ok, other=0).to(tl.int32)[None, :]
            else:
                z = 1 << (BITS - 1)
        else:
            gk = kk // GROUP_SIZE
            sk_mask = k_ok[:, None] & n_ok[None, :]
            s = tl.load(S + gk[:, None] * N + offs_n[None, :], mask=sk_mask, other=0.0)
            if HAS_ZEROS:
                z = tl.load(Z + gk[:, None] * N + offs_n[None, :], mask=sk_mask, other=0)
                z = z.to(tl.int32)
            else:
                z = 1 << (BITS - 1)
        d = q - z  # exact integers
        if DEQUANT_IN_ACT:
            # fp16/bf16 scales and activations: d * s is exact in fp32 (<= 9 x 11 significant
            # bits), so one rounding in the activation dtype gives dequantize()'s fp32 value
            # rounded to it -- the same bits, with half-width ALU work
            w = d.to(X.dtype.element_ty) * s
        else:
            w = (d.to(tl.float32) * s.to(tl.float32)).to(X.dtype.element_ty)
        if ALLOW_TF32:
            acc += tl.dot(x, w)
        else:
            acc += tl.dot(x, w, input_precision="ieee")
    out_mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(Bias + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Out + offs_m[:, None] * stride_om + offs_n[None, :],
                 acc.to(Out.dtype.element_ty), mask=out_mask)
    else:
        tl.store(Ws + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=out_mask)


@triton.jit
def triton_quant_splitk_reduce(Ws, Bias, Out, M, N, stride_om, SPLIT_K: tl.constexpr,
                               HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # a fixed order: the sum is deterministic
        acc += tl.load(Ws + s * M * N + offs, mask=ok, other=0.0)
    n = offs % N
    if HAS_BIAS:
        acc += tl.load(Bias + n, mask=ok, other=0.0).to(tl.float32)
    tl.store(Out + (offs // N) * stride_om + n, acc.to(Out.dtype.element_ty), mask=ok)
"""

_PRUNE = """\
def _quant_matmul_prune(configs, named_args, **kwargs):
    bucket = named_args["M_BUCKET"]
    return [c for c in configs if c.kwargs["M_BUCKET_OF"] == bucket] or configs[:1]


"""


def _autotune_decorator() -> str:
    lines = ["@triton.autotune(", "    configs=["]
    for bucket, tiles in GPU_CONFIGS.items():
        for t in tiles:
            kw = {**t.kwargs(), "M_BUCKET_OF": bucket}
            lines.append(f"        triton.Config({kw!r}, num_warps={t.warps}, "
                         f"num_stages={t.stages}),")
    lines += ["    ],", "    key=['M_BUCKET', 'N', 'K', 'GROUP_SIZE', 'BITS'],",
              "    prune_configs_by={'early_config_prune': _quant_matmul_prune},", ")"]
    return "\n".join(lines) + "\n"


def quant_kernel_source(interpret: bool) -> str:
    """Both kernels' source, as pasted into a generated module (which imports triton, tl)."""
    if interpret:
        return "\n".join(interpreter_loops(_KERNEL.splitlines())) + "\n"
    # M_BUCKET_OF (unused in the body) names the M bucket a config is meant for (the pruner).
    return _PRUNE + _autotune_decorator() + _KERNEL


_LOADED: dict[bool, tuple] = {}


def compile_kernels(src: str) -> tuple:
    """(matmul kernel, split-K reduce kernel) from kernel source text. The text is registered
    with linecache so that Triton (which reads a kernel's source) and tracebacks find it."""
    import triton
    import triton.language as tl

    name = f"<meshweave quant_matmul {hashlib.sha256(src.encode()).hexdigest()[:12]}>"
    linecache.cache[name] = (len(src), None, src.splitlines(True), name)
    scope = {"triton": triton, "tl": tl}
    exec(compile(src, name, "exec"), scope)  # noqa: S102  our own kernel text
    return scope["triton_quant_matmul"], scope["triton_quant_splitk_reduce"]


def load_kernels(interpret: bool) -> tuple:
    """The kernels for this mode, compiled once per process."""
    if interpret not in _LOADED:
        _LOADED[interpret] = compile_kernels(quant_kernel_source(interpret))
    return _LOADED[interpret]


def _check(x, qweight, scales, zeros, bias, bits, group_size) -> tuple[int, int]:
    where = "quant_matmul"
    if bits not in KERNEL_BITS:
        raise QuantKernelError(f"{where}: bits={bits} is not supported by the Triton kernel "
                               f"(expected one of {KERNEL_BITS}); quant.linear's reference "
                               f"rule (ir/ops/quant.py) computes other widths")
    if x.dtype not in ACT_DTYPES:
        raise QuantKernelError(f"{where}: x has dtype {x.dtype}; expected one of {ACT_DTYPES}")
    k = x.shape[-1] if x.dim() else 0
    if x.dim() < 1 or qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise QuantKernelError(f"{where}: expected x [..., K] and qweight int32 [K*bits/32, N], "
                               f"got x {tuple(x.shape)}, qweight {qweight.dtype} "
                               f"{tuple(qweight.shape)}")
    n = qweight.shape[1]
    if qweight.shape[0] * 32 != k * bits:
        raise QuantKernelError(f"{where}: qweight has {qweight.shape[0]} rows; expected "
                               f"K*bits/32 = {k}*{bits}/32 for x's K={k}")
    if group_size <= 0 or k % group_size or tuple(scales.shape) != (k // group_size, n):
        raise QuantKernelError(f"{where}: scales {tuple(scales.shape)} with group_size="
                               f"{group_size}; expected [K/group_size, N] = "
                               f"[{k}/{group_size}, {n}] (group_size dividing K={k})")
    if zeros is not None and (tuple(zeros.shape) != tuple(scales.shape)
                              or zeros.dtype != torch.uint8):
        raise QuantKernelError(f"{where}: zeros {zeros.dtype} {tuple(zeros.shape)}; expected "
                               f"uint8 {tuple(scales.shape)} (the scales' shape) or None")
    if bias is not None and tuple(bias.shape) != (n,):
        raise QuantKernelError(f"{where}: bias {tuple(bias.shape)}; expected [N] = [{n}]")
    devices = {t.device for t in (x, qweight, scales, zeros, bias) if t is not None}
    if len(devices) > 1:
        raise QuantKernelError(f"{where}: tensors on {sorted(map(str, devices))}; expected one "
                               f"device")
    return k, n


def quant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                 bits: int = 4, group_size: int = 128, *, kernels: tuple | None = None,
                 interpret: bool | None = None, allow_tf32: bool = False,
                 tile: QuantTile | None = None) -> torch.Tensor:
    """x[..., K] @ dequantize(qweight, scales, zeros, bits, group_size) + bias -> [..., N].

    `kernels` are the two compiled kernels (a generated module passes its own); by default
    they are loaded here. `tile` forces one tile (tests, benchmarks); by default the GPU
    autotunes and the interpreter uses interpreter_config.
    """
    k, n = _check(x, qweight, scales, zeros, bias, bits, group_size)
    if interpret is None:
        from ..mode import ensure_triton_mode

        interpret = ensure_triton_mode(x.is_cuda)
    mm, reduce = kernels if kernels is not None else load_kernels(interpret)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out.reshape(*x.shape[:-1], n)
    autotuned = hasattr(mm, "configs") and tile is None
    if tile is None and not autotuned:
        tile = interpreter_config(m, k)
    bucket = m_bucket(m)
    max_split = (max(t.split_k for t in GPU_CONFIGS[bucket]) if autotuned else tile.split_k)
    ws = (torch.empty((max_split, m, n), dtype=torch.float32, device=x.device)
          if max_split > 1 else out)
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zeros.contiguous() if zeros is not None else None
    args = (x2, qweight, scales, zeros if zeros is not None else scales,
            bias if bias is not None else scales, out, ws, m, n, k, bucket,
            x2.stride(0), out.stride(0))
    # Per channel (one group spanning K) the group size given to the kernel is K rounded up
    # to a multiple of every BLOCK_K: the step's group is then always 0 and loaded once.
    kernel_group = (-(-k // PER_CHANNEL_ROUND) * PER_CHANNEL_ROUND if group_size == k
                    else group_size)
    consts = {"GROUP_SIZE": kernel_group, "BITS": bits, "HAS_ZEROS": zeros is not None,
              "HAS_BIAS": bias is not None,
              "DEQUANT_IN_ACT": scales.dtype == x.dtype != torch.float32,
              "ALLOW_TF32": allow_tf32 or x.dtype != torch.float32}

    def grid(meta):
        return (-(-m // meta["BLOCK_M"]) * -(-n // meta["BLOCK_N"]), meta["SPLIT_K"])

    if autotuned:
        mm[grid](*args, **consts)
        split = mm.best_config.kwargs["SPLIT_K"]
    else:
        launch = getattr(mm, "fn", mm) if hasattr(mm, "configs") else mm  # a forced tile
        launch[grid](*args, **consts, **tile.kwargs(), num_warps=tile.warps,
                     num_stages=tile.stages)
        split = tile.split_k
    if split > 1:
        block = 1024 if not interpret else max(16, min(4096, 1 << (m * n - 1).bit_length()))
        reduce[(-(-(m * n) // block),)](ws, bias if bias is not None else ws, out, m, n,
                                        out.stride(0), SPLIT_K=split,
                                        HAS_BIAS=bias is not None, BLOCK=block)
    return out.reshape(*x.shape[:-1], n)


@dataclasses.dataclass(frozen=True)
class QuantLinearRule:
    """quant.linear(x, qweight, scales, zeros, bias, bits=, group_size=) as the kernel."""

    def operands(self, node: Node) -> tuple[Value, ...]:
        x, qweight, scales, zeros, bias = (tuple(node.args) + (None,) * 5)[:5]
        return x, qweight, scales, zeros, bias

    def supports(self, node: Node) -> str | None:
        bits = node.kwargs.get("bits")
        if bits not in KERNEL_BITS:
            return (f"bits={bits}: the Triton quant kernel handles {KERNEL_BITS} bits "
                    f"(the reference executor dequantizes)")
        x = self.operands(node)[0]
        if x.tensor_type.dtype not in ACT_DTYPES:
            return f"quant.linear on {x.tensor_type.dtype} activations"
        if not isinstance(x.tensor_type.shape[-1], int):
            return "symbolic K (the kernel needs a static reduction dim)"
        return None


QUANT_MATMULS.register("quant.linear")(QuantLinearRule())
