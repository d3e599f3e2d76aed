"""Token trees for Medusa-style decoding: the spec, the buffers one verify program needs, and
what happens after it (verification, the accepted path, KV-cache compaction).

A tree spec is a list of paths, each a tuple of choices: path (c_1, ..., c_d) is the node at
depth d holding head (d - 1)'s top-c_d token, below the node (c_1, ..., c_{d-1}). Node 0 is
the root: the pending token (the model's last argmax, not yet cached). Nodes are numbered root
first, then the paths by depth and then by choices, so a parent's number is below its child's.

Built into a `TokenTree`:
  mask [W, W]        node i attends to node j iff j is i or an ancestor of i (with the cache);
  depth [W]          position offsets: node i sits at position cached_length + depth[i];
  retrieve [P, D+1]  node numbers of the root-to-leaf paths, root first, -1 past a leaf;
and then per step: `candidates` fills the nodes' tokens from the heads' top-k, `verify_tree`
finds each sequence's longest accepted path, `compact_kv` copies that path's K/V rows (written
at slots L + node) down to the consecutive slots L + depth, where the next step expects them.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class TreeSpecError(ValueError):
    """A malformed tree spec: names the offending path and what was expected."""


ACCEPTANCE = ("exact", "typical")


def parse_tree_spec(text: str) -> list[tuple[int, ...]]:
    """A spec from text: a Python list of tuples ("[(0,), (1,), (0, 0)]") or paths split by
    ';' with choices split by ',' ("0; 1; 0,0")."""
    text = text.strip()
    try:
        if text.startswith("["):
            value = ast.literal_eval(text)
            return [tuple(p) if isinstance(p, (tuple, list)) else (p,) for p in value]
        return [tuple(int(c) for c in part.split(",")) for part in text.split(";") if
                part.strip()]
    except (ValueError, SyntaxError, TypeError):
        raise TreeSpecError(f"tree spec {text!r}: expected paths such as '0; 1; 0,0' or "
                            f"'[(0,), (1,), (0, 0)]'") from None


def default_tree(num_heads: int, width: int = 2) -> list[tuple[int, ...]]:
    """A small tree for `num_heads` heads: the top-1 chain to full depth, and at each depth
    the top-`width` alternatives below the top-1 prefix."""
    paths = []
    for d in range(1, num_heads + 1):
        paths += [(0,) * (d - 1) + (c,) for c in range(width)]
    return paths


def validate_tree_spec(spec: Sequence[Sequence[int]], num_heads: int | None = None
                       ) -> list[tuple[int, ...]]:
    """The spec's paths as tuples, sorted into node order; raises TreeSpecError naming the path
    that is empty, negative, a duplicate, deeper than `num_heads`, or missing its parent."""
    if isinstance(spec, str) or not isinstance(spec, Sequence) or not spec:
        raise TreeSpecError(f"tree spec {spec!r}: expected a non-empty list of paths (tuples "
                            f"of top-k choices, e.g. [(0,), (1,), (0, 0)])")
    paths, seen = [], set()
    for raw in spec:
        if isinstance(raw, int) or not isinstance(raw, Sequence) or not raw or not all(
                isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in raw):
            raise TreeSpecError(f"tree spec: path {raw!r} is not a non-empty tuple of "
                                f"choices >= 0")
        path = tuple(raw)
        if path in seen:
            raise TreeSpecError(f"tree spec: path {path} appears twice")
        if num_heads is not None and len(path) > num_heads:
            raise TreeSpecError(f"tree spec: path {path} has depth {len(path)}, deeper than "
                                f"the {num_heads} Medusa heads (a node at depth d takes head "
                                f"d - 1's top-k): use paths of at most {num_heads} choices")
        seen.add(path)
        paths.append(path)
    for path in paths:
        if len(path) > 1 and path[:-1] not in seen:
            raise TreeSpecError(f"tree spec: path {path} has no parent: add {path[:-1]}")
    return sorted(paths, key=lambda p: (len(p), p))


@dataclass(frozen=True)
class TokenTree:
    """A validated tree and its buffers (see the module docstring). Node 0 is the root."""

    paths: tuple[tuple[int, ...], ...]  # node i >= 1 is paths[i - 1]
    parent: tuple[int, ...]  # parent[0] = -1
    mask: torch.Tensor  # [W, W] bool
    depth: torch.Tensor  # [W] int64
    retrieve: torch.Tensor  # [P, D + 1] int64, -1 padded

    @property
    def width(self) -> int:
        return len(self.paths) + 1

    @property
    def max_depth(self) -> int:
        return max(len(p) for p in self.paths)

    @property
    def top_k(self) -> int:
        """How many top tokens per head the tree reads."""
        return max(p[-1] for p in self.paths) + 1

    def node(self, i: int) -> tuple[int, int, int, int]:
        """(depth, head, choice, parent) of node i; the root has head, choice, parent -1."""
        if i == 0:
            return 0, -1, -1, -1
        p = self.paths[i - 1]
        return len(p), len(p) - 1, p[-1], self.parent[i]

    def candidates(self, pending: torch.Tensor, head_topk: torch.Tensor) -> torch.Tensor:
        """[B, W] node tokens: the pending token [B] at the root, and node (c_1..c_d) gets
        head_topk[b, d - 1, c_d] (head_topk [B, heads, >= top_k], best first)."""
        heads = torch.tensor([len(p) - 1 for p in self.paths], dtype=torch.int64)
        choice = torch.tensor([p[-1] for p in self.paths], dtype=torch.int64)
        drafted = head_topk[:, heads.to(head_topk.device), choice.to(head_topk.device)]
        return torch.cat([pending.reshape(-1, 1).to(drafted), drafted], dim=1)

    def render(self) -> str:
        """node, depth, head, choice, parent, path and mask row ('x' = attends), one a line."""
        lines = [f"tree: {self.width} nodes, depth {self.max_depth}, {len(self.retrieve)} "
                 f"leaf paths, top-{self.top_k} per head",
                 "node depth head choice parent path          mask"]
        for i in range(self.width):
            d, h, c, par = self.node(i)
            row = "".join("x" if m else "." for m in self.mask[i].tolist())
            path = "root" if i == 0 else str(self.paths[i - 1])
            lines.append(f"{i:4d} {d:5d} {h:4d} {c:6d} {par:6d} {path:13s} {row}")
        lines.append("retrieve (root-to-leaf node paths): " + "; ".join(
            " ".join(str(n) for n in r if n >= 0) for r in self.retrieve.tolist()))
        return "\n".join(lines)


def build_tree(spec: Sequence[Sequence[int]], num_heads: int | None = None) -> TokenTree:
    """Validate `spec` (against `num_heads` if given) and build its mask, depths and paths."""
    paths = validate_tree_spec(spec, num_heads)
    number = {p: i + 1 for i, p in enumerate(paths)}
    parent = (-1,) + tuple(number.get(p[:-1], 0) for p in paths)
    width = len(paths) + 1
    mask = torch.eye(width, dtype=torch.bool)
    mask[:, 0] = True
    for i in range(1, width):
        mask[i] |= mask[parent[i]]
    depth = torch.tensor([0] + [len(p) for p in paths], dtype=torch.int64)
    leaves = [p for p in paths if not any(q[:-1] == p for q in paths)]
    retrieve = torch.full((len(leaves), max(map(len, paths)) + 1), -1, dtype=torch.int64)
    for r, leaf in enumerate(leaves):
        retrieve[r, :len(leaf) + 1] = torch.tensor([0] + [number[leaf[:d]] for d in
                                                          range(1, len(leaf) + 1)])
    return TokenTree(tuple(paths), parent, mask, depth, retrieve)


def verify_tree(tree: TokenTree, tokens: torch.Tensor, logits: torch.Tensor, *,
                acceptance: str = "exact", temperature: float = 1.0, threshold: float = 0.09,
                alpha: float = 0.3) -> tuple[list[list[int]], list[list[int]]]:
    """(nodes, emitted) per sequence: the accepted path's node numbers (root first) and the
    tokens the step emits (the accepted drafts, then the bonus argmax at the last node).

    tokens [B, W] are the nodes' tokens, logits [B, W, vocab] the verify program's. "exact": a
    node is accepted iff its token is its parent's argmax, so the output is exactly greedy's.
    "typical" (Medusa's typical acceptance, approximate: not greedy's tokens, nor sampling's
    distribution): accepted iff its probability under softmax(parent logits / temperature)
    exceeds min(threshold, alpha * exp(-entropy)). The longest accepted path wins (the first
    of equals)."""
    b, w = tokens.shape
    if tuple(logits.shape[:2]) != (b, w) or w != tree.width:
        raise ValueError(f"verify_tree: expected tokens [B, {tree.width}] and logits "
                         f"[B, {tree.width}, vocab], got {tuple(tokens.shape)} and "
                         f"{tuple(logits.shape)}")
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"verify_tree: acceptance={acceptance!r}: choose from {ACCEPTANCE}")
    ret = tree.retrieve.to(tokens.device)
    idx, valid = ret.clamp(min=0), (ret >= 0)[:, 1:]
    cand = tokens[:, idx]  # [B, P, D + 1]
    argmax = logits.argmax(dim=-1)
    if acceptance == "exact":
        ok = cand[:, :, 1:] == argmax[:, idx][:, :, :-1]
    else:
        probs = torch.softmax(logits.float() / max(temperature, 1e-5), dim=-1)  # [B, W, V]
        entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        limit = torch.minimum(torch.full_like(entropy, threshold),
                              alpha * torch.exp(-entropy))  # [B, W]
        parent = idx[:, :-1]
        p_tok = probs[:, parent].gather(-1, cand[:, :, 1:, None])[..., 0]  # [B, P, D]
        ok = p_tok > limit[:, parent]
    length = (ok & valid[None]).to(torch.int64).cumprod(dim=-1).sum(dim=-1)  # [B, P]
    best = length.argmax(dim=-1)
    nodes, emitted = [], []
    for s in range(b):
        n = int(length[s, best[s]])
        path = ret[best[s], :n + 1].tolist()
        nodes.append(path)
        emitted.append(tokens[s, path[1:]].tolist() + [int(argmax[s, path[-1]])])
    return nodes, emitted


def compact_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, cached: Sequence[int],
               nodes: Sequence[Sequence[int]]) -> None:
    """In place: sequence b's accepted nodes (root first) were written at slots cached[b] +
    node; copy them to cached[b] + depth (0, 1, 2, ...). Caches [layers, B, kv, C, dim]."""
    for b, path in enumerate(nodes):
        if len(path) < 2 or list(path) == list(range(len(path))):
            continue  # already consecutive
        base = int(cached[b])
        src = torch.tensor(path, device=k_cache.device) + base
        dst = torch.arange(len(path), device=k_cache.device) + base
        for cache in (k_cache, v_cache):
            cache[:, b].index_copy_(2, dst, cache[:, b].index_select(2, src))

