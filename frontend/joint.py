"""Training: the joint forward + backward of a traced model, as two meshweave IR graphs.

    joint = build_joint(ep, name, eager_fallback=True, optimize=run_pipeline_fn)
    joint.forward    # IR: parameters, buffers, user inputs -> user outputs, then saved values
    joint.backward   # IR: saved values, then output gradients -> gradients of the inputs
    joint.fn(*user_leaves)   # differentiable: outputs carry grad_fn

Method: torch's AOTAutograd joint trace, converted to IR, rather than per-op VJP rules in the
op registry. AOTAutograd already differentiates every ATen op (torch's derivatives.yaml,
including the fused attention, norm and embedding backwards), functionalizes mutations (a
BatchNorm's running statistics) and aliasing, and partitions the joint graph into a forward and
a backward with the values saved between them made explicit: the forward's extra outputs, the
backward's first inputs. Re-deriving those formulas as registry rules would duplicate torch's
and drift from it; the partition is what the rematerialization pass will choose instead.

torch.export's Core ATen decomposition table is not passed: given to AOTAutograd, it changes
gpt-tiny's gradients by up to 4e-2 (torch 2.13; the same trace without it is exact), so the
joint graphs keep the ATen ops autograd records, except native_layer_norm_backward, which
torch's own decomposition turns into reductions and elementwise ops that the Triton backend
fuses (gradients within 2e-7 of eager's); embedding_dense_backward and the convolution and
pooling backwards run through the registry's eager fallback. Attention is rerouted: torch
records a different fused op per device (flash attention for CPU, flash/efficient/cuDNN on
CUDA), so `route_attention` first sends every dropout-free SDPA through meshweave's own pair,
meshweave.attention -> (out, logsumexp) and meshweave.attention_backward (ir/ops/attention.py),
which the Triton backend lowers to its flash-attention forward and backward kernels.

The trace runs the exported module through fx.Interpreter with node metadata preserved, so
each forward node keeps the user's source line and each backward node carries the source line
of the forward node it differentiates. Both graphs are converted to IR, optimized by the
compiler's pass pipeline and verified, and run by the backend: the reference executor, or
the Triton backend's generated module (ops without a kernel, such as the embedding backward,
run through torch inside it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.fx.traceback as fx_traceback
import torch.utils._pytree as pytree
from torch import fx

from ..ir.errors import FrontendError, MeshweaveError
from ..ir.graph import Graph
from ..runtime.reference import run_graph
from .convert import convert_module


@dataclasses.dataclass
class JointProgram:
    graphs: dict[str, Graph]  # "forward" and "backward"
    fn: Callable[..., list[Any]]
    parameters: list[torch.Tensor] = dataclasses.field(default_factory=list)  # what fn trains
    compilers: JointCompilers | None = None

    def regenerate(self, kind: str) -> None:
        """Rebuild what runs graph `kind` ("forward"/"backward") from its IR as it stands now
        (after an edit: the backends generate their programs once, at compile time)."""
        self.compilers.regenerate(kind)

    @property
    def num_outputs(self) -> int:
        """Forward outputs before the saved values: updated buffers (BatchNorm statistics),
        then the user's outputs."""
        return len(self.forward.outputs) - self.forward.meta.get("num_saved", 0)

    @property
    def forward(self) -> Graph:
        return self.graphs["forward"]

    @property
    def backward(self) -> Graph:
        if "backward" not in self.graphs:  # a torch without force_non_lazy_backward_lowering
            raise FrontendError("the backward graph is compiled at the first backward() with "
                                "this torch version; call loss.backward() once first")
        return self.graphs["backward"]

    def describe(self) -> str:
        """Both graphs, with the saved-for-backward boundary between them spelled out."""
        saved = ", ".join(f"%{n}" for n in self.saved)
        return (
            f"{self.forward}\n"
            f"# saved for backward ({len(self.saved)} values, the forward's outputs after the "
            f"first {self.num_outputs}): {saved}\n"
            f"# the backward takes them, then one gradient per forward output\n\n"
            f"{self.backward}"
        )

    @property
    def saved(self) -> list[str]:
        """Names of the forward values the backward reads (the saved-for-backward boundary)."""
        return [v.name for v in self.forward.outputs[self.num_outputs:]]


