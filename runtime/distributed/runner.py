"""The runtime's own harness: a zoo model under a parallel plan on local ranks, with the
executor's training step (its sharded optimizer, ZeRO-1 slices, GPipe and 1F1B schedules, the
runtime's data/pipeline split), and on one device to compare.

    spec = RunSpec("gpt-tiny", plan="dpxtp", dp=2, tp=2, training=True, steps=2)
    job = prepare(spec)                 # build, trace, plan (in this process)
    got = run_distributed(job)          # launch plan.world_size ranks; full outputs/params
    ref = run_single_device(job)        # the eager model on one device
    errs = compare(ref, got)            # max |error| of outputs, losses and parameters

Users do not come through here: `meshweave run` is a thin layer over meshweave.compile
(meshweave/cli_run.py, runtime/distributed/module.py). Runtime tests and benchmarks use this
harness to drive the executor directly; `single_device`, `compare` and `step_loss` are the
oracle and the loss both share.

The parent traces the model once, plans, and writes the weights once to a checkpoint file in
a temporary directory (checkpoint.py); the ranks get a weight-free job (the graph's tensors on
the meta device). Each rank lowers the plan for itself (`lower_for_rank` of the planner, or the
runtime's own stage split for plans that only replicate parameters), loads only its own weight
shards from the memory-mapped checkpoint, runs and returns its shards; the parent reassembles
full parameters from the shards and their shard specs. Labels for training are the next tokens of the
inputs (the last position predicts token 0), the loss is executor.py's documented "ce".
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any

import torch


from ...ir.graph import Graph
from ...ir.mesh import DeviceMesh
from ..compare import ComparisonError, max_errors, worst
from .checkpoint import CHECKPOINT_NAME, load_program_weights, rank_job
from .errors import DistributedError
from .executor import RankExecutor
from .module import assemble_params
from .optim import OptimConfig
from .program import RankProgram, program_from_lowered, split_stages, tie_rank_groups, tied_params

PLAN_KINDS = ("auto", "dp", "tp", "pp", "dpxtp", "ppxtp", "dpxpp", "fixed", "file")
DEVICES = ("cpu", "cuda")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """What to run. `plan` picks the plan: "auto" searches (plan_parallel over `devices`),
    the others build the fixed Megatron grid (dp x tp x pp) or, without the planner's lowering
    and with tp == 1, the runtime's own data/pipeline split."""

    model: str
    plan: str = "fixed"
    dp: int = 1
    tp: int = 1
    pp: int = 1
    devices: int = 0  # for plan="auto"; 0 means dp * ep * tp * pp
    micro_batches: int = 1
    schedule: str = "gpipe"
    zero: bool = False
    training: bool = False
    steps: int = 2
    batch: int = 4
    seq: int = 16
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    loss: str = "ce"
    lowering: str = "auto"  # "auto" (planner when available), "planner", "split"
    timeout_s: float = 240.0
    hardware: str = "h100"  # the cost model's device, for plan="auto"
    device: str = "cpu"  # where ranks compute: "cpu" (gloo) or "cuda" (NCCL, a GPU per rank)
    plan_file: str | None = None  # plan="file": a Plan JSON (devices: its world size)
    layers: int | None = None  # the model's layer count, when not the zoo config's
    # Weight-only quantization (a meshweave.QuantConfig; inference only) and GPTQ's calibration
    # batches: the traced graph is meshweave.compile's with CompileOptions(quantize=, calibration=)
    quantize: Any = None
    calibration: tuple | None = None
    # Expert parallelism: a (dp, ep, tp) stage mesh whose "ep" axis splits moe.experts' experts
    # (strategies/moe_rules.py); None keeps the (dp, tp) mesh
    ep: int | None = None

    def __post_init__(self):
        if self.plan not in PLAN_KINDS:
            raise ValueError(f"unknown plan kind {self.plan!r}; known: {PLAN_KINDS}")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}; known: {DEVICES}")

    @property
    def backend(self) -> str:
        return "nccl" if self.device == "cuda" else "gloo"

    @property
    def world_size(self) -> int:
        return self.devices or self.dp * (self.ep or 1) * self.tp * self.pp


