"""Start local ranks as processes, watch them, and fail fast when one of them fails.

    results = launch(fn, world_size, args=(...), timeout_s=120)   # fn(rank, world_size, *args)

`launch` hosts a TCPStore on 127.0.0.1 (an OS-assigned port, so no port race), starts
`world_size` processes, and in each initializes torch.distributed (gloo on CPU; NCCL when CUDA
has a device per rank) with a short collective timeout, then calls `fn`. It returns every rank's
return value, in rank order.

Faults never hang the caller. The parent polls its children: when a rank raises, its traceback
text comes back through a queue; when a rank dies (os._exit, a signal, out of memory) its exit
code is seen. Either way the parent terminates the other ranks (which may be blocked in a
collective with the dead rank) and raises DistributedError naming the failing rank and its
error. A whole run that outlives `timeout_s` is killed the same way.

Under torchrun (RANK, WORLD_SIZE, MASTER_ADDR in the environment) `launch` does not start
processes: it initializes this process's rank from the environment, runs `fn` once and returns
`[result]`; torchrun does the monitoring.
"""

from __future__ import annotations

import datetime
import os
import pickle
import queue as queue_mod
import time
import traceback
from collections.abc import Callable
from typing import Any

from .errors import DistributedError

DEFAULT_TIMEOUT_S = 300.0  # whole run
DEFAULT_PG_TIMEOUT_S = 60.0  # one collective; short because the models here are small
_GRACE_S = 3.0  # after SIGTERM, before SIGKILL


def under_torchrun() -> bool:
    """True when this process was started by torchrun (or another env:// launcher)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def default_backend(world_size: int) -> str:
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= world_size:
        return "nccl"
    return "gloo"


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    backend: str | None = None,
    pg_timeout_s: float = DEFAULT_PG_TIMEOUT_S,
    start_method: str | None = None,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `world_size` ranks; return their results by rank.

    start_method: "fork" (default on Linux while CUDA is not initialized: a rank starts in
    milliseconds and inherits already-compiled graphs) or "spawn" (a fresh interpreter per rank,
    seconds each; `fn` and `args` must then be picklable, i.e. `fn` defined at module level).
    Raises DistributedError when a rank raises, dies, or the run exceeds `timeout_s`.
    """
    if not isinstance(world_size, int) or world_size < 1:
        raise DistributedError(f"launch: world_size must be a positive int, got {world_size!r}")
    backend = backend or default_backend(world_size)
    start_method = start_method or _default_start_method()
    if under_torchrun():
        return [_run_under_torchrun(fn, world_size, args, backend, pg_timeout_s)]
    return _launch_local(fn, world_size, args, timeout_s, backend, pg_timeout_s, start_method)


def _default_start_method() -> str:
    import sys

    import torch

    # fork is unsafe once CUDA is initialized (and unavailable off Linux); spawn always works.
    if sys.platform.startswith("linux") and not torch.cuda.is_initialized():
        return "fork" if fork_keeps_autograd() else "spawn"
    return "spawn"


_AUTOGRAD_FORK_BROKEN = False


def fork_keeps_autograd() -> bool:
    """Whether a forked child can still run a backward pass.

    Some torch releases (2.11 among them) refuse autograd in a child forked after the parent
    ran one ("Unable to handle autograd's threading in combination with fork-based
    multiprocessing"). A forked probe runs a one-element backward and reports; once broken,
    it stays broken for the life of the process, so that answer is kept.
    """
    global _AUTOGRAD_FORK_BROKEN
    if _AUTOGRAD_FORK_BROKEN:
        return False
    pid = os.fork()
    if pid == 0:  # the probe child: never returns into the caller's code
        code = 1
        try:
            import torch

            torch.ones(1, requires_grad=True).sum().backward()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    _AUTOGRAD_FORK_BROKEN = not (os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0)
    return not _AUTOGRAD_FORK_BROKEN


def _run_under_torchrun(fn, world_size, args, backend, pg_timeout_s) -> Any:
    import torch.distributed as dist

    env_world = int(os.environ["WORLD_SIZE"])
    if env_world != world_size:
        raise DistributedError(
            f"launch: torchrun started {env_world} ranks but this run needs {world_size}; "
            f"pass --nproc-per-node {world_size} (or a mesh of {env_world} devices)"
        )
    rank = int(os.environ["RANK"])
    _init_process_group(backend, rank, world_size, pg_timeout_s, store=None)
    try:
        return fn(rank, world_size, *args)
    finally:
        _shutdown(dist)


