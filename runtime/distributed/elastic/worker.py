"""One rank of the elastic MoE server: a process that serves requests and re-scales live.

    worker_main(spec, ctl, res)   # the process target; spec is a dict built by server.py
    standby_main(sid, ctl, res)   # a pre-spawned process that becomes a worker on ("spec", spec)

Messages on `ctl` (from the server, in one order for every rank of a generation):
  ("req", gen, rid, tokens)   run the model on this rank's rows of tokens [B, S] with the
                              generation's group; reply ("out", wid, rid, rank, logits)
  ("prepare", plan)           (sent once the joiners have loaded) join generation plan["gen"]
                              in a background thread while serving goes on: connect its
                              groups over the same TCPStore (prefix "g<gen>/"), send the
                              experts this rank gives away, receive those it gets; reply ("ready", wid, gen, stats) or ("failed", ...)
  ("abort", gen)              the re-scaling failed elsewhere: drop what it built (roll back)
  ("exit",)                   leave

The first request of the new generation is the switch: the rank installs the new placement,
keeps the experts it still owns (no copy), adds the received ones, drops the rest and the old
group. A joining rank (spec["joining"]) loads only the dense weights and runs the transition
at start; an initial rank loads its experts from the checkpoint.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
import traceback

import torch
import torch.distributed as dist

from .placement import local_experts
from .weights import Holder, MeshState, ep_layers, ep_model

FAULT_EXIT_CODE = 17


def make_group(store, prefix: str, rank: int, size: int, timeout_s: float):
    return dist.ProcessGroupGloo(dist.PrefixStore(prefix, store), rank, size,
                                 datetime.timedelta(seconds=timeout_s))


class Worker:
    def __init__(self, spec: dict, res) -> None:
        self.spec, self.res, self.wid, self.rank = spec, res, spec["wid"], spec["rank"]
        self.store = dist.TCPStore(spec["host"], spec["port"], is_master=False,
                                   timeout=datetime.timedelta(seconds=spec["join_timeout_s"]))
        self.holder = Holder()
        self.gen = None
        self.pending: dict | None = None
        self.aborted: set[int] = set()
        self.lock = threading.Lock()

    # ---- start-up
    def start(self) -> None:
        spec = self.spec
        t0 = time.time()
        self.model = ep_model(spec["cfg"], spec["ckpt"], self.rank, spec["owner"], self.holder,
                              with_experts=not spec["joining"])
        t_load = time.time() - t0
        if spec["joining"]:
            self.res.put(("loaded", self.wid, spec["gen"]))
            self.transition(spec["plan"], {"load_s": t_load})
            return
        pg = make_group(self.store, f"g{spec['gen']}/ep", self.rank, spec["world"],
                        spec["pg_timeout_s"])
        self.holder.state = MeshState(pg, torch.tensor(spec["owner"]), spec["pg_timeout_s"])
        self.gen = spec["gen"]
        self.res.put(("ready", self.wid, self.gen, {"load_s": t_load, "t_ready": time.time()}))

    # ---- re-scaling
    def _fault(self, plan: dict, stage: str) -> None:
        fault = plan.get("fault")
        if fault and fault["wid"] == self.wid and fault["stage"] == stage:
            os._exit(FAULT_EXIT_CODE)

    def transition(self, plan: dict, stats: dict) -> None:
        gen, rank = plan["gen"], self.rank
        old_world, new_world = plan["old_world"], plan["new_world"]
        try:
            t0 = time.time()
            self._fault(plan, "join")
            timeout = self.spec["pg_timeout_s"]
            xfer = new_pg = None
            if old_world > new_world:  # scale-down: the leavers send over a union group
                xfer = make_group(self.store, f"g{gen}/xfer", rank, old_world, timeout)
            if rank < new_world:
                new_pg = make_group(self.store, f"g{gen}/ep", rank, new_world, timeout)
            xfer = xfer or new_pg
            stats["join_s"] = time.time() - t0
            self._fault(plan, "transfer")
            t1 = time.time()
            received = self.move_experts(xfer, plan["moves"], plan["owner"], stats)
            stats["transfer_s"] = time.time() - t1
        except Exception as err:  # reported, and the server rolls back
            self.res.put(("failed", self.wid, gen, f"{type(err).__name__}: {err}"))
            return
        with self.lock:
            if gen in self.aborted:
                return
            self.pending = {"gen": gen, "pg": new_pg, "owner": plan["owner"],
                            "received": received, "xfer": xfer}
        stats["t_ready"] = time.time()
        self.res.put(("ready", self.wid, gen, stats))

    def move_experts(self, pg, moves, new_owner, stats: dict) -> dict:
        """Post every send and receive of this rank's moves at once, then wait for them all."""
        layers = ep_layers(self.model)
        works, recv_bufs, sent = [], {}, []
        for e, src, dst in moves:
            if src == self.rank:
                buf = torch.cat([w.reshape(-1) for layer in layers for w in layer.local[e]
                                 if w is not None])
                works.append(pg.send([buf], dst, e))
                sent.append((e, buf))
            elif dst == self.rank:
                recv_bufs[e] = torch.empty(self.expert_numel(), dtype=self.dtype())
                works.append(pg.recv([recv_bufs[e]], src, e))
        timeout = datetime.timedelta(seconds=self.spec["pg_timeout_s"])
        for work in works:
            work.wait(timeout)
        stats["kept"] = sorted(e for e in layers[0].local if new_owner[e] == self.rank)
        stats["sent"] = [e for e, _ in sent]
        stats["received"] = sorted(recv_bufs)
        stats["bytes_sent"] = sum(b.numel() * b.element_size() for _, b in sent)
        return {e: self.unpack(buf) for e, buf in recv_bufs.items()}

    def expert_shapes(self) -> list[list[tuple]]:
        cfg = self.spec["cfg"]
        d, f = cfg.hidden_size, cfg.expert_ffn_size
        gated = cfg.expert_activation == "swiglu"
        one = [(d, f), (d, f) if gated else None, (f, d)]
        return [one for _ in range(cfg.num_layers)]

    def expert_numel(self) -> int:
        return sum(a * b for layer in self.expert_shapes() for s in layer if s for a, b in [s])

    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    def unpack(self, buf: torch.Tensor) -> list[tuple]:
        out, at = [], 0
        for layer in self.expert_shapes():
            ws = []
            for s in layer:
                if s is None:
                    ws.append(None)
                    continue
                n = s[0] * s[1]
                ws.append(buf[at:at + n].view(s))
                at += n
            out.append(tuple(ws))
        return out

    def switch(self) -> None:
        p = self.pending
        mine = local_experts(p["owner"], self.rank)
        for i, layer in enumerate(ep_layers(self.model)):
            layer.local = {e: layer.local[e] if e in layer.local else p["received"][e][i]
                           for e in mine}
        self.holder.state = MeshState(p["pg"], torch.tensor(p["owner"]), self.spec["pg_timeout_s"])
        self.gen, self.pending = p["gen"], None

    def abort(self, gen: int) -> None:
        with self.lock:
            self.aborted.add(gen)
            if self.pending and self.pending["gen"] == gen:
                self.pending = None

    # ---- serving
    def serve(self, gen: int, rid: int, tokens: torch.Tensor) -> None:
        with self.lock:
            if gen != self.gen and self.pending and self.pending["gen"] == gen:
                self.switch()
        if gen != self.gen:
            self.res.put(("reqerr", self.wid, rid, f"worker {self.wid} (rank {self.rank}) is in "
                          f"generation {self.gen}; request {rid} was for generation {gen}"))
            return
        pg = self.holder.state.pg
        chunk = torch.tensor_split(tokens, pg.size())[self.rank]
        try:
            with torch.no_grad():
                logits = self.model(chunk) if chunk.shape[0] else self.idle_step(chunk)
        except Exception as err:
            self.res.put(("reqerr", self.wid, rid, f"{type(err).__name__}: {err}"))
            return
        self.res.put(("out", self.wid, rid, self.rank, logits))

    def idle_step(self, chunk: torch.Tensor) -> torch.Tensor:
        """No rows for this rank (batch < world): still take part in every layer's exchange."""
        cfg = self.spec["cfg"]
        x = torch.zeros(0, cfg.hidden_size, dtype=self.dtype())
        for layer in ep_layers(self.model):
            layer(x, torch.zeros(0, cfg.num_experts, dtype=x.dtype))
        return torch.zeros(0, chunk.shape[1], cfg.vocab_size, dtype=x.dtype)

    def loop(self, ctl) -> None:
        while True:
            msg = ctl.get()
            if msg[0] == "req":
                self.serve(*msg[1:])
            elif msg[0] == "prepare":
                threading.Thread(target=self.transition, args=(msg[1], {}), daemon=True).start()
            elif msg[0] == "abort":
                self.abort(msg[1])
            elif msg[0] == "exit":
                return


def standby_main(sid: int, ctl, res) -> None:
    """A pre-spawned process (torch and this module imported) that waits to become a worker."""
    res.put(("standby", sid))
    msg = ctl.get()
    if msg[0] == "spec":
        worker_main(msg[1], ctl, res)
    os._exit(0)


def worker_main(spec: dict, ctl, res) -> None:
    torch.set_num_threads(1)
    try:
        worker = Worker(spec, res)
        worker.start()
        worker.loop(ctl)
    except Exception:
        res.put(("fatal", spec["wid"], traceback.format_exc()))
    res.close()
    res.join_thread()
    os._exit(0)  # a transition thread may still be blocked on a dead peer: do not wait for it