@dataclasses.dataclass
class Job:
    spec: RunSpec
    graph: Graph  # traced full model
    plan: Any
    inputs: list[torch.Tensor]  # the global batch
    labels: torch.Tensor
    lowering: str  # "planner" | "split"
    model_state: dict[str, torch.Tensor]  # initial weights by fully qualified name
    # Set on the job the ranks get (checkpoint.rank_job): its graph's tensors are meta.
    checkpoint: str | None = None  # the weights file every rank loads its shards from
    ties: list | None = None  # tied_params of the real graph (meta tensors hide shared storage)


@dataclasses.dataclass
class RankResult:
    rank: int
    stage: int
    coords: tuple[int, ...]
    outputs: list[torch.Tensor] | None  # full outputs (rank 0)
    losses: list[float | None]
    params: dict[str, torch.Tensor]  # value name -> local shard after training
    placements: dict[str, tuple]
    specs: dict[str, list]  # value name -> shard spec (lower.py's format) of the local shard
    param_numel: int
    optim_state_numel: int
    param_bytes: int = 0  # bytes of the distinct storages behind the rank's parameters
    step_seconds: list[float] = dataclasses.field(default_factory=list)  # wall time per step


@dataclasses.dataclass
class RunResult:
    outputs: list[torch.Tensor] | None
    losses: list[float]
    params: dict[str, torch.Tensor]  # fully qualified name -> full tensor
    ranks: list[RankResult] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------------ preparing
_PLANNER_MODULES = ("lower", "lower.rank", "search", "search.megatron_grid", "search.search")


def _planner():
    """The planner's entry points, or None when passes/parallel has no lowering."""
    try:
        from meshweave.passes.parallel.lower.rank import lower_for_rank
        from meshweave.passes.parallel.search.megatron_grid import megatron_plan
        from meshweave.passes.parallel.search.search import plan_parallel
    except ModuleNotFoundError as e:  # only a missing planner module; other errors propagate
        if e.name in {f"meshweave.passes.parallel.{m}" for m in _PLANNER_MODULES}:
            return None
        raise
    return megatron_plan, plan_parallel, lower_for_rank


def _overrides(model_name: str, layers: int | None) -> dict:
    """Config overrides for a layer count other than the zoo config's."""
    from meshweave.models import get_model_spec_with_layers

    try:
        get_model_spec_with_layers(model_name, layers)
    except ValueError as e:
        raise DistributedError(str(e)) from None
    return {} if layers is None else {"num_layers": layers}


def trace_model(model_name: str, batch: int, seq: int, layers: int | None = None,
                quantize: Any = None, calibration: tuple | None = None):
    """(model, global inputs, traced graph at `batch`); `layers` overrides the layer count;
    `quantize` (a QuantConfig) quantizes the graph's linear layers (calibrated on
    `calibration` batches for GPTQ)."""
    from meshweave.models import build_model

    model, inputs = build_model(model_name, batch=batch, seq=seq,
                                **_overrides(model_name, layers))
    return model, list(inputs), _compiled_graph(model, tuple(inputs), quantize, calibration)


def _compiled_graph(model, inputs: tuple, quantize: Any = None, calibration=None) -> Graph:
    import meshweave

    if quantize is None:
        return meshweave.compile(model, inputs).graph
    model.eval()
    opts = meshweave.CompileOptions(quantize=quantize, calibration=list(calibration or ()))
    with torch.no_grad():
        return meshweave.compile(model, inputs, options=opts).graph


def next_token_labels(tokens: torch.Tensor) -> torch.Tensor:
    return torch.roll(tokens, -1, dims=1)


