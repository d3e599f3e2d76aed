"""The server's side of the ranks' reply queue: one thread files every reply as it comes.

Replies (worker.py): ("out", wid, rid, rank, logits), ("reqerr", wid, rid, text),
("loaded", wid, gen) (a joining rank has its dense weights), ("ready", wid, gen, stats),
("failed", wid, gen, text), ("fatal", wid, traceback), ("standby", sid) (a pre-spawned process
is up). Waiters call `wait(predicate, timeout)`, which returns as soon as a reply makes the
predicate true.
"""

from __future__ import annotations

import queue as queue_mod
import threading


class Inbox:
    def __init__(self, q) -> None:
        self.queue = q
        self.cond = threading.Condition()
        self.outs: dict[int, dict[int, object]] = {}
        self.errs: dict[int, list] = {}
        self.ready: dict[int, dict[int, dict]] = {}
        self.standby: set[int] = set()
        self.loaded: dict[int, set[int]] = {}
        self.failed: dict[int, tuple] = {}
        self.fatal: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="elastic-inbox")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                msg = self.queue.get(timeout=0.1)
            except queue_mod.Empty:
                continue
            except (EOFError, OSError):
                return
            with self.cond:
                self._file(msg)
                self.cond.notify_all()

    def _file(self, msg) -> None:
        kind = msg[0]
        if kind == "out":
            _, wid, rid, rank, logits = msg
            self.outs.setdefault(rid, {})[rank] = logits
        elif kind == "reqerr":
            self.errs.setdefault(msg[2], []).append((msg[1], msg[3]))
        elif kind == "ready":
            self.ready.setdefault(msg[2], {})[msg[1]] = msg[3]
        elif kind == "standby":
            self.standby.add(msg[1])
        elif kind == "loaded":
            self.loaded.setdefault(msg[2], set()).add(msg[1])
        elif kind == "failed":
            self.failed.setdefault(msg[2], (msg[1], msg[3]))
        elif kind == "fatal":
            self.fatal[msg[1]] = msg[2]

    def wait(self, predicate, timeout_s: float) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout_s)

    def answered(self, rid: int, n: int) -> bool:
        return len(self.outs.get(rid, ())) + len(self.errs.get(rid, ())) >= n or rid in self.errs

    def take(self, rid: int):
        with self.cond:
            return self.outs.pop(rid, {}), self.errs.pop(rid, [])

    def ready_set(self, gen: int) -> set[int]:
        return set(self.ready.get(gen, {}))

    def ready_stats(self, gen: int) -> dict[int, dict]:
        with self.cond:
            return dict(self.ready.get(gen, {}))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
