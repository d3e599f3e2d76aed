"""The Medusa decoding loop: one compiled program scores a whole token tree per step.

The program is models/medusa.py's MedusaStep (the backbone, and the heads at every node)
compiled by the Generator's compile function on [B, W] tokens, [B, W] positions, the caches
and a [W, W] tree mask. The same program does the prefill, W prompt tokens at a time under a
causal (lower-triangular) mask, so a set of heads costs one compile per batch size. Each step:

  1. the draft source fills the tree: the pending token at the root, the heads' top-k below;
  2. the program runs at positions cached + depth, node i writing slot cached + i;
  3. passes/decoding/tree.py verify_tree keeps the longest accepted root-to-leaf path and the
     bonus token, compact_kv copies the path's K/V rows down to consecutive slots;
  4. the heads' logits at the path's last node give the next tree.

With acceptance="exact" the tokens are exactly plain greedy's. runtime/generate.py calls
`run_tree` and wraps what it returns in a Generation.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from meshweave.models.medusa import MedusaHeads, MedusaStep, check_heads_fit, load_heads
from meshweave.passes.decoding import (
    ACCEPTANCE,
    ChainState,
    Medusa,
    compact_kv,
    parse_tree_spec,
    verify_tree,
)


def medusa_source(heads: Any, tree: Any, model: torch.nn.Module, acceptance: str = "exact"
                  ) -> Medusa:
    """The draft source for `heads` (a path or a MedusaHeads) and `tree` (a spec, its text
    form, or None); raises ValueError on missing or mismatched heads, on a bad tree and on an
    unknown acceptance rule."""
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance={acceptance!r}: expected 'exact' (greedy's tokens) or "
                         f"'typical' (Medusa's typical acceptance, approximate)")
    if isinstance(heads, str):
        heads = load_heads(heads)
    if heads is not None and not isinstance(heads, MedusaHeads):
        raise ValueError(f"medusa_heads: expected a file path or a MedusaHeads module, got "
                         f"{type(heads).__name__}")
    if heads is not None:
        check_heads_fit(heads, model)
    return Medusa(heads, parse_tree_spec(tree) if isinstance(tree, str) else tree)


def tree_program(gen: Any, heads: MedusaHeads, batch: int, width: int, capacity: int):
    """The compiled MedusaStep on [batch, width] (kept on the Generator, keyed by the heads)."""
    key = ("medusa", heads, batch, width, capacity)
    if key not in gen.programs:
        heads.to(gen.dtype).to(gen.device).eval()
        step = MedusaStep(gen.step_module, heads).eval()
        ids = torch.zeros(batch, width, dtype=torch.int64, device=gen.device)
        pos = torch.arange(width, device=gen.device).expand(batch, width).contiguous()
        k, v = gen.step_module.empty_cache(batch, capacity, gen.dtype, gen.device)
        mask = torch.ones(width, width, dtype=torch.bool, device=gen.device).tril()
        t0 = time.perf_counter()
        with torch.no_grad():
            gen.programs[key] = gen.compile_fn(step, (ids, pos, k, v, mask))
        gen.compile_seconds += time.perf_counter() - t0
    return gen.programs[key]


def _prefill(step, prompts: list[list[int]], width: int, k, v, device):
    """Chunks of `width` prompt tokens under a causal mask; returns the logits and head logits
    at each prompt's last token, and the caches."""
    batch = len(prompts)
    causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
    last_logits: list[Any] = [None] * batch
    last_heads: list[Any] = [None] * batch
    for start in range(0, max(map(len, prompts)), width):
        ids = torch.zeros(batch, width, dtype=torch.int64)
        for b, p in enumerate(prompts):
            chunk = p[start:start + width]
            ids[b, :len(chunk)] = torch.tensor(chunk, dtype=torch.int64)
        pos = (start + torch.arange(width)).expand(batch, width).contiguous()
        with torch.no_grad():
            logits, head_logits, k, v = step(ids.to(device), pos.to(device), k, v, causal)
        for b, p in enumerate(prompts):
            if start <= len(p) - 1 < start + width:
                last_logits[b] = logits[b, len(p) - 1 - start]
                last_heads[b] = head_logits[b, len(p) - 1 - start]
    return torch.stack(last_logits), torch.stack(last_heads), k, v


def run_tree(gen: Any, prompts: list[list[int]], max_new_tokens: int, source: Medusa, *,
             acceptance: str = "exact", temperature: float = 1.0,
             eos_token_id: int | None = None, progress: bool = False):
    """(state, steps, kept tokens, active sequence-steps, seconds, per-step means)."""
    tree = source.tree
    width, batch = tree.width, len(prompts)
    capacity = gen.cache_len + width  # slack: a last tree may run past the final token
    step = tree_program(gen, source.heads, batch, width, capacity)
    mask, depth = tree.mask.to(gen.device), tree.depth
    source.reset()
    t0 = time.perf_counter()
    k, v = gen.step_module.empty_cache(batch, capacity, gen.dtype, gen.device)
    logits, head_logits, k, v = _prefill(step, prompts, width, k, v, gen.device)
    first = logits.argmax(dim=-1).tolist()
    source.observe_heads(head_logits)
    state = ChainState([len(p) for p in prompts], first, capacity)
    for b in range(batch):
        state.emitted[b] = [first[b]]
        state.done[b] = max_new_tokens == 1 or first[b] == eos_token_id
    steps, emitted, active_steps, per_step = 0, 0, 0, []
    while not all(state.done):
        active = [b for b in range(batch) if not state.done[b]]
        tokens = source.candidates(torch.tensor(state.pending, dtype=torch.int64))
        pos = torch.tensor(state.cached, dtype=torch.int64)[:, None] + depth[None, :]
        with torch.no_grad():
            logits, head_logits, k, v = step(tokens.to(gen.device), pos.to(gen.device), k, v,
                                             mask)
        nodes, rows = verify_tree(tree, tokens, logits.cpu(), acceptance=acceptance,
                                  temperature=temperature)
        compact_kv(k, v, state.cached, nodes)
        last = torch.tensor([n[-1] for n in nodes], device=head_logits.device)
        source.observe_heads(head_logits[torch.arange(batch, device=last.device), last])
        kept = sum(state.emit(b, rows[b], max_new_tokens, eos_token_id) for b in active)
        steps, emitted, active_steps = steps + 1, emitted + kept, active_steps + len(active)
        per_step.append(kept / len(active))
        if progress:
            from meshweave.progress import bar

            bar(max(len(e) for e in state.emitted), max_new_tokens, "generate (medusa)")
    return state, steps, emitted, active_steps, time.perf_counter() - t0, per_step
