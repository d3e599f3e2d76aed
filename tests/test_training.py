"""Training through compile(): the joint forward + backward IR (frontend/joint.py), gradients
against eager, optimizer steps, the saved-for-backward boundary, and bad input."""

from __future__ import annotations

import copy

import pytest
from conftest import train_pair, training_loss
import torch
from meshweave.ir.errors import MeshweaveError
from meshweave.ir.verify import verify

import meshweave

MODELS = ["gpt-tiny", "llama-tiny", "moe-tiny", "convnet-tiny", "hf:gpt2", "hf:llama",
          "hf:mixtral"]
TRAIN = meshweave.CompileOptions(training=True)


_loss, _pair = training_loss, train_pair


@pytest.mark.parametrize("name", MODELS)
def test_gradients_match_eager(name):
    model, ref, inputs = _pair(name)
    cm = meshweave.compile(model, inputs, options=TRAIN)
    torch.manual_seed(1)  # HF configs train with dropout: the same seed on both sides
    out = cm(*inputs)
    loss = _loss(out)
    assert loss.grad_fn is not None
    loss.backward()
    torch.manual_seed(1)
    _loss(ref(*inputs)).backward()
    theirs = dict(ref.named_parameters())
    checked = 0
    for n, p in model.named_parameters():
        q = theirs[n]
        assert (p.grad is None) == (q.grad is None), n
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n: f"grad of {n} ({name}): {m}")
            checked += 1
    assert checked >= 4
    for (n, b), (_, rb) in zip(model.named_buffers(), ref.named_buffers()):  # BatchNorm stats
        torch.testing.assert_close(b, rb, msg=lambda m, n=n: f"buffer {n}: {m}")


def test_the_backward_ir_is_what_runs():
    """Both graphs verify, and editing the backward IR (then regenerating its program, which
    the backend builds once at compile time) changes the gradients it produces."""
    model, ref, inputs = _pair("gpt-tiny")
    cm = meshweave.compile(model, inputs, options=TRAIN)
    verify(cm.forward_graph)
    verify(cm.backward_graph)
    _loss(cm(*inputs)).backward()
    good = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ops = [n.op for n in cm.backward_graph.nodes]
    gelu = next((n for n in cm.backward_graph.nodes if n.op == "aten.gelu_backward.default"),
                None)
    assert gelu is not None, sorted(set(ops))
    # a fault planted in the executed IR: the exact GELU's derivative for the model's tanh one
    gelu.args, gelu.kwargs = gelu.args[:2], {"approximate": "none"}
    cm.joint.regenerate("backward")
    _loss(cm(*inputs)).backward()
    assert any(not torch.allclose(p.grad, g) for p, g in zip(model.parameters(), good))


def test_saved_boundary_and_source_lines_are_printed():
    model, _, inputs = _pair("gpt-tiny")
    cm = meshweave.compile(model, inputs, options=TRAIN)
    j = cm.joint
    assert j.saved and j.num_outputs == 1 and len(cm.forward_graph.outputs) == 1 + len(j.saved)
    n_saved = len(j.saved)
    assert [v.name.rstrip("_") for v in cm.backward_graph.inputs[:n_saved]] == j.saved
    text = j.describe()
    assert f"# saved for backward ({n_saved} values" in text
    assert "graph GPT_forward(%p_tok_emb_weight" in text and "graph GPT_backward(" in text
    # backward nodes point at the forward source line they differentiate
    bw_sources = {n.source for n in cm.backward_graph.nodes if n.source}
    assert any(s.startswith("models/gpt.py:") for s in bw_sources), sorted(bw_sources)[:5]
    assert "training (AOTAutograd joint trace)" in cm.explain()


def test_three_adamw_steps_match_eager():
    model, ref, inputs = _pair("llama-tiny")
    cm = meshweave.compile(model, inputs, options=TRAIN)
    # cm.parameters() are the tensors the step trains (the model's own), as with a plan
    assert [id(p) for p in cm.parameters()] == [id(p) for p in model.parameters()]
    opt = torch.optim.AdamW(cm.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(3):
        for o, m, f in ((opt, model, cm), (ref_opt, ref, ref)):
            o.zero_grad()
            _loss(f(*inputs)).backward()
            o.step()
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=n, s=step: f"{n} after step {s + 1}: {m}")


def test_no_grad_runs_the_forward_only_program():
    model, ref, inputs = _pair("gpt-tiny")
    cm = meshweave.compile(model, inputs, options=TRAIN)
    with torch.no_grad():
        out = cm(*inputs)
        want = ref(*inputs)
    assert out.grad_fn is None
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


class _Dropout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(torch.relu(self.lin(x)))


def test_dropout_follows_eager_under_a_seed():
    model = _Dropout().train()
    ref = copy.deepcopy(model)
    x = torch.randn(8, 16)
    cm = meshweave.compile(model, (x,), options=TRAIN)
    torch.manual_seed(123)
    out = cm(x)
    out.sum().backward()
    torch.manual_seed(123)
    want = ref(x)
    want.sum().backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(model.lin.weight.grad, ref.lin.weight.grad)
    assert (out == 0).any()  # dropout did drop


class _NoParams(torch.nn.Module):
    def forward(self, x):
        return x * 2


def test_training_a_model_without_parameters_is_a_clear_error():
    with pytest.raises(MeshweaveError, match="no floating-point parameter that requires grad"):
        meshweave.compile(_NoParams(), (torch.randn(2),), options=TRAIN)


def test_backward_twice_without_retain_graph_says_so():
    model, _, inputs = _pair("gpt-tiny")
    cm = meshweave.compile(model, inputs, options=TRAIN)
    loss = _loss(cm(*inputs))
    loss.backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss.backward()


def test_dump_train_prints_both_graphs(capsys):
    from meshweave.cli import main

    assert main(["dump", "--model", "gpt-tiny", "--train", "--what", "ir", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "graph GPT_forward(" in out and "graph GPT_backward(" in out
    assert "# saved for backward (" in out


@pytest.mark.usefixtures("kernel_cache")
@pytest.mark.parametrize("name", ["gpt-tiny", "llama-tiny"])
def test_triton_backend_compiles_forward_and_backward(name):
    """backend="triton": both graphs of the step become generated modules (the interpreter on
    the CPU); the gradients still match eager."""
    model, ref, inputs = _pair(name)
    opts = meshweave.CompileOptions(training=True, backend="triton")
    cm = meshweave.compile(model, inputs, options=opts)
    for g in (cm.forward_graph, cm.backward_graph):
        art = g.meta["kernels"]
        assert sum(k.kind == "matmul" for k in art.kernels) >= 4, art.summary()
    assert "generated Triton modules" in cm.explain()
    _loss(cm(*inputs)).backward()
    _loss(ref(*inputs)).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"grad of {n}: {m}")