def prepare(spec: RunSpec, traced=None, cache: dict | None = None) -> Job:
    """Build and trace the model, make the plan.

    `traced`: a (model, inputs, graph) from trace_model to reuse; `cache`: a dict in which
    graphs traced at other (local) batch sizes are kept between calls.
    """
    planner = _planner()
    lowering = spec.lowering
    if lowering == "auto":
        lowering = "planner" if planner is not None else "split"
    if lowering == "planner" and planner is None:
        raise DistributedError(
            "the planner's lowering (passes/parallel/lower/) is not "
            "available; use lowering='split' (data/pipeline parallel only)"
        )
    if spec.quantize is not None and spec.training:
        raise DistributedError("quantize is weight-only quantization for inference; "
                               "it cannot be combined with training")
    model, inputs, graph = traced or trace_model(spec.model, spec.batch, spec.seq, spec.layers,
                                                 spec.quantize, spec.calibration)
    if lowering == "split":
        plan, graph = _split_plan(spec, model, inputs, graph, cache)
    else:
        plan = _planner_plan(spec, graph, planner)
    labels = next_token_labels(inputs[0])
    state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=False).items()}
    return Job(spec, graph, plan, inputs, labels, lowering, state)


def _planner_plan(spec: RunSpec, graph: Graph, planner):
    megatron_plan, plan_parallel, _ = planner
    if spec.plan == "file":
        return _plan_from_file(spec)
    if spec.plan == "auto":
        plan = plan_parallel(
            graph, spec.world_size, spec.hardware, batch=spec.batch, training=spec.training
        )
    else:
        plan = megatron_plan(
            graph,
            spec.dp,
            spec.tp,
            spec.pp,
            micro_batches=spec.micro_batches,
            batch=spec.batch,
            training=spec.training,
            ep=spec.ep,
        )
        plan.schedule, plan.zero = spec.schedule, spec.zero
    plan.training = spec.training
    return plan


def _plan_from_file(spec: RunSpec):
    from ...passes.parallel.plan import Plan

    if not spec.plan_file:
        raise DistributedError("plan='file' needs RunSpec.plan_file")
    with open(spec.plan_file) as f:
        plan = Plan.from_json(f.read())
    made_for = (plan.search or {}).get("batch")
    if made_for is not None and made_for != spec.batch:
        raise DistributedError(
            f"{spec.plan_file}: the plan was made for a global batch of {made_for}, the run "
            f"has {spec.batch}; pass --batch {made_for} or plan again"
        )
    if spec.devices and spec.devices != plan.world_size:
        raise DistributedError(
            f"{spec.plan_file}: the plan needs {plan.world_size} ranks, the run has "
            f"{spec.devices}"
        )
    plan.training = spec.training
    return plan


def _split_plan(spec: RunSpec, model, inputs, graph, cache: dict | None):
    """The runtime's own plan: dp replicas x pp stages of (roughly) equal node counts."""
    from ...passes.parallel.plan import Plan, StagePlan

    if spec.tp != 1 or spec.ep is not None or spec.plan in ("auto", "file"):
        raise DistributedError(
            f"plan {spec.plan!r} (tp={spec.tp}) needs the planner's "
            f"lowering (passes/parallel/lower/), which is not available"
        )
    local = spec.batch // (spec.dp * spec.micro_batches)
    if local * spec.dp * spec.micro_batches != spec.batch or local < 1:
        raise DistributedError(
            f"batch {spec.batch} does not split over dp={spec.dp} x "
            f"{spec.micro_batches} micro-batches"
        )
    if local != spec.batch:
        key = (spec.model, local, spec.seq, spec.quantize)
        if cache is None or key not in cache:
            graph = _compiled_graph(model, tuple(x[:local] for x in inputs), spec.quantize,
                                    spec.calibration)
            if cache is not None:
                cache[key] = graph
        graph = cache[key] if cache is not None else graph
    mesh = DeviceMesh((spec.dp,), ("dp",))
    names = [n.outputs[0].name for n in graph.nodes]
    bounds = [round(i * len(names) / spec.pp) for i in range(spec.pp + 1)]
    stages = [
        StagePlan(s, names[bounds[s] : bounds[s + 1]], list(range(s * spec.dp, (s + 1) * spec.dp)))
        for s in range(spec.pp)
    ]
    batch_values = [*graph.user_inputs, *graph.outputs]  # every activation is batch-split
    placements = {v.name: ("S(0)",) for v in batch_values} if spec.dp > 1 else {}
    plan = Plan(
        mesh,
        spec.pp,
        placements,
        stages,
        spec.micro_batches,
        spec.schedule,
        spec.zero,
        spec.training,
    )
    return plan, graph