class _FlatOutputs(torch.nn.Module):
    """The exported module, run node by node (so metadata follows), returning a flat tuple."""

    def __init__(self, module: fx.GraphModule):
        super().__init__()
        self.m = module

    def forward(self, *leaves):
        return tuple(pytree.tree_leaves(fx.Interpreter(self.m).run(*leaves)))


def _backward_decompositions() -> dict:
    """torch's own decompositions of the norm backwards into core ops (reductions and
    elementwise math the Triton backend fuses); every other op stays as autograd records it."""
    from torch._decomp import get_decompositions

    return get_decompositions([torch.ops.aten.native_layer_norm_backward.default])


BACKWARD_DECOMPOSITIONS = _backward_decompositions()

_SDPA = torch.ops.aten.scaled_dot_product_attention.default
_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")


def attention_args(args: tuple, kwargs: dict, q_rank: int,
                   is_dynamic: Callable[[Any], bool]) -> tuple | None:
    """meshweave.attention's arguments for an SDPA call's, or None where it must stay SDPA:
    dropout (its RNG state is torch's), a flag only known at run time, or not 4-d."""
    vals = {**dict(zip(_SDPA_ARGS, args)), **kwargs}
    flags = (vals.get("dropout_p", 0.0), vals.get("is_causal", False), vals.get("scale"),
             vals.get("enable_gqa", False))
    if any(is_dynamic(f) for f in flags) or flags[0] or q_rank != 4:
        return None
    return (vals["query"], vals["key"], vals["value"], vals.get("attn_mask"), bool(flags[1]),
            None if flags[2] is None else float(flags[2]), bool(flags[3]))