def _launch_local(fn, world_size, args, timeout_s, backend, pg_timeout_s, start_method):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    ctx = mp.get_context(start_method)
    results_q = ctx.Queue()
    port_box = ctx.Value("i", 0, lock=False)
    procs, store = [], None
    try:
        for rank in range(world_size):
            p = ctx.Process(
                target=_worker,
                args=(rank, world_size, port_box, backend, pg_timeout_s, fn, args, results_q),
                name=f"meshweave-rank{rank}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        # The store's server thread starts only now, after every fork: a child forked while
        # another thread of this process holds a lock can deadlock on it.
        store = dist.TCPStore(
            "127.0.0.1",
            0,
            None,
            True,
            wait_for_workers=False,
            timeout=datetime.timedelta(seconds=pg_timeout_s),
        )
        port_box.value = store.port
        return _monitor(procs, results_q, timeout_s)
    finally:
        _terminate(procs)
        results_q.close()
        del store


def _monitor(procs, results_q, timeout_s: float) -> list[Any]:
    """Collect results; on the first failure or the deadline, raise (the caller kills ranks)."""
    world_size = len(procs)
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}  # rank -> traceback text, or "" for a rank that died
    exited_at: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    first_failure = None
    while True:
        _drain(results_q, results, failures, 0.05)
        now = time.monotonic()
        for rank, p in enumerate(procs):
            if p.exitcode is None or rank in results or rank in failures:
                continue
            # A rank that returned or raised queued its message before exiting; wait for it.
            exited_at.setdefault(rank, now)
            if now - exited_at[rank] > 1.0 or p.exitcode != 0 and now - exited_at[rank] > 0.5:
                failures[rank] = f"died with {_describe_exit(p.exitcode)} before returning a result"
        if failures and first_failure is None:
            first_failure = now
        # After the first failure, give the other ranks a moment to report: a dead rank makes
        # its peers raise connection errors, and the report should name the root cause.
        if first_failure is not None and (
            now - first_failure > 1.5 or len(results) + len(failures) == world_size
        ):
            raise _failure_error(failures)
        if len(results) == world_size:
            return [results[r] for r in range(world_size)]
        if now > deadline:
            missing = sorted(set(range(world_size)) - set(results))
            raise DistributedError(
                f"launch timed out after {timeout_s:.0f} s; ranks {missing} "
                f"had not finished (deadlock or a slow rank?)"
            )


_SECONDARY = (
    "Connection reset by peer",
    "Connection closed by peer",
    "Read error",
    "Write error",
    "Socket Timeout",
    "timed out",
    "Timed out",
    "DistNetworkError",
    "DistStoreError",
    "Broken pipe",
)


def _failure_error(failures: dict[int, str]) -> DistributedError:
    """The error naming the root-cause rank: a real exception, then a death, then comm errors."""

    def priority(rank: int) -> tuple[int, int]:
        text = failures[rank]
        if text.startswith("died with"):
            return (1, rank)
        last = text.strip().splitlines()[-1] if text.strip() else ""
        return (2 if any(s in last for s in _SECONDARY) else 0, rank)

    rank = min(failures, key=priority)
    text = failures[rank]
    others = sorted(set(failures) - {rank})
    also = f" (then ranks {others} failed too)" if others else ""
    if text.startswith("died with"):
        return DistributedError(
            f"rank {rank} {text}; the other ranks were terminated{also}", rank=rank
        )
    last = text.strip().splitlines()[-1]
    return DistributedError(f"rank {rank} raised {last}{also}", rank=rank, detail=text)


def _drain(q, results: dict, failures: dict, wait_s: float) -> None:
    try:
        rank, status, payload = q.get(timeout=wait_s)
        while True:
            if status == "error":
                failures[rank] = payload
            else:
                results[rank] = pickle.loads(payload)
            rank, status, payload = q.get_nowait()
    except queue_mod.Empty:
        return


def _describe_exit(code: int) -> str:
    if code < 0:
        import signal

        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit code {code}"


def _terminate(procs) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    end = time.monotonic() + _GRACE_S
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(1.0)


def _worker(rank, world_size, port_box, backend, pg_timeout_s, fn, args, results_q) -> None:
    """Body of one rank process: init the process group, run fn, report, exit."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    port = _wait_for_port(port_box, pg_timeout_s)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    code = 0
    import torch.distributed as dist

    try:
        import torch

        torch.set_num_threads(1)
        store = dist.TCPStore(
            "127.0.0.1", port, None, False, timeout=datetime.timedelta(seconds=pg_timeout_s)
        )
        _init_process_group(backend, rank, world_size, pg_timeout_s, store=store)
        result = fn(rank, world_size, *args)
        results_q.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001  (reported to the parent, which raises it)
        results_q.put((rank, "error", traceback.format_exc()))
        code = 1
    finally:
        _shutdown(dist)
        results_q.close()
        results_q.join_thread()
    os._exit(code)  # skip interpreter teardown: gloo threads can hang a normal exit


def _wait_for_port(port_box, timeout_s: float) -> int:
    """The parent's store port, published once every rank has been started."""
    end = time.monotonic() + timeout_s
    while port_box.value == 0:
        if time.monotonic() > end:
            os._exit(3)  # the parent reports a rank that died before initializing
        time.sleep(0.002)
    return port_box.value


def _init_process_group(backend, rank, world_size, pg_timeout_s, store) -> None:
    import torch
    import torch.distributed as dist

    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    kwargs = {
        "backend": backend,
        "rank": rank,
        "world_size": world_size,
        "timeout": datetime.timedelta(seconds=pg_timeout_s),
    }
    if store is not None:
        kwargs["store"] = store
    dist.init_process_group(**kwargs)


def _shutdown(dist) -> None:
    from .groups import clear_groups

    clear_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
