"""Shared test helpers: numerics against eager with a one-line repro in every failure."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
# Generated Triton kernels run under the interpreter on CPU-only machines; this must be set
# before anything imports triton (torch.export does), so it lives here, first.
if not os.environ.get("CUDA_VISIBLE_DEVICES") and not os.path.exists("/dev/nvidia0"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
import torch.utils._pytree as pytree


def assert_same_outputs(expected, got, *, rtol=1e-5, atol=1e-5, repro: str = "") -> None:
    """Every leaf of `got` matches `expected` (tensors within tolerance, others equal)."""
    le, lg = pytree.tree_leaves(expected), pytree.tree_leaves(got)
    assert type(expected) is type(got) or isinstance(got, type(expected)), (
        f"output type {type(got).__name__} != {type(expected).__name__}. repro: {repro}")
    assert len(le) == len(lg), f"{len(lg)} output leaves, expected {len(le)}. repro: {repro}"
    for i, (x, y) in enumerate(zip(le, lg)):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol,
                                       msg=lambda m, i=i: f"leaf {i}: {m}\nrepro: {repro}")
        else:
            assert x == y, f"leaf {i}: {y!r} != {x!r}. repro: {repro}"


def training_loss(out) -> torch.Tensor:
    """A scalar loss from a model's output (a tensor, a tuple, or an HF output's logits)."""
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
    return out.float().pow(2).mean()


def train_pair(name: str, batch: int = 2, seq: int = 8):
    """(model, an identical copy for eager, inputs) of zoo model `name`, in train mode."""
    import copy

    from meshweave.models import build_model

    if name.startswith("hf:"):
        pytest.importorskip("transformers")
    torch.manual_seed(0)
    model, inputs = build_model(name, batch=batch, seq=seq)
    model.train()
    return model, copy.deepcopy(model), inputs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    """A private generated-kernel cache for the test (MESHWEAVE_CACHE_DIR)."""
    monkeypatch.setenv("MESHWEAVE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"
