"""Medusa tree decoding: tree buffers against hand-derived cases, the tree-masked KV step
against the eager model, exactness against an eager greedy loop (untrained and trained heads,
batch 1 and 4), train-heads, `dump --what tree`, and bad inputs.

Reproduce one case: .venv/bin/pytest -q tests/test_medusa.py -k NAME
"""

from __future__ import annotations

import pytest
import torch

import meshweave
from meshweave.cli import main
from meshweave.models import build_model
from meshweave.models.kv_decoder import KVDecoder
from meshweave.models.medusa import MedusaHeads, load_heads
from meshweave.passes.decoding import (
    TreeSpecError,
    build_tree,
    compact_kv,
    parse_tree_spec,
    verify_tree,
)
from meshweave.runtime.generate import GenerationError

from generate_helpers import eager_greedy, random_prompts

REPRO = "reproduce: .venv/bin/pytest -q tests/test_medusa.py -k {}"
SMALL = [(0,), (1,), (0, 0)]  # root 0; 1 = (0,), 2 = (1,), 3 = (0, 0)
TREE = [(0,), (1,), (2,), (0, 0), (0, 1), (1, 0), (0, 0, 0)]


@pytest.fixture(scope="module")
def tiny():
    model, (ids,) = build_model("llama-tiny", batch=1, seq=8)
    with torch.no_grad():
        cm = meshweave.compile(model, (ids,))
    return model, cm


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train-heads through the CLI: (heads file, its printed report, the loaded heads)."""
    out = str(tmp_path_factory.mktemp("heads") / "heads.safetensors")
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["train-heads", "--model", "llama-tiny", "--heads", "3", "--steps", "300",
                   "--prompts", "64", "--new-tokens", "32", "--out", out])
    assert rc == 0, buf.getvalue()
    return out, buf.getvalue(), load_heads(out)


def test_tree_buffers_hand_derived():
    tree = build_tree(list(reversed(SMALL)))  # node order does not depend on the spec's
    assert tree.paths == ((0,), (1,), (0, 0)) and tree.parent == (-1, 0, 0, 1)
    assert tree.mask.int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    assert tree.depth.tolist() == [0, 1, 1, 2]
    assert (5 + tree.depth).tolist() == [5, 6, 6, 7]  # positions at cached length 5
    assert tree.retrieve.tolist() == [[0, 2, -1], [0, 1, 3]]  # leaves (1,) and (0, 0)
    assert [tree.node(i) for i in range(4)] == [(0, -1, -1, -1), (1, 0, 0, 0), (1, 0, 1, 0),
                                               (2, 1, 0, 1)]
    topk = torch.tensor([[[10, 11], [20, 21]]])  # [B, heads, top-k]
    assert tree.candidates(torch.tensor([7]), topk).tolist() == [[7, 10, 11, 20]]
    assert parse_tree_spec("0; 1; 0,0") == parse_tree_spec("[(0,), (1,), (0, 0)]") == SMALL


def test_verify_tree_exact_and_typical():
    tree = build_tree(SMALL)
    vocab = 64
    tokens = torch.tensor([[7, 10, 11, 20]] * 3)
    # argmax per node: seq 0 takes (0,) then (0, 0); seq 1 (1,); seq 2 nothing
    argmax = torch.tensor([[10, 20, 5, 33], [11, 3, 44, 6], [99 % vocab, 1, 2, 3]])
    logits = torch.nn.functional.one_hot(argmax, vocab).float() * 10
    nodes, emitted = verify_tree(tree, tokens, logits)
    assert nodes == [[0, 1, 3], [0, 2], [0]]
    assert emitted == [[10, 20, 33], [11, 44], [99 % vocab]]
    # typical: the root puts 0.45 on token 10 and 0.55 on 12; exact rejects 10, typical takes it
    soft = torch.full((1, 4, vocab), -1e4)
    soft[0, 0, 10], soft[0, 0, 12] = torch.tensor(0.45).log(), torch.tensor(0.55).log()
    soft[0, 1, 40] = 0.0  # node 1's argmax (the bonus) 40; its child's token 20 is unlikely
    exact = verify_tree(tree, tokens[:1], soft)
    typical = verify_tree(tree, tokens[:1], soft, acceptance="typical")
    assert exact == ([[0]], [[12]]) and typical == ([[0, 1]], [[10, 40]])
    with pytest.raises(ValueError, match="acceptance='sample'"):
        verify_tree(tree, tokens, logits, acceptance="sample")


def test_compact_kv_moves_the_accepted_path_to_consecutive_slots():
    k = torch.arange(10.0).reshape(1, 1, 1, 10, 1).repeat(2, 2, 1, 1, 3)  # value = slot
    v = -k.clone()
    compact_kv(k, v, cached=[3, 2], nodes=[[0, 1, 3], [0, 2]])
    assert k[0, 0, 0, :, 0].tolist() == [0, 1, 2, 3, 4, 6, 6, 7, 8, 9]
    assert k[1, 1, 0, :, 0].tolist() == [0, 1, 2, 4, 4, 5, 6, 7, 8, 9]
    assert torch.equal(v, -k)


def test_tree_masked_step_scores_every_node_as_the_eager_model(tiny):
    """One KVDecoder call on a tree (eager, no compile) against the eager model on each node's
    root-to-node sequence; batch 2 with different cached lengths."""
    model, _ = tiny
    dec = KVDecoder(model).eval()
    tree = build_tree(TREE)
    prompts = random_prompts([6, 3], seed=1)
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 128, (2, tree.width), generator=g)
    k, v = dec.empty_cache(2, 24)
    ids = torch.zeros(2, 6, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p)
    with torch.no_grad():
        _, k, v = dec(ids, torch.arange(6).expand(2, 6).contiguous(), k, v)
        pos = torch.tensor([[6], [3]]) + tree.depth[None]
        logits, _, _ = dec(tokens, pos, k, v, tree.mask)
        for b, p in enumerate(prompts):
            for i in range(tree.width):
                chain = [i]
                while tree.parent[chain[0]] >= 0:
                    chain.insert(0, tree.parent[chain[0]])
                ref = model(torch.tensor([p + tokens[b, chain].tolist()]))[0, -1]
                err = (ref - logits[b, i]).abs().max().item()
                assert err < 1e-4, f"seq {b} node {i}: {err}; " + REPRO.format("tree_masked")


@pytest.mark.parametrize("batch", [1, 4])
def test_untrained_heads_are_exactly_greedy(tiny, batch):
    model, cm = tiny
    prompts = random_prompts([3, 9, 14, 20], seed=2)[:batch]
    heads = MedusaHeads.for_model(model, 3)
    out = cm.generate(prompts, 24, method="medusa", medusa_heads=heads, tree=TREE)
    for b, p in enumerate(prompts):
        assert out.tokens[b] == eager_greedy(model, p, 24), (
            f"batch {batch} seq {b}; " + REPRO.format(f"untrained_heads and {batch}"))
    # one compiled program (prefill chunks and tree steps alike) per heads and batch size
    programs = [key for gen in cm._generators.values() for key in gen.programs
                if key[0] == "medusa" and key[1] is heads]
    assert programs == [("medusa", heads, batch, 8, 64 + 8)], programs
    cold = cm.generate(prompts, 24, method="medusa", medusa_heads=heads, tree=TREE,
                       acceptance="typical", temperature=1e-5)
    assert cold.tokens == out.tokens  # typical acceptance at temperature -> 0 is greedy
    if batch > 1:  # per-sequence eos: sequence 1 stops at its 4th token, the others go on
        eos = out.tokens[1][3]
        stopped = cm.generate(prompts, 24, method="medusa", medusa_heads=heads,
                              tree="0; 1; 2; 0,0; 0,1; 1,0; 0,0,0",
                              eos_token_id=eos)
        for b, t in enumerate(out.tokens):
            assert stopped.tokens[b] == (t[:t.index(eos) + 1] if eos in t else t), b


def test_train_heads_lowers_the_loss_and_saves_loadable_heads(trained, tiny):
    path, report, _ = trained
    first, last = (float(x) for x in report.split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < 0.5 * first, report
    heads = load_heads(path)
    assert (heads.num_heads, heads.hidden_size, heads.vocab_size) == (3, 64, 128)
    x = torch.randn(5, 64)
    assert heads(x).shape == (5, 3, 128)


@pytest.mark.parametrize("batch", [1, 4])
def test_trained_heads_are_exactly_greedy_and_accept_more(tiny, trained, batch):
    model, cm = tiny
    prompts = random_prompts([5, 9, 14, 20], seed=11)[:batch]  # not the training prompts
    out = cm.generate(prompts, 32, method="medusa", medusa_heads=trained[2], tree=TREE)
    for b, p in enumerate(prompts):
        assert out.tokens[b] == eager_greedy(model, p, 32), REPRO.format("trained_heads")
    print(f"medusa trained heads batch {batch}: accepted/step {out.accepted_per_step:.2f}")
    assert out.accepted_per_step > 1.0, out.per_step


def test_dump_what_tree(capsys):
    assert main(["dump", "--model", "llama-tiny", "--what", "tree", "--tree", "0; 1; 0,0"]) == 0
    out = capsys.readouterr().out
    assert "tree: 4 nodes, depth 2, 2 leaf paths, top-2 per head" in out
    assert "   3     2    1      0      1 (0, 0)        xx.x" in out
    assert "retrieve (root-to-leaf node paths): 0 2; 0 1 3" in out
    assert main(["dump", "--model", "llama-tiny", "--what", "tree", "--tree", "0; 1,0"]) == 2
    assert "path (1, 0) has no parent: add (1,)" in capsys.readouterr().err
    assert main(["train-heads", "--model", "llama-tiny", "--steps", "0", "--out", "h.st"]) == 2
    assert "--steps 0: expected at least 1" in capsys.readouterr().err


def test_bad_tree_specs_name_the_path():
    cases = [
        ([(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)], "path (0, 0, 0, 0) has depth 4, deeper than "
                                                  "the 3 Medusa heads"),
        ([(0,), (1, 0)], "path (1, 0) has no parent: add (1,)"),
        ([(0,), (1,), (0,)], "path (0,) appears twice"),
        ([], "expected a non-empty list of paths"),
        ([(0, -1)], "path (0, -1) is not a non-empty tuple of choices >= 0"),
    ]
    for spec, message in cases:
        with pytest.raises(TreeSpecError) as err:
            build_tree(spec, num_heads=3)
        assert message in str(err.value), (spec, str(err.value))
    with pytest.raises(TreeSpecError, match="expected paths such as"):
        parse_tree_spec("0; a")


def test_generate_bad_inputs(tiny, tmp_path):
    model, cm = tiny
    heads = MedusaHeads.for_model(model, 3)
    cases = [
        (dict(method="medusa"), "method='medusa' needs trained Medusa heads"),
        (dict(method="medusa", medusa_heads=heads, tree=[(0,), (0, 0), (0, 0, 0), (0, 0, 0, 0)]),
         "path (0, 0, 0, 0) has depth 4, deeper than the 3 Medusa heads"),
        (dict(method="medusa", medusa_heads=MedusaHeads(64, 100, 3)),
         "the heads' vocab size is 100, the model's is 128"),
        (dict(method="medusa", medusa_heads=MedusaHeads(32, 128, 3)),
         "the heads' hidden size is 32, the model's is 64"),
        (dict(method="medusa", medusa_heads=heads, acceptance="loose"), "acceptance='loose'"),
        (dict(method="greedy", medusa_heads=heads), "go with method='medusa', not 'greedy'"),
    ]
    for kwargs, message in cases:
        with pytest.raises(GenerationError) as err:
            cm.generate([[1, 2, 3]], 4, **kwargs)
        assert message in str(err.value), (kwargs, str(err.value))
    with pytest.raises(FileNotFoundError, match="no file"):
        cm.generate([[1, 2, 3]], 4, method="medusa", medusa_heads=str(tmp_path / "none.st"))
