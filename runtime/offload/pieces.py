"""A rotary decoder's step cut at attention, as compiled programs: what the device runs.

Hybrid generation needs the device to stop at each layer's attention, so that the host can
attend for the sequences whose caches it holds. The step is cut into pieces, each compiled
with meshweave.compile (the CompiledModel's own options, so Triton kernels on CUDA):

  embed      ids [R, S] -> x [R, S, hidden]
  pre        x, positions -> q [R, S, H, D], k, v [R, S, KV, D] (the attention norm, the
             q/k/v projections and RoPE)
  attention  q, k, v, positions, k_cache, v_cache [R, KV, C, D] -> y [R, S, H*D] and the
             updated caches (models/kv_decoder.py attend_cached: the whole-step program's
             own function)
  post       x, y -> x (output projection, residual, MLP)
  head       x, last [R] -> logits [R, vocab] of each row's last token

`pre` and `post` take the layer's weights as trailing inputs (torch.func.functional_call on
a template layer): the layers are identical, so one program per shape serves all of them.
Every piece computes what the model's own modules compute, in the same order of ops.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from meshweave.models.kv_decoder import attend_cached, rope_at
from meshweave.models.layers import apply_rope


class _Pre(nn.Module):
    def __init__(self, layer: nn.Module, theta: float) -> None:
        super().__init__()
        attn = layer.attn
        self.attn_norm, self.q_proj, self.k_proj, self.v_proj = (
            layer.attn_norm, attn.q_proj, attn.k_proj, attn.v_proj)
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.theta = theta

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.head_dim)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.head_dim)
        cos, sin = rope_at(positions, self.head_dim, self.theta, x.dtype)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v


class _Post(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.o_proj, self.mlp_norm, self.mlp = layer.attn.o_proj, layer.mlp_norm, layer.mlp

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        x = x + self.o_proj(y)
        return x + self.mlp(self.mlp_norm(x))


class WeightsAsInputs(nn.Module):
    """`template` run with its parameters taken from the inputs after the first `n_act`."""

    def __init__(self, template: nn.Module, n_act: int) -> None:
        super().__init__()
        object.__setattr__(self, "_template", template)  # not a submodule: no parameters
        self.names = [n for n, _ in template.named_parameters()]
        self.n_act = n_act

    def forward(self, *args: torch.Tensor):
        weights = dict(zip(self.names, args[self.n_act:]))
        return functional_call(self._template, weights, args[:self.n_act])


class DeviceAttention(nn.Module):
    """Chain attention over a static cache: the token at position p writes slot p and sees
    slots 0..p (models/kv_decoder.py's rule for prompts and chains)."""

    def __init__(self, n_rep: int) -> None:
        super().__init__()
        self.n_rep = n_rep

    def forward(self, q, k, v, positions, k_cache, v_cache):
        b, s, kv, d = k.shape
        capacity = k_cache.shape[2]
        slots = torch.arange(capacity, device=positions.device)
        visible = (slots[None, None, None, :] <= positions[:, None, :, None])
        index = positions[:, None, :, None].expand(b, kv, s, d)
        return attend_cached(q, k, v, index, visible, k_cache, v_cache, self.n_rep)


class _Head(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.norm, self.lm_head = model.norm, model.lm_head

    def forward(self, x: torch.Tensor, last: torch.Tensor):
        rows = torch.arange(x.shape[0], device=x.device)
        return self.lm_head(self.norm(x[rows, last]))


class Pieces:
    """The compiled pieces of one decoder, made on first use per shape, and a device timer
    for the scheduler's profile (CUDA events on CUDA; wall time where the device is the
    CPU, whose pieces run synchronously)."""

    def __init__(self, model: nn.Module, compile_fn: Callable[..., Any]) -> None:
        self.model, self.compile_fn = model, compile_fn
        cfg = model.config
        theta = float(cfg.rope_theta)
        attn = model.layers[0].attn
        self.num_layers = len(model.layers)
        self.heads, self.kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.n_rep = self.heads // self.kv_heads
        self.pre_mod = WeightsAsInputs(_Pre(model.layers[0], theta), 2)
        self.post_mod = WeightsAsInputs(_Post(model.layers[0]), 2)
        self.pre_weights = [[p for _, p in _Pre(lay, theta).named_parameters()]
                            for lay in model.layers]
        self.post_weights = [[p for _, p in _Post(lay).named_parameters()]
                             for lay in model.layers]
        self.attn_mod, self.head_mod = DeviceAttention(self.n_rep), _Head(model)
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.programs: dict[tuple, Any] = {}
        self.compile_seconds = 0.0
        self.cuda = self.device.type == "cuda"

    def _program(self, key: tuple, module: nn.Module, example: tuple) -> Any:
        if key not in self.programs:
            t0 = time.perf_counter()
            with torch.no_grad():
                self.programs[key] = self.compile_fn(module, example)
            self.compile_seconds += time.perf_counter() - t0
        return self.programs[key]

    def _x(self, rows: int, width: int) -> torch.Tensor:
        return torch.zeros(rows, width, self.model.config.hidden_size, dtype=self.dtype,
                           device=self.device)

    def _pos(self, rows: int, width: int) -> torch.Tensor:
        return torch.arange(width, device=self.device).expand(rows, width).contiguous()

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        prog = self._program(("embed", *ids.shape), self.model.embed, (ids,))
        return prog(ids)

    def pre(self, i: int, x: torch.Tensor, positions: torch.Tensor):
        r, s = positions.shape
        prog = self._program(("pre", r, s), self.pre_mod,
                             (self._x(r, s), self._pos(r, s), *self.pre_weights[0]))
        return prog(x, positions, *self.pre_weights[i])

    def post(self, i: int, x: torch.Tensor, y: torch.Tensor):
        r, s = x.shape[:2]
        prog = self._program(("post", r, s), self.post_mod,
                             (self._x(r, s), torch.zeros(r, s, self.heads * self.head_dim,
                                                         dtype=self.dtype, device=self.device),
                              *self.post_weights[0]))
        return prog(x, y, *self.post_weights[i])

    def attention(self, q, k, v, positions, k_cache, v_cache):
        r, s = positions.shape
        c = k_cache.shape[2]
        if ("attn", r, s, c) not in self.programs:
            qz = torch.zeros(r, s, self.heads, self.head_dim, dtype=self.dtype,
                             device=self.device)
            kz = torch.zeros(r, s, self.kv_heads, self.head_dim, dtype=self.dtype,
                             device=self.device)
            cz = torch.zeros(r, self.kv_heads, c, self.head_dim, dtype=self.dtype,
                             device=self.device)
            self._program(("attn", r, s, c), self.attn_mod,
                          (qz, kz, kz.clone(), self._pos(r, s), cz, cz.clone()))
        return self.programs[("attn", r, s, c)](q, k, v, positions, k_cache, v_cache)

    def head(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        r, s = x.shape[:2]
        prog = self._program(("head", r, s), self.head_mod,
                             (self._x(r, s), torch.zeros(r, dtype=torch.int64,
                                                         device=self.device)))
        return prog(x, last)

    def compile_all(self, shapes: list[tuple[str, int, int]], capacity: int) -> None:
        """Compile the pieces ahead of the timed loop: (kind, rows, width) triples."""
        for kind, r, s in shapes:
            if r == 0:
                continue
            x, pos = self._x(r, s), self._pos(r, s)
            if kind == "embed":
                self.embed(torch.zeros(r, s, dtype=torch.int64, device=self.device))
            elif kind == "layer":
                q, k, v = self.pre(0, x, pos)
                self.post(0, x, torch.zeros(r, s, self.heads * self.head_dim, dtype=self.dtype,
                                            device=self.device))
            elif kind == "attn":
                q, k, v = self.pre(0, x, pos)
                cz = torch.zeros(r, self.kv_heads, capacity, self.head_dim, dtype=self.dtype,
                                 device=self.device)
                self.attention(q, k, v, pos, cz, cz.clone())
            elif kind == "head":
                self.head(x, torch.zeros(r, dtype=torch.int64, device=self.device))


class DeviceTimer:
    """Accumulates device seconds per component: CUDA event pairs read after the step's
    synchronisation, or wall time on a CPU "device"."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.spans: list[tuple[str, Any, Any]] = []

    def start(self) -> Any:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def stop(self, component: str, started: Any) -> None:
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.spans.append((component, started, e))
        else:
            self.spans.append((component, started, time.perf_counter()))

    def totals(self) -> dict[str, float]:
        """Seconds per component since the last call (synchronises on CUDA)."""
        if self.cuda and self.spans:
            self.spans[-1][2].synchronize()
        out: dict[str, float] = {}
        for comp, a, b in self.spans:
            dt = a.elapsed_time(b) / 1e3 if self.cuda else b - a
            out[comp] = out.get(comp, 0.0) + dt
        self.spans = []
        return out
