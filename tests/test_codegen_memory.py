"""Buffer reuse in the generated wrapper (codegen/triton/memory_plan.py): numerics stay exact, dead
buffers are reused, live ones (read later directly, through a view, or through a node run by
the reference executor) never are."""

from __future__ import annotations

import pytest
import torch
from meshweave.codegen.triton.memory_plan import plan_reuse
from meshweave.codegen.triton.schedule import schedule
from meshweave.models.gpt import GPT, GPTConfig

import meshweave
from meshweave import CompileOptions

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("kernel_cache")  # conftest.py (also TRITON_INTERPRET)


class LateViewRead(torch.nn.Module):
    """a is read again at the end through a view, after several same-shape temporaries that
    would happily take its memory if the view did not keep it alive."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        a = torch.relu(self.lin[0](x))
        keep = a.view(4, 2, 16).transpose(0, 1)  # a view of a, read last
        h = a
        for lin in self.lin[1:]:
            h = torch.sigmoid(lin(h)) * 2.0
        return h.view(4, 2, 16).transpose(0, 1) + keep.exp()


class ThroughFallback(torch.nn.Module):
    """topk runs on the reference executor; its output is read after same-shape kernels."""

    def forward(self, x):
        a = x * 3.0
        vals, _ = a.topk(8, dim=-1)
        b = torch.tanh(a) + 1.0
        c = torch.sin(b) * b
        return c[..., :8] + vals


@pytest.mark.parametrize("cls", [LateViewRead, ThroughFallback])
def test_reuse_keeps_live_buffers(cls):
    torch.manual_seed(0)
    model = cls().to(DEVICE).eval()
    x = torch.randn(8, 16, device=DEVICE)
    cm = meshweave.compile(model, (x,), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5,
                               msg=lambda m: f"{m}\nrepro: pytest {__file__} -k {cls.__name__}")
    sched = schedule(cm.graph, interpret=not torch.cuda.is_available())
    reuse = plan_reuse(cm.graph, sched)
    position = {n: i for i, g in enumerate(sched.groups) for n in g.nodes}
    for new, dead in reuse.items():
        # the dead buffer's readers all come before the group that writes the new value
        writer = position[new.producer]
        readers = [position[u] for n in cm.graph.nodes if n in position
                   for u in [n] if dead in n.inputs]
        assert all(r < writer for r in readers), (new.name, dead.name)


def test_gpt_allocates_a_handful_of_buffers():
    cfg = GPTConfig(vocab_size=64, max_seq_len=16, hidden_size=32, num_layers=4, num_heads=4)
    torch.manual_seed(0)
    model = GPT(cfg).to(DEVICE).eval()
    x = torch.randint(0, 64, (1, 8), device=DEVICE)
    cm = meshweave.compile(model, (x,), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(x), model(x), atol=2e-5, rtol=2e-5)
    src = cm.artifacts["kernels"].module_source
    allocs, reuses = src.count("torch.empty("), src.count("# reuse")
    # 4 layers would need ~30 buffers; with reuse the count does not grow with depth
    assert reuses > allocs and allocs <= 8, (allocs, reuses)


class ReuseAfterView(torch.nn.Module):
    """a is read once, through a view, then dies; a later buffer of its shape takes its memory."""

    def forward(self, x):
        a = torch.softmax(x * 2.0, dim=-1)  # a buffer [8, 16]
        s = a.view(8, 2, 8).amax(-1)  # its only reader, through a view
        return torch.softmax(x * 3.0 + s.sum(-1, keepdim=True), dim=-1)  # [8, 16] again


def test_a_buffer_read_through_a_view_is_reused_once_dead():
    model = ReuseAfterView().eval()
    x = torch.randn(8, 16, device=DEVICE)
    cm = meshweave.compile(model.to(DEVICE), (x,), options=CompileOptions(backend="triton"))
    torch.testing.assert_close(cm(x), model(x), atol=1e-5, rtol=1e-5)
    sched = schedule(cm.graph, interpret=not torch.cuda.is_available())
    reuse = plan_reuse(cm.graph, sched)
    views = {n.inputs[0] for n in cm.graph.nodes if n.op == "aten.view.default"}
    through_view = [(new, dead) for new, dead in reuse.items() if dead in views]
    assert through_view, (f"no buffer read through a view was reused: {reuse}\n"
                          f"{cm.graph}")
    assert "# reuse" in cm.artifacts["kernels"].module_source
