"""The elastic MoE server's front end: starts ranks, answers requests, re-scales live.

    server = ElasticServer(cfg, ckpt_path)
    server.start(2)                      # generation 0: 2 ranks, experts from the checkpoint
    logits, gen = server.request(tokens) # every rank of the generation runs its rows
    report = server.scale(4)             # N -> M while requests keep being answered
    server.stop()

The server process hosts the TCPStore (127.0.0.1, an OS-assigned port) that every generation's
groups rendezvous on, under the prefix "g<gen>/". A re-scaling: (1) re-plans the placement
(placement.plan_placement with the old one, so only experts whose owner changes move); (2)
spawns the joining ranks, which load only the dense weights while the old generation keeps
serving; (3) tells the current ranks to prepare, which they do in a background thread, still
serving: connect the new generation's groups and send or receive the moved experts; (4) waits
until every rank of the old and new meshes has its groups and its experts; (5) switches
atomically between two requests: the next request goes to the new generation, the leaving ranks
exit.

Nothing waits without a bound. Requests and re-scalings watch their ranks' processes: a rank
that dies, reports an error or outlives the timeout makes a request raise DistributedError, and
makes a re-scaling roll back (the old ranks drop the new generation, the joiners are killed,
the old mesh keeps serving) and raise ScaleError naming the rank and what happened.
"""

from __future__ import annotations

import dataclasses
import datetime
import multiprocessing as mp
import threading
import time

import torch
import torch.distributed as dist

from ..errors import DistributedError
from .inbox import Inbox
from .placement import check_fits, expert_moves, plan_placement
from .worker import standby_main, worker_main


class ScaleError(DistributedError):
    """A re-scaling failed. `rolled_back`: the old mesh is intact and keeps serving (False when
    the rank that died was one of its own)."""

    def __init__(self, message: str, rank: int | None = None, rolled_back: bool = True):
        self.rolled_back = rolled_back
        super().__init__(message, rank)


@dataclasses.dataclass
class ScaleReport:
    """What a re-scaling did and when (time.time() stamps); worker_stats: wid -> the rank's
    report (kept / sent / received experts, bytes_sent, load_s, join_s, transfer_s)."""

    old_world: int
    new_world: int
    gen: int
    moves: list  # [(expert, src, dst)]
    experts_sent: list  # experts actually sent, as reported by the ranks
    bytes_sent: int
    t_request: float
    t_loaded: float  # every joining rank has its dense weights
    t_ready: float
    t_switch: float
    worker_stats: dict


