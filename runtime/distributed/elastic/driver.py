"""The client: streams requests at a server, checks every answer against the eager reference.

    stream = RequestStream(server, batches, references)
    stream.start()          # a thread: request, check, record, next (one request in flight)
    ...                     # server.scale(4) meanwhile
    stream.stop()
    summary(stream.records, t_from, t_to)   # counts, failed, mismatched, p50 / p99 latency

A request fails when the server raises (a rank died or timed out); it mismatches when its
logits are not allclose (rtol 1e-5, atol 1e-6) to the single-device eager model's on the same
weights. `max_err` keeps the largest absolute difference seen.
"""

from __future__ import annotations

import dataclasses
import threading
import time

import torch

from ..errors import DistributedError

RTOL, ATOL = 1e-5, 1e-6


@dataclasses.dataclass
class Record:
    t_submit: float
    latency_s: float
    gen: int | None
    ok: bool  # answered and matched
    failed: bool
    max_err: float
    error: str = ""


def check(out: torch.Tensor, ref: torch.Tensor) -> tuple[bool, float]:
    if out.shape != ref.shape:
        return False, float("inf")
    return torch.allclose(out, ref, rtol=RTOL, atol=ATOL), (out - ref).abs().max().item()


class RequestStream:
    def __init__(self, server, batches, references, pause_s: float = 0.0) -> None:
        self.server, self.batches, self.refs = server, batches, references
        self.pause_s = pause_s
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="elastic-client")

    def one(self, i: int) -> Record:
        t = time.time()
        try:
            out, gen = self.server.request(self.batches[i])
        except DistributedError as err:
            return Record(t, time.time() - t, None, False, True, float("nan"), str(err))
        ok, err = check(out, self.refs[i])
        return Record(t, time.time() - t, gen, ok, False, err)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            self.records.append(self.one(i % len(self.batches)))
            i += 1
            if self.pause_s:
                time.sleep(self.pause_s)

    def start(self) -> RequestStream:
        self._thread.start()
        return self

    def stop(self) -> list[Record]:
        self._stop.set()
        self._thread.join(60)
        return self.records


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(q / 100 * len(v) + 0.5)) - 1))]


def summary(records: list[Record], t_from: float = 0.0, t_to: float = float("inf")) -> dict:
    """Requests submitted in [t_from, t_to): how many, failed, mismatched, p50/p99 latency."""
    sel = [r for r in records if t_from <= r.t_submit < t_to]
    lat = [r.latency_s for r in sel if not r.failed]
    return {"requests": len(sel), "failed": sum(r.failed for r in sel),
            "mismatched": sum(not r.ok and not r.failed for r in sel),
            "p50_s": percentile(lat, 50), "p99_s": percentile(lat, 99),
            "max_err": max((r.max_err for r in sel if not r.failed), default=0.0),
            "gens": sorted({r.gen for r in sel if r.gen is not None})}
