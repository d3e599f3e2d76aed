"""Distributed runtime: launch local ranks, create a mesh's process groups, run a Plan.

    from meshweave.runtime.distributed import launch, DistributedError
    from meshweave.runtime.distributed.groups import init_plan_groups, get_group
    from meshweave.runtime.distributed.executor import RankExecutor
    from meshweave.runtime.distributed.runner import RunSpec, prepare, run_distributed

`launch(fn, world_size, args)` starts ranks as processes on 127.0.0.1 (gloo on CPU, NCCL on
CUDA), or runs `fn` in-process under torchrun; a rank that raises or dies makes `launch` raise
DistributedError naming it. Ranks never get the full weights: the process that plans writes
them once to a checkpoint and each rank loads only its own shards (checkpoint.py). Modules
import torch.distributed lazily where it matters; nothing here creates groups or processes at
import time.
"""

from .errors import DistributedError

__all__ = ["DistributedError", "launch"]


def __getattr__(name: str):
    if name == "launch":
        from .launch import launch

        return launch
    raise AttributeError(name)