class ElasticServer:
    def __init__(self, cfg, ckpt_path: str, *, join_timeout_s: float = 60.0,
                 request_timeout_s: float = 30.0, pg_timeout_s: float = 15.0) -> None:
        self.cfg, self.ckpt = cfg, ckpt_path
        self.join_timeout_s, self.request_timeout_s = join_timeout_s, request_timeout_s
        self.pg_timeout_s = pg_timeout_s
        self._mp = mp.get_context("spawn")
        self._store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                                    timeout=datetime.timedelta(seconds=join_timeout_s))
        self.inbox = Inbox(self._mp.Queue())
        self.procs: dict[int, object] = {}
        self.ctls: dict[int, object] = {}
        self.members: list[int] = []  # wids of the serving generation, in rank order
        self.owner: tuple[int, ...] = ()
        self.gen = -1
        self._next_gen = self._next_wid = self._next_rid = 0
        self._lock = threading.Lock()  # one request at a time; a switch is between two
        self.first_answer: dict[int, float] = {}
        self._standby: list[tuple] = []  # (process, ctl queue), pre-spawned
        self._roles: dict[int, str] = {}
        self._scaling = threading.Lock()

    @property
    def world(self) -> int:
        return len(self.members)

    def _spawn(self, rank: int, world: int, gen: int, owner, joining: bool, plan=None) -> int:
        wid = self._next_wid
        self._next_wid += 1
        spec = {"wid": wid, "rank": rank, "world": world, "gen": gen, "owner": tuple(owner),
                "joining": joining, "plan": plan, "cfg": self.cfg, "ckpt": self.ckpt,
                "host": "127.0.0.1", "port": self._store.port,
                "join_timeout_s": self.join_timeout_s, "pg_timeout_s": self.pg_timeout_s}
        if self._standby:
            proc, ctl = self._standby.pop(0)
            ctl.put(("spec", spec))
        else:
            ctl = self._mp.Queue()
            proc = self._mp.Process(target=worker_main, args=(spec, ctl, self.inbox.queue),
                                    daemon=True, name=f"elastic-moe-w{wid}")
            proc.start()
        self.procs[wid], self.ctls[wid] = proc, ctl
        self._roles[wid] = f"rank {rank} of generation {gen}{', joining' if joining else ''}"
        return wid

    def prespawn(self, n: int, timeout_s: float = 120.0) -> None:
        """Start n standby processes (torch imported, no weights) and wait until they are up;
        the next n ranks this server starts or adds are these processes."""
        sids = []
        for _ in range(n):
            sid = -1 - len(self.inbox.standby) - len(self._standby) - len(sids)
            ctl = self._mp.Queue()
            proc = self._mp.Process(target=standby_main, args=(sid, ctl, self.inbox.queue),
                                    daemon=True, name=f"elastic-moe-standby{-sid}")
            proc.start()
            sids.append(sid)
            self._standby.append((proc, ctl))
        if not self.inbox.wait(lambda: self.inbox.standby >= set(sids), timeout_s):
            raise DistributedError(f"prespawn: {n} standby processes not up in {timeout_s} s")

    def _describe(self, wid: int) -> str:
        return f"worker {wid} ({self._roles[wid]})"

    def _wait(self, done, wids, what: str, timeout_s: float, gen: int | None = None) -> None:
        """Until done(); raise DistributedError when one of `wids` dies or fails (or reports
        generation `gen` failed), or on timeout."""
        deadline = time.time() + timeout_s
        while not self.inbox.wait(done, 0.05):
            self._raise_if_dead(wids, what)
            if gen in self.inbox.failed:
                wid, text = self.inbox.failed[gen]
                # a peer's error is often the echo of a rank that died: name the dead one
                self._raise_if_dead(wids, what, grace_s=1.0,
                                    also=f" ({self._describe(wid)} saw: {text})")
                raise DistributedError(f"{what}: {self._describe(wid)} failed: {text}", wid)
            if time.time() > deadline:
                raise DistributedError(f"{what}: timed out after {timeout_s:.0f} s")

    def _raise_if_dead(self, wids, what: str, grace_s: float = 0.0, also: str = "") -> None:
        deadline = time.time() + grace_s
        while True:
            for wid in wids:
                if wid in self.inbox.fatal:
                    raise DistributedError(f"{what}: {self._describe(wid)} failed{also}", wid,
                                           self.inbox.fatal[wid])
                code = self.procs[wid].exitcode
                if code is not None:
                    raise DistributedError(f"{what}: {self._describe(wid)} died with exit "
                                           f"code {code}{also}", wid)
            if time.time() >= deadline:
                return
            time.sleep(0.02)

    def start(self, world: int) -> None:
        check_fits(self.cfg.num_experts, world)
        gen = self._next_gen
        self._next_gen += 1
        owner = plan_placement(self.cfg.num_experts, world)
        wids = [self._spawn(r, world, gen, owner, joining=False) for r in range(world)]
        try:
            self._wait(lambda: self.inbox.ready_set(gen) >= set(wids), wids,
                       f"starting {world} ranks", self.join_timeout_s)
        except DistributedError:
            self._kill(wids)
            raise
        self.members, self.owner, self.gen = wids, owner, gen

    def request(self, tokens: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Logits [B, S, vocab] for tokens [B, S], and the generation that computed them."""
        if tokens.dtype != torch.int64 or tokens.dim() != 2 or tokens.shape[0] < 1 or \
                not 1 <= tokens.shape[1] <= self.cfg.max_seq_len:
            raise ValueError(f"request: expected token ids int64 [B >= 1, 1 <= S <= "
                             f"{self.cfg.max_seq_len}]; got {tokens.dtype} {list(tokens.shape)}")
        with self._lock:
            gen, members = self.gen, list(self.members)
            if not members:
                raise DistributedError("request: the server has no ranks (call start first)")
            rid = self._next_rid
            self._next_rid += 1
            for wid in members:
                self.ctls[wid].put(("req", gen, rid, tokens))
            try:
                self._wait(lambda: self.inbox.answered(rid, len(members)), members,
                           f"request {rid}", self.request_timeout_s)
            finally:
                outs, errs = self.inbox.take(rid)
            if errs:
                wid, msg = errs[0]
                self._raise_if_dead(members, f"request {rid}", grace_s=1.0,
                                    also=f" ({self._describe(wid)} saw: {msg[:200]})")
                raise DistributedError(f"request {rid}: {self._describe(wid)} failed: {msg}", wid)
            self.first_answer.setdefault(gen, time.time())
            return torch.cat([outs[r] for r in range(len(members))]), gen

    def scale(self, world: int, fault: dict | None = None, on_spawn=None) -> ScaleReport:
        """Re-scale the serving mesh to `world` ranks; requests may flow meanwhile. `fault`
        ({"wid": w, "stage": "join" | "transfer"}) makes worker w exit there (for tests);
        on_spawn(processes) is called once the joiners are started."""
        t0 = time.time()
        check_fits(self.cfg.num_experts, world)
        if not self._scaling.acquire(blocking=False):
            raise DistributedError("scale: another re-scaling is in progress")
        try:
            return self._scale(world, t0, fault, on_spawn)
        finally:
            self._scaling.release()

    def _scale(self, world: int, t0: float, fault, on_spawn) -> ScaleReport:
        old, old_gen = list(self.members), self.gen
        if world == len(old):
            raise ValueError(f"scale: the mesh already has {world} ranks")
        gen = self._next_gen
        self._next_gen += 1
        owner = plan_placement(self.cfg.num_experts, world, previous=self.owner)
        moves = expert_moves(self.owner, owner)
        plan = {"gen": gen, "old_world": len(old), "new_world": world, "owner": owner,
                "moves": moves, "fault": fault}
        joiners = [self._spawn(r, world, gen, owner, joining=True, plan=plan)
                   for r in range(len(old), world)]
        if on_spawn is not None:
            on_spawn([self.procs[w] for w in joiners])
        everyone = old + joiners
        try:
            # the old ranks connect once the joiners have loaded, so that a group's rendezvous
            # never waits on a process start (its timeout stays short)
            self._wait(lambda: self.inbox.loaded.get(gen, set()) >= set(joiners), everyone,
                       f"scaling {len(old)} -> {world} ranks (generation {gen}): loading the "
                       f"joining ranks", self.join_timeout_s, gen)
            t_loaded = time.time()
            for wid in old:
                self.ctls[wid].put(("prepare", plan))
            self._wait(lambda: self.inbox.ready_set(gen) >= set(everyone), everyone,
                       f"scaling {len(old)} -> {world} ranks (generation {gen})",
                       self.join_timeout_s, gen)
        except DistributedError as err:
            for wid in old:
                if self.procs[wid].exitcode is None:
                    self.ctls[wid].put(("abort", gen))
            self._kill(joiners)
            if err.rank in old and self.procs[err.rank].exitcode is not None:
                raise ScaleError(
                    f"scaling {len(old)} -> {world} ranks failed: {err}; the joining ranks were "
                    f"stopped, but generation {old_gen} lost that rank, so its requests fail "
                    f"until the job is restarted", err.rank, rolled_back=False) from err
            raise ScaleError(
                f"scaling {len(old)} -> {world} ranks failed and was rolled back to generation "
                f"{old_gen} ({len(old)} ranks), which keeps serving: {err}", err.rank) from err
        t_ready = time.time()
        with self._lock:
            self.members, self.owner, self.gen = everyone[:world], owner, gen
        for rank, wid in enumerate(self.members):
            self._roles[wid] = f"rank {rank} of generation {gen}"
        t_switch = time.time()
        for wid in old[world:]:
            self.ctls[wid].put(("exit",))
        stats = self.inbox.ready_stats(gen)
        sent = sorted(e for s in stats.values() for e in s.get("sent", []))
        nbytes = sum(s.get("bytes_sent", 0) for s in stats.values())
        return ScaleReport(len(old), world, gen, moves, sent, nbytes, t0, t_loaded, t_ready,
                           t_switch, stats)

    def wait_first_answer(self, gen: int, timeout_s: float = 30.0) -> float:
        deadline = time.time() + timeout_s
        while gen not in self.first_answer:
            if time.time() > deadline:
                raise DistributedError(f"generation {gen} answered no request in {timeout_s} s")
            time.sleep(0.005)
        return self.first_answer[gen]

    def _kill(self, wids) -> None:
        for wid in wids:
            if self.procs[wid].exitcode is None:
                self.procs[wid].kill()
        for wid in wids:
            self.procs[wid].join(5)

    def stop(self) -> None:
        for wid, proc in self.procs.items():
            if proc.exitcode is None:
                self.ctls[wid].put(("exit",))
        deadline = time.time() + 10
        for proc in self.procs.values():
            proc.join(max(0.1, deadline - time.time()))
        self._kill(list(self.procs))
        for proc, ctl in self._standby:
            ctl.put(("exit",))
            proc.join(2)
            if proc.exitcode is None:
                proc.kill()
        self._standby = []
        self.inbox.close()
        self.members = []