# ------------------------------------------------------------------------ running
def rank_program(job: Job, rank: int) -> RankProgram:
    if job.lowering == "split":
        return split_stages(job.graph, job.plan, rank)
    lower_for_rank = _planner()[2]
    return program_from_lowered(
        lower_for_rank(job.graph, job.plan, rank), job.graph, job.plan, rank
    )


def run_rank(rank: int, world_size: int, job: Job) -> RankResult:
    """Body of one rank: create groups, lower, load its weight shards, run inference or
    training steps. `job` is a rank job (checkpoint.rank_job): weights come from its file."""
    from .groups import init_plan_groups

    plan, spec = job.plan, job.spec
    if plan.world_size != world_size:
        raise DistributedError(
            f"the plan needs {plan.world_size} ranks, the world has {world_size}"
        )
    if job.checkpoint is None:
        raise DistributedError(
            "run_rank needs a job with a weight checkpoint (checkpoint.rank_job); "
            "ranks do not use the full weights of the job"
        )
    ties = job.ties if job.ties is not None else tied_params(job.graph, plan)
    init_plan_groups(plan, tie_rank_groups(ties, plan))
    program = rank_program(job, rank)
    load_program_weights(program, job.checkpoint)
    device = rank_device(spec.device, rank)
    ex = RankExecutor(
        program,
        plan,
        training=spec.training,
        optim=spec.optim,
        loss=spec.loss,
        device=device,
        ties=ties,
        own_tensors=True,
    )
    outputs, losses, seconds = None, [], []
    if spec.training:
        for _ in range(spec.steps):
            t0 = time.perf_counter()
            losses.append(ex.train_step(job.inputs, job.labels))
            seconds.append(time.perf_counter() - t0)
    else:
        t0 = time.perf_counter()
        outputs = ex.infer(job.inputs)
        seconds.append(time.perf_counter() - t0)
    pl = {v.name: tuple(ex.placements(v)) for v in program.graph.inputs if v.kind == "param"}
    specs = ex.param_specs()
    opt = ex.optimizer.state_numel() if ex.optimizer else 0
    if outputs is not None:
        outputs = [t.cpu() for t in outputs]
    return RankResult(
        rank,
        ex.stage,
        ex.coords,
        outputs,
        losses,
        {k: t.cpu() for k, t in ex.param_shards().items()},
        pl,
        specs,
        sum(t.numel() for t in ex.params.values()),
        opt,
        _storage_bytes([*ex.params.values(), *(program.graph.tensors[k] for k in ex.params)]),
        seconds,
    )


def rank_device(device: str, rank: int) -> str:
    """The torch device a rank computes on: its own GPU (LOCAL_RANK under torchrun)."""
    if device == "cpu":
        return "cpu"
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not torch.cuda.is_available() or local >= torch.cuda.device_count():
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise DistributedError(
            f"rank {rank}: device 'cuda' needs a GPU per rank on this host, and local rank "
            f"{local} has none ({have} visible); run with device 'cpu' (gloo) instead"
        )
    return f"cuda:{local}"


def check_devices(spec: RunSpec, world_size: int) -> None:
    """Fail before launching when the ranks of one host cannot each have a GPU."""
    if spec.device != "cuda":
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have < world_size:
        raise DistributedError(
            f"device 'cuda' runs one rank per GPU: {world_size} ranks need {world_size} GPUs, "
            f"this host has {have}; use device 'cpu' (gloo) or a smaller mesh"
        )


def _storage_bytes(tensors) -> int:
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def run_distributed(job: Job, start_method: str | None = None) -> RunResult:
    """Launch the plan's ranks locally; reassemble outputs and parameters.

    The backend follows the spec's device: gloo for CPU tensors, NCCL with one GPU per rank
    (ranks are then spawned: CUDA cannot be forked).
    """
    from .launch import launch

    check_devices(job.spec, job.plan.world_size)
    if job.spec.device == "cuda":
        start_method = "spawn"
    with tempfile.TemporaryDirectory(prefix="meshweave-weights-") as tmp:
        results = launch(
            run_rank,
            job.plan.world_size,
            (rank_job(job, os.path.join(tmp, CHECKPOINT_NAME)),),
            job.spec.timeout_s,
            backend=job.spec.backend,
            start_method=start_method,
        )
    return collect(job, results)


