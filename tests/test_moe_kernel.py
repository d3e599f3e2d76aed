"""The grouped-GEMM Triton kernel for moe.experts (codegen/triton/kernels/grouped_gemm.py,
moe_dispatch.py) under the interpreter, against an fp64 loop of per-expert matmuls: both weight
layouts, fused / separate gate, gelu without gate, other activations, ragged sizes, strided
weights, empty experts, one expert taking every token, capacity dropping, fp32 and fp16; the
tile table; and bad input. The lowering (graphs on backend="triton") is in
tests/test_moe_lowering.py."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from moe_helpers import DEVICE, TOL, expert_weights, loop_reference, routing

from meshweave.codegen.triton.kernels import grouped_gemm as gg
from meshweave.codegen.triton.kernels.moe_dispatch import moe_experts_grouped, sort_pairs
from meshweave.ir.ops.moe import capacity, sort_by_expert

REPRO = "pytest tests/test_moe_kernel.py::{}"


def check(test, *, t=10, d=32, f=48, e=4, k=2, layout="kn", gate="fused", act="silu",
          dtype=torch.float32, ids=None, weights=None, capacity_factor=None, seed=0):
    x = torch.randn(t, d, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    if ids is None:
        weights, ids = routing(t, e, k, seed)
    w_in, w_gate, w_out = expert_weights(e, d, f, layout, gate, dtype, seed)
    y, dropped = moe_experts_grouped(x, weights, ids, w_in, w_gate, w_out, act=act,
                                     layout=layout, fused_gate_up=gate == "fused",
                                     capacity_factor=capacity_factor)
    cap = capacity(t, ids.shape[1], e, capacity_factor)
    want, want_dropped = loop_reference(x, weights, ids, w_in, w_gate, w_out, act, layout, gate,
                                        cap)
    assert y.shape == x.shape and y.dtype == dtype and dropped.dtype == torch.int64
    assert int(dropped) == want_dropped, REPRO.format(test)
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y.double(), want, rtol=rtol, atol=atol,
                               msg=lambda s: f"{s}\nrepro: {REPRO.format(test)}")
    return y


@pytest.mark.parametrize("layout", ["kn", "nk"])
@pytest.mark.parametrize("gate,act", [("fused", "silu"), ("separate", "silu"), ("none", "gelu")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_grouped_kernel_matches_expert_loop(layout, gate, act, dtype):
    check(f"test_grouped_kernel_matches_expert_loop[{dtype}-{gate}-{act}-{layout}]",
          layout=layout, gate=gate, act=act, dtype=dtype)


@pytest.mark.parametrize("act,gate", [("gelu_tanh", "separate"), ("relu", "fused"),
                                      ("silu", "none")])
def test_other_activations(act, gate):
    check(f"test_other_activations[{act}-{gate}]", act=act, gate=gate, layout="nk", d=20, f=40)


def test_sizes_off_the_tile_grid_and_top4():
    """d=80, f=72: several K steps and N tiles with ragged edges; k=4 of E=8; no tokens."""
    check("test_sizes_off_the_tile_grid_and_top4", t=11, d=80, f=72, e=8, k=4, gate="fused")
    check("test_sizes_off_the_tile_grid_and_top4", t=11, d=80, f=72, e=8, k=4, gate="none",
          act="gelu", layout="nk", dtype=torch.float16)
    x = torch.zeros(0, 16, device=DEVICE)
    w_in, _, w_out = expert_weights(3, 16, 8, "kn", "fused", torch.float32)
    y, dropped = moe_experts_grouped(x, torch.zeros(0, 2, device=DEVICE),
                                     torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
                                     w_in, None, w_out, fused_gate_up=True)
    assert y.shape == (0, 16) and int(dropped) == 0


def test_strided_weights_and_activations():
    """Weights read through their strides: a "kn" stack that is a transposed view of an
    [E, N, K] tensor, a separate gate with other strides, and x a column slice."""
    e, d, f, t = 3, 24, 40, 7
    g = torch.Generator().manual_seed(11)
    w_in = torch.randn(e, f, d, generator=g).to(DEVICE).transpose(1, 2)  # [E, d, f] view
    w_gate = torch.randn(e, d, f, generator=g).to(DEVICE)
    w_out = torch.randn(e, d, f, generator=g).to(DEVICE).transpose(1, 2)  # [E, f, d] view
    x = torch.randn(t, 2 * d, generator=g).to(DEVICE)[:, :d]
    weights, ids = routing(t, e, 2)
    y, _ = moe_experts_grouped(x, weights, ids, w_in, w_gate, w_out, layout="kn")
    want, _ = loop_reference(x, weights, ids, w_in, w_gate, w_out, "silu", "kn", "separate")
    # unit-variance weights give outputs up to ~300, so fp32 rounding of the large partial
    # sums alone is ~1e-5 absolute: the absolute tolerance scales with the output (a wrong
    # stride is off by O(100))
    atol = 1e-6 * float(want.abs().max())
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=atol)
    fused = torch.randn(e, 2 * f, d, generator=g).to(DEVICE).transpose(1, 2)  # [E, d, 2f] view
    y, _ = moe_experts_grouped(x, weights, ids, fused, None, w_out, fused_gate_up=True)
    want, _ = loop_reference(x, weights, ids, fused, None, w_out, "silu", "kn", "fused")
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def test_empty_experts_and_rows_not_a_tile_multiple():
    """Experts 1 and 3 get nothing; expert 0 gets 19 pairs (not a multiple of BLOCK_M)."""
    ids = torch.tensor([[0, 2]] * 19 + [[2, 4]] * 3, device=DEVICE)
    weights = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    check("test_empty_experts_and_rows_not_a_tile_multiple", t=22, e=5, ids=ids,
          weights=weights)
    counts = torch.bincount(ids.reshape(-1), minlength=5)
    offsets = torch.zeros(6, dtype=torch.int32)
    offsets[1:] = torch.cumsum(counts, 0)
    expert, first, end = gg.tile_table(offsets, 16, ids.numel())
    real = expert[expert >= 0].tolist()
    assert real == [0, 0, 2, 2, 4]  # no tile for an empty expert; one expert per tile
    assert first[: len(real)].tolist() == [0, 16, 19, 35, 41]
    assert end[: len(real)].tolist() == [16, 19, 35, 41, 44]
    assert expert.numel() == 3 + 5  # the upper bound cdiv(44, 16) + E sizes the grid
    # with kept counts (a capacity of 10): expert 0's segment [0, 19) computes [0, 10) only
    kept = counts.clamp(max=10)
    expert, first, end = gg.tile_table(offsets, 16, ids.numel(), kept)
    assert expert[expert >= 0].tolist() == [0, 2, 4]
    assert first[:3].tolist() == [0, 19, 41] and end[:3].tolist() == [10, 29, 44]


@pytest.mark.parametrize("cap", [None, 1, 3])
def test_sorted_pairs_are_sort_by_expert(cap):
    """The sync-free sort (scatter_add counts) gives sort_by_expert's order and counts."""
    _, ids = routing(13, 5, 2, skew=3)
    order, segment, kept = sort_pairs(ids, 5, cap)
    want_order, want_counts, _ = sort_by_expert(ids, 5, cap)
    assert torch.equal(order, want_order) and torch.equal(kept, want_counts)
    assert torch.equal(segment, torch.bincount(ids.reshape(-1), minlength=5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_expert_takes_every_token(dtype):
    """Skewed routing, k=1: expert 2 gets all 40 tokens (three M tiles), the rest none."""
    weights, ids = routing(40, 4, 1, skew=2)
    assert (ids == 2).all()
    check(f"test_one_expert_takes_every_token[{dtype}]", t=40, e=4, k=1, ids=ids,
          weights=weights, dtype=dtype, layout="nk", gate="separate")


def test_capacity_drops_pairs_in_token_order():
    """capacity_factor 0.5 with 3 of 4 experts holding 12 pairs each: ceil(0.5*12*2/4) = 3
    kept per expert, the rest counted as dropped."""
    weights, ids = routing(12, 4, 2, skew=1)
    y = check("test_capacity_drops_pairs_in_token_order", t=12, ids=ids, weights=weights,
              capacity_factor=0.5)
    dropless = check("test_capacity_drops_pairs_in_token_order", t=12, ids=ids,
                     weights=weights)
    assert not torch.allclose(y, dropless)


def test_grouped_gemm_alone_against_per_expert_matmuls():
    """The launch itself on pre-sorted rows with a routing scale: rows [P, K] @ W[e]."""
    g = torch.Generator().manual_seed(7)
    counts = [5, 0, 17, 1]
    x = torch.randn(sum(counts), 24, generator=g).to(DEVICE)
    w = torch.randn(4, 40, 24, generator=g).to(DEVICE)  # "nk": [E, N, K]
    scale = torch.rand(sum(counts), generator=g).to(DEVICE)
    offsets = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()], dtype=torch.int32,
                           device=DEVICE)
    got = gg.grouped_gemm(x, w, offsets, layout="nk", scale=scale, act="relu")
    want = torch.cat([torch.relu(x[offsets[i]:offsets[i + 1]] @ w[i].t()) for i in range(4)])
    torch.testing.assert_close(got, want * scale[:, None], rtol=1e-5, atol=1e-5)
    # scattered store: result row p lands at out_rows[p]; with counts (expert 2 computes 9 of
    # its 17 rows) the rows never computed stay zero
    perm = torch.randperm(x.shape[0], generator=g).to(DEVICE)
    got = gg.grouped_gemm(x, w, offsets, layout="nk", scale=scale, act="relu", out_rows=perm)
    torch.testing.assert_close(got[perm], want * scale[:, None], rtol=1e-5, atol=1e-5)
    kept = torch.tensor([5, 0, 9, 1], device=DEVICE)
    got = gg.grouped_gemm(x, w, offsets, counts=kept, layout="nk", act="relu", out_rows=perm)
    computed = torch.zeros(x.shape[0], dtype=torch.bool, device=DEVICE)
    computed[:14] = True
    computed[22] = True
    torch.testing.assert_close(got[perm][computed], want[computed], rtol=1e-5, atol=1e-5)
    assert (got[perm][~computed] == 0).all()


