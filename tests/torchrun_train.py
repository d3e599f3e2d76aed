"""A user's training script under torchrun, with the Python API only (tests/test_compile_ranks.py).

    torchrun --standalone --nproc-per-node 4 tests/torchrun_train.py dp=2,tp=2 [--micro-batches 2]
    torchrun --standalone --nproc-per-node 2 tests/torchrun_train.py dp=2 --zero

Every rank builds the same seeded model, compiles it with mesh=, trains two AdamW steps on
cm.parameters() with a cross-entropy computed outside on the full outputs, and compares the
losses and cm.state_dict() with the same two steps on one device. Rank 0 prints the errors and
the script exits 1 on a mismatch. With --zero the optimizer is cm.zero_optimizer(AdamW):
its state is sharded over the dp ranks, and the steps still match one device's AdamW.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import meshweave
from meshweave.models import build_model
from meshweave.runtime.compare import max_errors

TOL = 1e-5  # losses
PARAM_TOL = 3e-5  # AdamW (lr 1e-3) steps magnify reassociation error of tiny gradients


def loss_of(logits, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(logits, _LossOut):  # the compiled module computed the loss itself
        return logits.loss
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


class _LossOut:
    def __init__(self, loss):
        self.loss = loss


class WithLoss(torch.nn.Module):
    """The model and its cross-entropy in one module (--loss-in-model): the vocab-parallel
    cross-entropy path, where the logits are never gathered."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, labels):
        return loss_of(self.model(tokens), labels)


def train(fn, opt, tokens, labels, steps: int, accumulate: bool) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        if accumulate:  # two half-weighted backward() calls on the same batch
            for _ in range(2):
                (loss_of(fn(tokens), labels) * 0.5).backward()
            loss = loss_of(fn(tokens), labels).detach()
        else:
            loss = loss_of(fn(tokens), labels)
            loss.backward()
        opt.step()
        losses.append(float(loss))
    return losses


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("mesh")
    ap.add_argument("--model", default="gpt-tiny")
    ap.add_argument("--micro-batches", type=int, default=1)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--accumulate", action="store_true")
    ap.add_argument("--zero", action="store_true")
    ap.add_argument("--loss-in-model", action="store_true")
    ap.add_argument("--per-rank-batch", dest="local", action="store_true",
                    help="local_batch=True: each rank feeds its own slice of the batch (DDP)")
    args = ap.parse_args()
    dist.init_process_group("gloo")
    model, (tokens,) = build_model(args.model, batch=4, seq=8)
    reference = copy.deepcopy(model)
    labels = torch.roll(tokens, -1, dims=1)
    options = meshweave.CompileOptions(mesh=meshweave.DeviceMesh.parse(args.mesh), training=True,
                                       micro_batches=args.micro_batches,
                                       local_batch=args.local)
    fn, feed, want_labels = None, tokens, labels
    if args.local:  # this rank's slice of the global batch, as a DistributedSampler gives it
        dp = options.mesh.axis_size("dp")
        cm = meshweave.compile(model, (tokens[: tokens.shape[0] // dp],), options=options)
        index, size = cm.data_parallel_rank()
        rows = slice(index * tokens.shape[0] // size, (index + 1) * tokens.shape[0] // size)
        feed, want_labels = tokens[rows], labels[rows]

        def fn(x):
            return cm(x)
    elif args.loss_in_model:
        cm = meshweave.compile(WithLoss(model), (tokens, labels), options=options)

        def fn(x):
            return _LossOut(cm(x, labels))
    else:
        cm = meshweave.compile(model, (tokens,), options=options)
    if args.zero:
        opt = cm.zero_optimizer(torch.optim.AdamW, lr=1e-3)
    else:
        opt = torch.optim.AdamW(cm.parameters(), lr=1e-3)
    got = train(fn or cm, opt, feed, want_labels, args.steps, args.accumulate)
    if args.local:  # each rank's loss is its slice's mean: their average is the global loss
        box = torch.tensor(got)
        dist.all_reduce(box)
        got = (box / dist.get_world_size()).tolist()
    local = opt.optim if args.zero else opt
    state_numel = sum(t.numel() for st in local.state.values() for t in st.values() if t.dim())
    state = cm.state_dict()
    if args.loss_in_model:  # keyed like WithLoss: model.<name>
        state = {k.removeprefix("model."): v for k, v in state.items()}
    want = train(reference, torch.optim.AdamW(reference.parameters(), lr=1e-3), tokens, labels,
                 args.steps, args.accumulate)
    ref_state = dict(reference.state_dict())
    param_err = max(max_errors({k: ref_state[k] for k in state}, state,
                               what="parameter").values())
    loss_err = max(abs(a - b) for a, b in zip(got, want))
    missing = sorted(set(dict(reference.named_parameters(remove_duplicate=False))) - set(state))
    if dist.get_rank() == 0:
        print(f"plan: {cm.plan.num_stages} stage(s) x {cm.plan.meshes_text()}, "
              f"{cm.plan.micro_batches} micro-batch(es)")
        print(f"rank 0 holds {sum(p.numel() for p in cm.parameters())} of "
              f"{sum(p.numel() for p in reference.parameters())} parameter elements, "
              f"optimizer state {state_numel} elements")
        bw = cm.backward_graph
        print(f"backward: {cm.backward_kind}; "
              f"{sum(n.op.startswith('dist.') for n in bw.nodes) if bw else 0} collectives in "
              f"the backward IR")
        print(f"losses {got} vs one device {want}")
        print(f"max |error| loss {loss_err:.3e}, parameters {param_err:.3e}; missing {missing}")
    dist.destroy_process_group()
    return 0 if loss_err <= TOL and param_err <= PARAM_TOL and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
