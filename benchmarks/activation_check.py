"""The activation-memory estimate against what autograd really saves, on the zoo models.

    python benchmarks/activation_check.py            # every case below
    python benchmarks/activation_check.py gpt-tiny   # some of them

Measured: the forward of the model under torch.autograd.graph.saved_tensors_hooks
(runtime/memory.SavedBytes), counting each distinct storage once, parameters and buffers
excluded; CPU, fp32, the eager module. Estimated: passes/parallel/cost/saved_rules.py on the
graph meshweave.compile traces from the same module and inputs. A second measurement runs that
traced graph itself through the reference executor with autograd on (its parameters requiring
grad): it differs from the eager module where the compiler rewrote the model, as for moe-tiny,
whose dense every-expert-on-every-token block becomes one sparse moe.experts node.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings

import torch

# (label, zoo name, batch, seq, config overrides); the "-256" cases are big enough for the
# activations to dwarf the embedding indices and attention statistics.
CASES = [
    ("gpt-tiny", "gpt-tiny", 2, 16, {}),
    ("llama-tiny", "llama-tiny", 2, 16, {}),
    ("moe-tiny", "moe-tiny", 2, 16, {}),
    ("hf:gpt2", "hf:gpt2", 2, 16, {}),
    ("hf:llama", "hf:llama", 2, 16, {}),
    ("gpt-256", "gpt-tiny", 2, 128, dict(hidden_size=256, max_seq_len=128)),
    ("llama-256", "llama-tiny", 2, 128, dict(hidden_size=256, ffn_hidden_size=688,
                                             max_seq_len=128)),
]


@dataclasses.dataclass
class Check:
    label: str
    measured: int  # eager module, bytes
    traced: int  # the traced graph run by the reference executor, bytes
    estimated: int

    def error(self, against: str = "measured") -> float:
        ref = getattr(self, against)
        return (self.estimated - ref) / ref


def measure_eager(model: torch.nn.Module, inputs: tuple) -> int:
    """Bytes autograd keeps after one forward of `model` (params and buffers excluded)."""
    from meshweave.runtime.memory import SavedBytes, storage_ptrs

    exclude = storage_ptrs(list(model.parameters()) + list(model.buffers()))
    with SavedBytes(exclude) as saved:
        out = model(*inputs)
    del out
    return saved.nbytes


def measure_traced(graph, inputs: tuple) -> int:
    """The same for the traced graph run by the reference executor, parameters trainable."""
    from meshweave.runtime.memory import SavedBytes, storage_ptrs
    from meshweave.runtime.reference import run_graph

    params = {v.name for v in graph.inputs if v.kind == "param"}
    tensors = {k: (t.detach().requires_grad_(t.is_floating_point()) if k in params else t)
               for k, t in graph.tensors.items()}
    with SavedBytes(storage_ptrs(tensors.values())) as saved:
        out = run_graph(graph, list(inputs), tensors)
    del out
    return saved.nbytes


def estimate(graph) -> int:
    from meshweave.passes.parallel.cost.cost_model import grad_free_values
    from meshweave.passes.parallel.cost.saved_rules import saved_activation_bytes

    return saved_activation_bytes(graph, grad_free_values(graph))


def check(label: str, name: str, batch: int, seq: int, overrides: dict) -> Check:
    import meshweave
    from meshweave.models import build_model

    torch.manual_seed(0)
    model, inputs = build_model(name, batch=batch, seq=seq, **overrides)
    graph = meshweave.compile(model, inputs).graph
    return Check(label, measure_eager(model, inputs), measure_traced(graph, inputs),
                 estimate(graph))


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore")
    want = set(argv if argv is not None else sys.argv[1:])
    cases = [c for c in CASES if not want or c[0] in want]
    if want and not cases:
        print(f"no case named {sorted(want)}; cases: {[c[0] for c in CASES]}")
        return 2
    print(f"{'model':<12}{'measured':>12}{'traced':>12}{'estimated':>12}{'err':>9}"
          f"{'err(traced)':>13}")
    worst = 0.0
    for case in cases:
        c = check(*case)
        worst = max(worst, abs(c.error()))
        print(f"{c.label:<12}{c.measured:>12}{c.traced:>12}{c.estimated:>12}"
              f"{100 * c.error():>8.1f}%{100 * c.error('traced'):>12.1f}%", flush=True)
    print(f"worst |error| against the eager module: {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