def collect(job: Job, results: list[RankResult]) -> RunResult:
    """Full parameters (by fully qualified name) from every rank's shards and specs."""
    params = assemble_params(job.graph, job.plan, [(r.params, r.specs) for r in results])
    losses = [x for r in results if r.losses and r.losses[0] is not None for x in r.losses]
    last_losses = losses[: job.spec.steps] if job.spec.training else []
    return RunResult(results[0].outputs, last_losses, params, results)


def run_single_device(job: Job) -> RunResult:
    """The eager model on one device: outputs, or `steps` optimizer steps on the same loss."""
    from meshweave.models import get_model_spec

    spec = job.spec
    model = get_model_spec(spec.model, **_overrides(spec.model, spec.layers)).build(seed=0).eval()
    model.load_state_dict(job.model_state)
    if "quant" in job.graph.meta:  # what the quantized graph computes: the dequantized weights
        from ...passes.quant import dequantized_model

        model = dequantized_model(model, job.graph)
    return single_device(model, job.inputs, job.labels, training=spec.training,
                         steps=spec.steps, optim=spec.optim, loss=spec.loss)


def single_device(model, inputs, labels, *, training: bool, steps: int, optim: OptimConfig,
                  loss: str = "ce") -> RunResult:
    """`model` on one device (the oracle of a distributed run): its outputs, or `steps` steps
    of `optim` on the loss `loss` ("ce": cross-entropy of the first output on `labels`, "mean":
    its mean), with the losses and the updated parameters by fully qualified name."""
    if not training:
        with torch.no_grad():
            return RunResult(tensor_leaves(model(*inputs)), [], {})
    opt = optim.build([p for p in model.parameters()])
    losses = []
    for _ in range(steps):
        out = tensor_leaves(model(*inputs))[0]
        value = step_loss(out, labels, loss)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(float(value.detach()))
    params = {k: v.detach().clone() for k, v in model.named_parameters(remove_duplicate=False)}
    return RunResult(None, losses, params)


def step_loss(out: torch.Tensor, labels: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """A training run's loss of the model's first output (executor.py documents "ce")."""
    if loss == "ce":
        return torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]),
                                                 labels.reshape(-1))
    return out.float().mean()


def tensor_leaves(out) -> list[torch.Tensor]:
    """Model outputs as the IR's flat output list (HF ModelOutputs are pytrees)."""
    import torch.utils._pytree as pytree

    return [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]


def compare(ref: RunResult, got: RunResult) -> dict[str, Any]:
    """Max absolute errors: 'outputs', 'loss' (over every step), 'params' (and the worst
    parameter's name, 'worst_param').

    Outputs are compared by position, losses by step and parameters by name, all by count: a
    missing or extra output, step or parameter raises DistributedError naming it. Parameters
    are compared when the reference trained them (an inference reference records none).
    """
    errs: dict[str, Any] = {}
    try:
        if ref.outputs is not None:
            if got.outputs is None:
                raise DistributedError("the distributed run returned no outputs")
            errs["outputs"] = max(max_errors(ref.outputs, got.outputs).values())
        if ref.losses or got.losses:
            by_step = max_errors(
                {f"step {i + 1}": x for i, x in enumerate(ref.losses)},
                {f"step {i + 1}": x for i, x in enumerate(got.losses)},
                what="loss",
            )
            errs["loss"] = max(by_step.values())
        if ref.params:  # training: the reference's updated parameters (inference records none)
            per = max_errors(ref.params, got.params, what="parameter")
            errs["worst_param"], errs["params"] = worst(per)
    except ComparisonError as e:
        raise DistributedError(f"the distributed run does not match one device: {e}") from None
    return errs
