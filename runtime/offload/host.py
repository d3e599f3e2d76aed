"""The host side of hybrid generation: KV caches in host memory and attention over them.

`HostCaches` holds the caches of the host-resident sequences, [layers, R, KV, C, D] each
(pinned when the device is CUDA, so the copies overlap), and `attend` runs one layer's
attention for them on a pool of CPU threads: each row writes its new k, v into its slots in
place and attends over its live prefix only (slots 0..its last position), so the host reads
the tokens a sequence has, not the static capacity. Rows that finished are skipped. The
math is the device attention's (models/kv_decoder.py attend_cached): the same masked
softmax(q k^T / sqrt(D)) v, with GQA heads repeated in the same order.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import torch.nn.functional as F


class HostCaches:
    """K/V caches of `rows` sequences on the host, and a thread pool that attends over them."""

    def __init__(self, layers: int, rows: int, kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype, n_rep: int, pin: bool, threads: int = 1) -> None:
        shape = (layers, rows, kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        if pin:
            self.k, self.v = self.k.pin_memory(), self.v.pin_memory()
        self.rows, self.n_rep = rows, n_rep
        self.threads = max(1, int(threads))
        self.pool = ThreadPoolExecutor(self.threads, thread_name_prefix="meshweave-host-attn")
        self.busy_seconds = 0.0  # summed over threads

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _rows(self, layer: int, rows: list[int], q, k, v, positions, out) -> float:
        t0 = time.perf_counter()
        kc, vc = self.k[layer], self.v[layer]
        with torch.no_grad():
            for r in rows:
                pos = positions[r]  # [S]
                kc[r].index_copy_(1, pos, k[r].transpose(0, 1))  # [KV, S, D] into slots
                vc[r].index_copy_(1, pos, v[r].transpose(0, 1))
                n = int(pos.max()) + 1
                keys = kc[r, :, :n].repeat_interleave(self.n_rep, dim=0)  # [H, n, D]
                values = vc[r, :, :n].repeat_interleave(self.n_rep, dim=0)
                visible = torch.arange(n)[None, :] <= pos[:, None]  # [S, n]
                y = F.scaled_dot_product_attention(q[r].transpose(0, 1)[None], keys[None],
                                                   values[None], attn_mask=visible[None, None])
                out[r] = y[0].transpose(0, 1).reshape(pos.shape[0], -1)
        return time.perf_counter() - t0

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               positions: torch.Tensor, active: list[int]) -> Future:
        """Start one layer's attention for the `active` rows (host tensors q [R, S, H, D],
        k, v [R, S, KV, D], positions [R, S]); the future's result is y [R, S, H*D] (zeros
        for inactive rows) once every thread is done."""
        out = torch.zeros(q.shape[0], q.shape[1], q.shape[2] * q.shape[3], dtype=q.dtype)
        chunks = [active[i::self.threads] for i in range(self.threads) if active[i::self.threads]]
        parts = [self.pool.submit(self._rows, layer, c, q, k, v, positions, out)
                 for c in chunks]
        done: Future = Future()
        lock = threading.Lock()

        def finish(_):
            with lock:
                if not all(p.done() for p in parts) or done.done():
                    return
                try:
                    self.busy_seconds += sum(p.result() for p in parts)
                    done.set_result(out)
                except BaseException as e:  # a failed row: the caller's result() raises it
                    done.set_exception(e)

        if not parts:
            done.set_result(out)
        for p in parts:
            p.add_done_callback(finish)
        return done

    def close(self) -> None:
        self.pool.shutdown(wait=True)