def route_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm` with every dropout-free 4-d SDPA called as meshweave.attention (ir/ops/attention.py),
    so that AOTAutograd records the same forward/backward pair on every device. SDPA with
    dropout keeps torch's own ops (their RNG state is torch's)."""
    from ..ir.ops.attention import ATTENTION_OP

    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SDPA:
            continue
        q = getattr(node.args[0], "meta", {}).get("val")
        args = attention_args(node.args, node.kwargs, q.dim() if q is not None else 0,
                              lambda f: isinstance(f, fx.Node))
        if args is None:
            continue
        meta = {k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")}
        with gm.graph.inserting_after(node):
            pair = gm.graph.call_function(ATTENTION_OP, args)
        with gm.graph.inserting_after(pair):
            out = gm.graph.call_function(operator.getitem, (pair, 0))
        pair.meta, out.meta = dict(meta), {**meta, "val": node.meta.get("val")}
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def reference_runner(graph: Graph) -> Callable[[list[Any]], list[Any]]:
    """The reference executor over a graph whose inputs are all call arguments."""
    return lambda args: run_graph(graph, args)


def _boxed(graph: Graph, run_graph_fn: Callable[[list[Any]], list[Any]]) -> Callable:
    none = graph.meta.get("none_outputs") or []

    def run(args: list[Any]) -> list[Any]:
        outs = list(run_graph_fn(list(args)))
        args.clear()  # the boxed convention: the callee frees its inputs
        for i in none:
            outs.insert(i, None)
        return outs

    run._boxed_call = True  # AOTAutograd calls it with one list of arguments
    return run


def backward_with_forward():
    """AOTAutograd compiles the backward with the forward, not at the first backward(), so
    the backward IR prints and dumps right away (torch versions that can)."""
    from torch._functorch import config as aot_config

    if hasattr(aot_config, "force_non_lazy_backward_lowering"):
        return aot_config.patch(force_non_lazy_backward_lowering=True)
    return contextlib.nullcontext()


class JointCompilers:
    """AOTAutograd's forward and backward compilers: each fx graph converted to IR (`rewrite`
    applied), optimized, kept in `graphs` and run by `make_runner(graph)`.

    `targets` names the forward's first placeholders; `rename` maps AOTAutograd's placeholder
    names to IR value names. The backward's inputs are the saved values (the forward's last
    outputs, in order), then one gradient per differentiable output (tangents_k); the IR gives
    the saved ones the forward's names, so the boundary reads the same on both sides. Backward
    nodes named by `recomputed()` are marked `[recompute=True]`."""

    def __init__(self, name: str, targets: list[str], rename: dict[str, str], *,
                 eager_fallback: bool, optimize: Callable[[Graph], Graph],
                 make_runner: Callable[[Graph], Callable[[list[Any]], list[Any]]],
                 recomputed: Callable[[], list[str]] | None = None,
                 rewrite: Callable[[Graph], Graph] = lambda g: g):
        self.name, self.targets, self.rename = name, targets, rename
        self.rename_forward = dict(rename)
        self.eager_fallback, self.optimize, self.make_runner = eager_fallback, optimize, make_runner
        self.recomputed, self.rewrite = recomputed, rewrite
        self.graphs: dict[str, Graph] = {}
        self.runners: dict[str, Callable] = {}  # what runs each graph (regenerate swaps it)

    def regenerate(self, kind: str) -> None:
        self.runners[kind] = self.make_runner(self.graphs[kind])

    def _compile(self, kind: str, gm: fx.GraphModule, targets: list[str],
                 marked: set[str] = frozenset()) -> Callable:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        names = self.rename_forward if kind == "forward" else self.rename
        # AOTAutograd calls compilers under its fake-tensor mode; passes that evaluate (constant
        # folding) must see real tensors.
        with unset_fake_temporarily():
            g = convert_module(gm, targets, eager_fallback=self.eager_fallback,
                               name=f"{self.name}_{kind}", rename=names)
            for n in g.nodes:
                outs = {o.name.rsplit("_", 1)[0] if n.multi_output else o.name
                        for o in n.outputs}
                if outs & marked:
                    n.attrs["recompute"] = True
            self.graphs[kind] = g = self.optimize(self.rewrite(g))
            self.runners[kind] = self.make_runner(g)
            return _boxed(g, lambda args: self.runners[kind](args))

    def forward(self, gm: fx.GraphModule, _example) -> Callable:
        return self._compile("forward", gm, self.targets)

    def backward(self, gm: fx.GraphModule, _example) -> Callable:
        inputs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        saved = [n for n in inputs if not n.startswith("tangents")]
        fw = self.graphs["forward"]
        fw.meta["num_saved"] = len(saved)
        self.rename.update(zip(saved, [v.name for v in fw.outputs[len(fw.outputs) - len(saved):]]))
        marked = set(self.recomputed() if self.recomputed else ())
        return self._compile("backward", gm, [], marked)


def build_joint(
    ep: torch.export.ExportedProgram,
    example_leaves: list[Any],
    name: str,
    *,
    eager_fallback: bool,
    optimize: Callable[[Graph], Graph],
    make_runner: Callable[[Graph], Callable[[list[Any]], list[Any]]] = reference_runner,
    partition: Callable | None = None,
    recomputed: Callable[[], list[str]] | None = None,
) -> JointProgram:
    """`make_runner(graph)` builds what executes each optimized graph (default: the reference
    executor; meshweave.compile passes the Triton backend's for backend="triton").
    `partition` splits the joint graph (default: torch's default partition, which saves all
    the backward reads; passes/remat/ gives one that chooses under a memory budget), and
    `recomputed()` then names the backward nodes that recompute forward values: they are
    marked `[recompute=True]` in the backward IR."""
    from torch._functorch.aot_autograd import aot_module_simplified
    from torch._functorch.partitioners import default_partition

    flat = _FlatOutputs(route_attention(ep.module()))
    state = [n[2:] for n, _ in flat.named_parameters(remove_duplicate=False)]
    state += [n[2:] for n, _ in flat.named_buffers(remove_duplicate=False)]
    # AOTAutograd names the lifted parameters primals_1..; the IR names them after the module's
    # parameters (p_blocks_0_attn_qkv_weight), in both graphs, as torch.export does
    rename = {f"primals_{i + 1}": "p_" + fqn.replace(".", "_") for i, fqn in enumerate(state)}
    compilers = JointCompilers(name, state, rename, eager_fallback=eager_fallback,
                               optimize=optimize, make_runner=make_runner, recomputed=recomputed)
    graphs = compilers.graphs
    try:
        with fx_traceback.preserve_node_meta(), backward_with_forward():
            fn = aot_module_simplified(
                flat,
                list(example_leaves),
                fw_compiler=compilers.forward,
                bw_compiler=compilers.backward,
                partition_fn=partition or default_partition,
                decompositions=BACKWARD_DECOMPOSITIONS,
            )
    except MeshweaveError:  # a FrontendError, or the partition's (a budget it cannot meet)
        raise
    except Exception as e:
        raise FrontendError(
            f"AOTAutograd could not trace the training step of {name}: {type(e).__name__}: {e}"
        ) from e
    return JointProgram(graphs, fn, list(flat.parameters()), compilers)