def test_bad_input_names_what_where_and_expected():
    x = torch.randn(6, 8)
    w = torch.randn(3, 8, 16)
    off = torch.tensor([0, 2, 4, 6], dtype=torch.int32)
    cases = [
        (dict(x=torch.randn(6, 9)), r"x has K=9 but w \(3, 8, 16\) \(layout 'kn'\) has K=8"),
        (dict(x=x.half()), r"x is torch.float16, w is torch.float32; expected one dtype"),
        (dict(offsets=off.long()), r"offsets is torch.int64 \(4,\); expected int32 \[E\+1\]"),
        (dict(offsets=off[:3]), r"expected int32 \[E\+1\] = \[4\]"),
        (dict(scale=torch.ones(5)), r"scale \(5,\); expected one weight per row, \[6\]"),
        (dict(w_gate=torch.randn(3, 8, 8)), r"w_gate torch.float32 \(3, 8, 8\); expected w's"),
        (dict(layout="mk"), r"layout='mk'; expected 'kn' or 'nk'"),
        (dict(act="tanh"), r"act='tanh'; expected one of"),
        (dict(out_rows=torch.zeros(5, dtype=torch.int64)),
         r"out_rows is torch.int64 \(5,\); expected int32/int64 \[6\]"),
    ]
    for change, msg in cases:
        args = {"x": x, "w": w, "offsets": off, **change}
        with pytest.raises(gg.GroupedGemmError, match=msg):
            gg.grouped_gemm(args.pop("x"), args.pop("w"), args.pop("offsets"), **args)
    assert issubclass(gg.GroupedGemmError, ValueError)
    weights, ids = routing(6, 3, 2)
    w_in, _, w_out = expert_weights(3, 8, 16, "kn", "none", torch.float32)
    with pytest.raises(ValueError, match=r"w_out': torch.float16.*one dtype"):
        moe_experts_grouped(x.to(DEVICE), weights, ids, w_in, None, w_out.half())
    with pytest.raises(ValueError, match=r"expected x \[T, d\], weights and ids \[T, k\]"):
        moe_experts_grouped(x.to(DEVICE), weights[:5], ids, w_in, None, w_out)
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match=r"ids hold experts 0\.\.3; expected 0\.\.2"):
            moe_experts_grouped(x, weights, ids.clamp(max=2) + (ids == 2), w_in, None, w_out)
        with pytest.raises(gg.GroupedGemmError, match="bfloat16 does not run under the Triton"):
            gg.grouped_gemm(x.bfloat16(), w.bfloat16(), off)
    with pytest.raises(gg.GroupedGemmError, match=r"counts is torch.int64 \(2,\); expected"):
        gg.grouped_gemm(x, w, off, counts=torch.ones(2, dtype=torch.int64))

