"""Every environment variable meshweave reads, in one place, each with its meaning.

MESHWEAVE_DUMP_DIR     write the IR after every pass (and generated kernels) under this folder,
                       as if CompileOptions(dump_dir=...) were given.
MESHWEAVE_CACHE_DIR    cache root (default: ~/.cache/meshweave); generated kernels live
                       under <cache root>/kernels.
MESHWEAVE_MATMUL       the Triton backend's matmul policy when CodegenConfig does not name one:
                       auto (default), autotune, triton or torch (see codegen.CodegenConfig).
MESHWEAVE_FAST_LAUNCH  0: launch every generated Triton kernel through triton's JIT dispatch
                       instead of its compiled launcher (codegen/triton/fast_launch.py; default 1).
MESHWEAVE_MEMORY_AVAILABLE  a size (4GiB, 512MiB, or bytes) the CLI's memory preflight takes as
                       the memory available instead of /proc/meminfo's MemAvailable: to see
                       what a command needs on a smaller machine (meshweave.cli.preflight).
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
                       set by torchrun; runtime/distributed/launch.py reads them to run as one
                       rank of an externally launched job (and sets them for its own ranks).
TRITON_INTERPRET       read by Triton itself; set to 1 before triton is imported to run
                       generated kernels on CPU (meshweave sets it when backend="triton" runs
                       on a machine without CUDA and triton is not yet imported).
"""

from __future__ import annotations

import os


def dump_dir() -> str | None:
    return os.environ.get("MESHWEAVE_DUMP_DIR") or None


def cache_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "meshweave")
    return os.environ.get("MESHWEAVE_CACHE_DIR") or default


def matmul_policy() -> str:
    return os.environ.get("MESHWEAVE_MATMUL") or "auto"


def fast_launch() -> bool:
    return os.environ.get("MESHWEAVE_FAST_LAUNCH", "1") != "0"


def memory_available() -> str | None:
    return os.environ.get("MESHWEAVE_MEMORY_AVAILABLE") or None
