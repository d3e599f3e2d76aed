"""A rank's program: its stage's IR plus the stage-to-stage transfers around it.

`RankProgram.graph` is what the rank runs once per micro-batch. Its user inputs are the model's
user inputs that the stage reads (sliced per micro-batch and per the inputs' placements),
followed by the values it receives from earlier stages; its outputs are the model outputs the
stage produces (last stage), followed by the values it sends to later stages. Collectives
inside a stage are `dist.*` nodes in the graph (from the planner's lowering).

`split_stages(graph, plan, rank)` builds such a program by cutting a whole graph at the plan's
stage boundaries, without sharding anything: the runtime's own lowering for plans whose stage
meshes only replicate parameters (data parallelism and pipelines). The graph must be traced at
the rank's local micro-batch size. Plans with tensor parallelism go through the planner's
`lower_for_rank`; `program_from_lowered` wraps its result.

Transfers are numbered the same way on every rank (graph order of the value, then destination
stage), and that number is the message tag, so receives can be posted in any order.
"""

from __future__ import annotations

import dataclasses

from ...ir.graph import Graph, Value, map_values
from ...ir.types import TensorType
from .errors import DistributedError


@dataclasses.dataclass
class Transfer:
    """A value sent from `src_stage` to `dst_stage` by a split program (split_stages: every
    stage has the same mesh, so the peer is the rank at the same mesh coordinates)."""

    value: str
    src_stage: int
    dst_stage: int
    tag: int
    type: TensorType


@dataclasses.dataclass
class RankProgram:
    rank: int
    stage: int
    graph: Graph
    model_inputs: list[str]  # names of the model's user inputs, in the model's order
    used_inputs: list[int]  # indexes into model_inputs of graph's leading user inputs
    recvs: list[Transfer]
    sends: list[Transfer]
    num_outputs: int  # leading graph outputs that are model outputs (last stage only)
    output_names: list[str]  # the model's output value names (for placements)
    input_specs: dict | None = None  # user input -> planner shard spec of its micro-batch
    batch_dims: dict | None = None  # user input -> the dim micro-batches split (None: none)
    outputs_replicated: bool = False  # outputs arrive gathered (the planner's lowering)

    @property
    def param_names(self) -> list[str]:
        return [v.name for v in self.graph.inputs if v.kind == "param"]


