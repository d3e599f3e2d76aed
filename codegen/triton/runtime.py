"""What a generated module's call() uses at run time: launch configurations, the matmul
variant chooser, attention, the quantized GEMM, moe.experts on the grouped GEMM, and the
reference executor for nodes that were not compiled.

Launch sizes are computed from the actual sizes on every call (shapes may be symbolic), so one
generated module serves every shape. Matmuls are the one place where the choice of code
depends on measurement: on a GPU each (kernel, M, N, K) is timed once for the Triton template
(a few tile configurations) against torch.matmul + the epilogue kernel, and the winner is
remembered in memory and in a JSON file next to the kernel cache. Under the interpreter the
rule is deterministic: the template, so that it is what the CPU tests exercise.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch

from meshweave.ir.graph import Graph, Node
from meshweave.ir.ops.moe import moe_experts as reference_moe_experts
from meshweave.ir.ops.quant import quant_linear as reference_quant_linear
from meshweave.runtime.reference import run_node
from .fast_launch import current_raw_stream, set_stream
from .kernels.flash_attention import flash_attention
from .kernels.flash_attention_bwd import flash_attention_backward, flash_attention_with_lse
from .kernels.moe_dispatch import moe_experts_grouped
from .kernels.quant_matmul import quant_matmul

TORCH = "torch"
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) tried on the GPU, big tiles first.
GPU_MATMUL_CONFIGS = [
    (128, 256, 64, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 8, 3),
    (128, 64, 32, 4, 4),
    (64, 128, 32, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (16, 64, 64, 4, 3),
]
# Programs that fill the GPU: a tile is only as large as still gives this many programs
# (H100/H200 have 132 SMs); smaller grids leave SMs idle for the whole kernel.
FILL_PROGRAMS = 128
# Shared memory a tile may use for its pipelined A and B blocks (A100: 164 KiB per SM).
SMEM_BUDGET = 160 * 1024


def smem_bytes(cfg: tuple, itemsize: int) -> int:
    bm, bn, bk, _, stages = cfg
    return (bm * bk + bk * bn) * itemsize * stages


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host. (triton.cdiv is a JIT function: ~10 us a call from Python,
    and a GPT-2 forward makes a hundred of them.)"""
    return -(-a // b)


class MatmulChooser:
    """Per-shape choice between the Triton template (with a tile config) and cuBLAS."""

    def __init__(self, policy: str, interpret: bool, path: str | None):
        self.policy = policy
        self.interpret = interpret
        self.path = path
        self.choices: dict[str, Any] = {}
        self._lock = threading.Lock()
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    self.choices = {
                        k: (v if v == TORCH else tuple(v)) for k, v in json.load(f).items()
                    }
            except (OSError, ValueError):
                self.choices = {}  # a damaged choice file is only a lost measurement

    def default_config(self, M: int, N: int, K: int, itemsize: int = 4) -> tuple:
        """The one template tile for a shape: "triton" uses it, "auto" measures it vs cuBLAS."""
        def tile(n, cap):
            return min(cap, max(16, next_power_of_2(n)))

        if self.interpret:  # big tiles: fewer interpreted programs (numpy does the work)
            return (tile(M, 256), tile(N, 256), tile(K, 256), 4, 1)
        if M <= 32:  # decode-like: skinny M, wide K tiles
            return (tile(M, 32), 64, 64, 4, 3)
        return self.fitting(M, N, itemsize)[0]

    @staticmethod
    def fitting(M: int, N: int, itemsize: int = 4) -> list:
        """GPU tiles no taller than M whose blocks fit SMEM_BUDGET at this element size,
        largest first, from the first that still fills the GPU (FILL_PROGRAMS programs; else
        the smallest)."""
        tiles = [c for c in GPU_MATMUL_CONFIGS if c[0] <= max(16, next_power_of_2(M))
                 and smem_bytes(c, itemsize) <= SMEM_BUDGET]
        for i, (bm, bn, *_) in enumerate(tiles):
            if cdiv(M, bm) * cdiv(N, bn) >= FILL_PROGRAMS:
                return tiles[i:]
        return tiles[-1:]

    def candidates(self, M: int, N: int, K: int, itemsize: int = 4) -> list:
        """cuBLAS and the template tiles "auto" (two) or "autotune" (five) times."""
        first = self.default_config(M, N, K, itemsize)
        rest = [c for c in self.fitting(M, N, itemsize) if c != first]
        return [TORCH, first] + rest[: 4 if self.policy == "autotune" else 1]

    def warm_candidates(self, M: int, N: int, K: int, itemsize: int = 4) -> list:
        """The configurations choose() may launch for this shape."""
        if self.policy == TORCH:
            return [TORCH]
        if self.policy == "triton" or self.interpret:
            return [self.default_config(M, N, K, itemsize)]
        return self.candidates(M, N, K, itemsize)

    def choose(
        self, key: str, M: int, N: int, K: int, launch: Callable[[Any], None], itemsize: int = 4
    ) -> Any:
        if self.policy == TORCH:  # cuBLAS (or the CPU's matmul) + the epilogue kernel
            return TORCH
        if self.policy == "triton" or self.interpret:  # nothing to time on the interpreter
            return self.default_config(M, N, K, itemsize)
        full = f"{key}|{M}x{N}x{K}|{self.policy}"
        if full in self.choices:
            return self.choices[full]
        best = min(self.candidates(M, N, K, itemsize), key=lambda c: _time_gpu(lambda: launch(c)))
        with self._lock:
            self.choices[full] = best
            self._save()
        return best

    def _save(self) -> None:
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(self.choices, f, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def _time_gpu(fn: Callable[[], None], reps: int = 10) -> float:
    """Milliseconds of GPU time per call of fn. The GPU first spins for about a millisecond
    while the host queues the calls, so the events time the kernels back to back, not the
    host launching them (at small shapes the host is slower than the kernels, and a host-bound
    timing would rank candidates by their launch overhead)."""
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    try:
        fn()  # compile and warm up
    except (OutOfResources, CompilationError):  # a config that does not fit loses
        return float("inf")
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(2_000_000)  # ~1 ms at H100/H200 clocks
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


class KernelRuntime:
    """Passed to a generated module's call(inputs, state, rt)."""

    def __init__(
        self,
        graph: Graph,
        interpret: bool,
        matmul_policy: str = "auto",
        choices_path: str | None = None,
    ):
        self.graph = graph
        self.interpret = interpret
        self.nodes: list[Node] = list(graph.nodes)
        self.matmuls = MatmulChooser(matmul_policy, interpret, choices_path)
        # Host time is the budget at small batch: launch configurations and matmul choices are
        # memoized by their arguments, and the TF32 flag is read once per call (begin_call).
        self._configs: dict[tuple, tuple] = {}
        self._chosen: dict[tuple, Any] = {}
        self.allow_tf32 = False
        self.warming = False  # precompile.py: launches only compile, every matmul candidate

    cdiv = staticmethod(cdiv)

    def begin_call(self) -> None:
        """Read the settings a call depends on, once per call of the generated module."""
        self.allow_tf32 = bool(torch.backends.cuda.matmul.allow_tf32)
        if not self.interpret:
            set_stream(current_raw_stream())

    # --- nodes that were not compiled -----------------------------------------------------------
    def run_node(self, index: int, values: Sequence[Any]) -> list[Any]:
        """Run IR node `index` through the reference executor on the given input values."""
        node = self.nodes[index]
        env = dict(zip(node.inputs, values))
        run_node(node, env)
        return [env[o] for o in node.outputs]

    @staticmethod
    def contiguous(x: Any) -> Any:
        return x.contiguous() if isinstance(x, torch.Tensor) else x

    # --- launch configurations ------------------------------------------------------------------
    def pointwise_config(self, xnumel: int) -> tuple[int, int]:
        key = ("p", xnumel)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._configs[key] = self._pointwise_config(xnumel)
        return cfg

    def _pointwise_config(self, xnumel: int) -> tuple[int, int]:
        if self.interpret:
            return min(next_power_of_2(max(xnumel, 1)), 1 << 16), 1
        block = min(1024, max(128, next_power_of_2(xnumel)))
        return block, 4 if block <= 512 else 8

    def reduction_config(
        self, xnumel: int, rnumel: int, looped: bool = False
    ) -> tuple[int, int, int]:
        key = ("r", xnumel, rnumel, looped)
        cfg = self._configs.get(key)
        if cfg is None:
            cfg = self._configs[key] = self._reduction_config(xnumel, rnumel, looped)
        return cfg

    def _reduction_config(self, xnumel: int, rnumel: int, looped: bool) -> tuple[int, int, int]:
        rblock = next_power_of_2(max(rnumel, 1))
        if looped:  # the kernel walks the row in RBLOCK chunks
            rblock = min(rblock, 4096 if self.interpret else 1024)
        budget = (1 << 16) if self.interpret else 4096
        xblock = max(1, min(next_power_of_2(max(xnumel, 1)), budget // rblock, 64))
        if self.interpret:
            xblock = max(1, min(next_power_of_2(max(xnumel, 1)), budget // rblock))
        warps = 4 if rblock * xblock <= 2048 else (8 if rblock * xblock <= 8192 else 16)
        return xblock, rblock, warps

    # --- matmul ---------------------------------------------------------------------------------
    def matmul(
        self,
        template,
        epilogue,
        key: str,
        a: torch.Tensor,
        b: torch.Tensor,
        io: Sequence[torch.Tensor],
        M: int,
        N: int,
        K: int,
        syms: Sequence[int],
        batch: int = 1,
        direct_out: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
    ) -> None:
        """out = epilogue(a @ b), by the template or by torch.matmul + the epilogue kernel.

        `direct_out` is the output buffer when nothing is fused but, optionally, a vector
        `bias` (then cuBLAS writes it, adding the bias in its own epilogue).
        """
        tf32 = self.allow_tf32 or a.dtype != torch.float32
        squeeze = batch == 1 and a.dim() == 2

        def launch(cfg) -> None:
            if cfg == TORCH:
                if direct_out is not None:
                    out = direct_out.view((M, N) if squeeze else (batch, M, N))
                    if bias is not None:
                        torch.addmm(bias, a, b, out=out)
                    else:
                        torch.matmul(a, b, out=out)
                    return
                acc = torch.matmul(a, b)
                grid = (cdiv(M, 64), cdiv(N, 64), batch)
                epilogue[grid](acc, *io, M, N, *syms, BLOCK_M=64, BLOCK_N=64)
                return
            bm, bn, bk, warps, stages = cfg
            sa = (0, *a.stride()) if squeeze else a.stride()
            sb = (0, *b.stride()) if squeeze else b.stride()
            grid = (cdiv(M, bm) * cdiv(N, bn), batch)
            template[grid](
                a,
                b,
                *io,
                M,
                N,
                K,
                sa[1],
                sa[2],
                sb[1],
                sb[2],
                sa[0],
                sb[0],
                *syms,
                ALLOW_TF32=tf32,
                BLOCK_M=bm,
                BLOCK_N=bn,
                BLOCK_K=bk,
                GROUP_M=8,
                num_warps=warps,
                num_stages=stages,
            )

        if self.warming:  # compile what "auto" will time, launch nothing (precompile.py)
            for cfg in self.matmuls.warm_candidates(M, N, K, a.element_size()):
                launch(cfg)
            return
        memo = (key, a.dtype, M, N, K)
        cfg = self._chosen.get(memo)
        if cfg is None:
            cfg = self._chosen[memo] = self.matmuls.choose(
                f"{key}|{a.dtype}", M, N, K, launch, a.element_size())
        launch(cfg)

    # --- attention ------------------------------------------------------------------------------
    def attention(
        self, kernel, q, k, v, mask=None, is_causal=False, scale=None, enable_gqa=False
    ) -> torch.Tensor:
        """The flash-attention kernel, or torch SDPA where measuring on the GPU found it faster
        for this shape (policy "auto"/"autotune"; "triton" and the interpreter: the kernel;
        "torch": SDPA). SDPA's result is copied into the kernel's output layout, which the
        generated code indexes."""

        def ours():
            return flash_attention(kernel, q, k, v, mask, is_causal, scale, enable_gqa,
                                   interpret=self.interpret, allow_tf32=self.allow_tf32)

        policy = self.matmuls.policy
        if policy != TORCH and (self.interpret or policy == "triton" or self.warming):
            return ours()
        if policy != TORCH:
            memo = ("attention", tuple(q.shape), tuple(k.shape), q.dtype, is_causal,
                    None if mask is None else (mask.dtype, tuple(mask.shape)), enable_gqa)
            choice = self._chosen.get(memo)
            if choice is None:
                t_ours = _time_gpu(ours)
                t_sdpa = _time_gpu(lambda: _sdpa(q, k, v, mask, is_causal, scale, enable_gqa))
                choice = self._chosen[memo] = "triton" if t_ours <= t_sdpa else TORCH
            if choice == "triton":
                return ours()
        got = _sdpa(q, k, v, mask, is_causal, scale, enable_gqa)
        if got.permute(0, 2, 1, 3).is_contiguous():  # already the kernel's layout (cuDNN)
            return got
        b, h, s, dv = q.shape[0], q.shape[1], q.shape[2], v.shape[3]
        out = torch.empty((b, s, h, dv), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
        return out.copy_(got)

    def attention_with_lse(self, kernel, q, k, v, mask=None, is_causal=False, scale=None,
                           enable_gqa=False) -> tuple[torch.Tensor, torch.Tensor]:
        """meshweave.attention (training): (out, lse) from the flash-attention kernel; policy
        "torch" runs the op's eager implementation (ir/ops/attention.py)."""
        if self.matmuls.policy == TORCH:
            return torch.ops.meshweave.attention(q, k, v, mask, is_causal, scale, enable_gqa)
        return flash_attention_with_lse(kernel, q, k, v, mask, is_causal, scale, enable_gqa,
                                        interpret=self.interpret, allow_tf32=self.allow_tf32)

    def attention_backward(self, dkdv_kernel, dq_kernel, dout, q, k, v, out, lse, mask=None,
                           is_causal=False, scale=None, enable_gqa=False) -> tuple:
        """meshweave.attention_backward: (dq, dk, dv) from the two backward kernels
        (kernels/flash_attention_bwd.py); policy "torch" runs the op's eager implementation."""
        if self.matmuls.policy == TORCH:
            return torch.ops.meshweave.attention_backward(dout, q, k, v, out, lse, mask,
                                                          is_causal, scale, enable_gqa)
        return flash_attention_backward(dkdv_kernel, dq_kernel, dout, q, k, v, out, lse, mask,
                                        is_causal, scale, enable_gqa, interpret=self.interpret,
                                        allow_tf32=self.allow_tf32)

    # --- quant.linear -------------------------------------------------------------------------
    def quant_linear(self, kernels, x, qweight, scales, zeros, bias, *, bits: int,
                     group_size: int) -> torch.Tensor:
        """The weight-only quantized GEMM (kernels/quant_matmul.py); policy "torch" runs the
        op's reference rule (dequantize + torch.matmul) instead. While precompile.py warms the
        module nothing is launched: the autotuner would time configs on unwritten buffers."""
        if self.warming:
            return torch.empty((*x.shape[:-1], qweight.shape[1]), dtype=x.dtype, device=x.device)
        if self.matmuls.policy == TORCH:
            return reference_quant_linear(x, qweight, scales, zeros, bias, bits=bits,
                                          group_size=group_size)
        return quant_matmul(x, qweight, scales, zeros, bias, bits, group_size, kernels=kernels,
                            interpret=self.interpret, allow_tf32=self.allow_tf32)

    # --- moe.experts ----------------------------------------------------------------------------
    def moe_experts(self, kernel, x, weights, ids, w_in, w_gate, w_out, **attrs) -> tuple:
        """(y, dropped) by the grouped GEMM (kernels/moe_dispatch.py); policy "torch" runs the
        op's eager rule (ir/ops/moe.py). While precompile.py warms the module nothing runs:
        sorting garbage ids would index out of range."""
        if self.warming:
            return torch.empty_like(x), torch.zeros((), dtype=torch.int64, device=x.device)
        if self.matmuls.policy == TORCH:
            return reference_moe_experts(x, weights, ids, w_in, w_gate, w_out, **attrs)
        return moe_experts_grouped(x, weights, ids, w_in, w_gate, w_out, kernel=kernel,
                                   interpret=self.interpret, allow_tf32=self.allow_tf32, **attrs)


def _sdpa(q, k, v, mask, is_causal, scale, enable_gqa) -> torch.Tensor:
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