def node_stage_map(graph: Graph, plan) -> dict[str, int]:
    """First-output name of each node -> its stage (every node in stage 0 for 1 stage)."""
    if plan.num_stages <= 1 or not plan.stages:
        return {n.outputs[0].name: 0 for n in graph.nodes if n.outputs}
    out: dict[str, int] = {}
    for st in plan.stages:
        for name in st.nodes:
            out[name] = st.index
    missing = [n.outputs[0].name for n in graph.nodes if n.outputs and n.outputs[0].name not in out]
    if missing:
        raise DistributedError(
            f"plan assigns no stage to nodes {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    return out


def plan_transfers(graph: Graph, plan) -> list[Transfer]:
    """Every stage-to-stage transfer of the plan, numbered identically on every rank."""
    stage_of = node_stage_map(graph, plan)
    producer: dict[Value, int] = {}
    consumers: dict[Value, set[int]] = {}
    for n in graph.nodes:
        s = stage_of[n.outputs[0].name] if n.outputs else 0
        for v in n.inputs:
            if v in producer and producer[v] != s:
                if s < producer[v]:
                    raise DistributedError(
                        f"node {n} in stage {s} reads %{v.name} from later "
                        f"stage {producer[v]}: stages are not in order"
                    )
                consumers.setdefault(v, set()).add(s)
        for o in n.outputs:
            producer[o] = s
    last = max(plan.num_stages - 1, 0)
    for v in graph.outputs:
        if v in producer and producer[v] != last:
            consumers.setdefault(v, set()).add(last)
    transfers = []
    for v in (o for n in graph.nodes for o in n.outputs):
        for dst in sorted(consumers.get(v, ())):
            if not isinstance(v.type, TensorType):
                raise DistributedError(
                    f"%{v.name} ({v.type}) crosses stages {producer[v]} -> "
                    f"{dst} but is not a tensor"
                )
            transfers.append(Transfer(v.name, producer[v], dst, len(transfers), v.type))
    return transfers


def split_stages(graph: Graph, plan, rank: int) -> RankProgram:
    """The rank's stage of `graph`, cut at the plan's stage boundaries (no sharding)."""
    stage = plan.stage_of_rank(rank)
    stage_of = node_stage_map(graph, plan)
    transfers = plan_transfers(graph, plan)
    recvs = [t for t in transfers if t.dst_stage == stage]
    sends = [t for t in transfers if t.src_stage == stage]
    g = graph.copy()
    nodes = [n for n in g.nodes if stage_of[n.outputs[0].name] == stage]
    received = {t.value for t in recvs}
    by_name = {v.name: v for v in g.all_values()}
    boundary = {name: Value(name, by_name[name].type, None, "user", name) for name in received}
    remap = {by_name[name]: v for name, v in boundary.items()}
    new_nodes = []
    for n in nodes:
        n.args = map_values(n.args, lambda v: remap.get(v, v))
        n.kwargs = map_values(n.kwargs, lambda v: remap.get(v, v))
        new_nodes.append(n)
    last = stage == max(plan.num_stages - 1, 0)
    model_outs = [remap.get(v, v) for v in g.outputs] if last else []
    used = {v for n in new_nodes for v in n.inputs} | set(model_outs)
    model_inputs = [v.name for v in g.user_inputs]
    user_in = [v for v in g.user_inputs if v in used]
    state_in = [v for v in g.state_inputs if v in used]
    outputs = model_outs + [by_name[t.value] for t in sends]
    stage_graph = Graph(
        user_in + [boundary[t.value] for t in recvs] + state_in,
        new_nodes,
        outputs,
        {v.name: g.tensors[v.name] for v in state_in},
        dict(g.symbols),
        list(g.provenance),
        f"{g.name}.stage{stage}",
        dict(g.meta),
    )
    return RankProgram(
        rank,
        stage,
        stage_graph,
        model_inputs,
        [model_inputs.index(v.name) for v in user_in],
        recvs,
        sends,
        len(model_outs),
        [v.name for v in graph.outputs],
    )


def program_from_lowered(lowered: Graph, graph: Graph, plan, rank: int) -> RankProgram:
    """Wrap the planner's per-rank graph.

    Its stage transfers are inline dist.send/dist.recv nodes (the executor runs them), its
    user inputs are cut by `meta["shard_specs"]` from the micro-batch split along
    `meta["micro_batch_dim"]`, and its outputs (last stage) are gathered to full tensors.
    """
    stage = plan.stage_of_rank(rank)
    model_inputs = [v.name for v in graph.user_inputs]
    missing = [v.name for v in lowered.user_inputs if v.name not in model_inputs]
    if missing:
        raise DistributedError(
            f"rank {rank}: lowered program reads user inputs {missing} that "
            f"the model does not have ({model_inputs})"
        )
    used = [model_inputs.index(v.name) for v in lowered.user_inputs]
    last = stage == plan.num_stages - 1
    specs = lowered.meta.get("shard_specs") or {}
    return RankProgram(
        rank,
        stage,
        lowered,
        model_inputs,
        used,
        [],
        [],
        len(lowered.outputs) if last else 0,
        [v.name for v in graph.outputs],
        input_specs={v.name: specs[v.name] for v in lowered.user_inputs if v.name in specs},
        batch_dims=dict(lowered.meta.get("micro_batch_dim") or {}),
        outputs_replicated=bool(lowered.meta.get("outputs_replicated", True)),
    )


def tied_params(graph: Graph, plan) -> list[tuple[list[str], list[int]]]:
    """Parameters whose copies must stay equal, with the stages that hold a copy.

    Two cases: parameters that share storage (tied weights: torch.export lifts a tied weight
    once per use site, e.g. the embedding and the LM head), and a parameter read by nodes of
    several pipeline stages (each stage holds a copy). Training keeps the copies equal by
    summing their gradients (optim.py). Returns [(value names, sorted stages using any of
    them)] for every group with two or more names or stages.
    """
    by_storage: dict[tuple, list[str]] = {}
    for v in graph.inputs:
        t = graph.tensors.get(v.name)
        if v.kind != "param":
            continue
        if t is not None and t.device.type != "meta":
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        else:
            key = (v.name,)
        by_storage.setdefault(key, []).append(v.name)
    stage_of = node_stage_map(graph, plan)
    users: dict[str, set[int]] = {}
    for n in graph.nodes:
        for v in n.inputs:
            if v.kind == "param":
                users.setdefault(v.name, set()).add(stage_of[n.outputs[0].name])
    out = []
    for names in by_storage.values():
        stages = sorted(set().union(*(users.get(n, set()) for n in names)))
        if len(names) > 1 or len(stages) > 1:
            out.append((names, stages))
    return out


def tie_rank_groups(ties, plan) -> list[list[int]]:
    """Rank groups of the ties for groups.py: the ranks at the same mesh coordinates across
    the stages of a tie when those stage meshes have one shape, else all their ranks."""
    out = []
    for _, stages in ties:
        if len(stages) < 2:
            continue
        meshes = [plan.stage_mesh(s) for s in stages]
        if len({m.shape for m in meshes}) == 1:
            out += [[m.devices[r] for m in meshes] for r in range(meshes[0].size)]
        else:
            out.append(sorted(r for m in meshes for r in m.devices))
    return out


@dataclasses.dataclass
class FullTie:
    """Tied copies on stages of different mesh shapes: their shards do not line up, so the
    gradients are summed as full tensors over every rank of those stages (optim.py)."""

    names: list[str]
    ranks: list[int]
    specs: dict[str, list]  # this rank's shard spec (lower.py's format) of each name it holds


def split_ties(ties, plan, stage: int, rank: int, program: RankProgram):
    """This rank's ties: ([(names, ranks at its mesh coordinates)], [FullTie]), in the same
    order on every rank (see tie_rank_groups)."""
    local = plan.stage_mesh(stage).devices.index(rank)
    specs = program.graph.meta.get("shard_specs") or {}
    same, full = [], []
    for names, stages in ties:
        if stage not in stages:
            continue
        meshes = [plan.stage_mesh(s) for s in stages]
        if len({m.shape for m in meshes}) == 1:
            same.append((list(names), [m.devices[local] for m in meshes]))
        else:
            ranks = sorted(r for m in meshes for r in m.devices)
            full.append(FullTie(list(names), ranks, {n: specs.get(n, []) for n in names}))
    return same, full
