"""Lowering: a planned graph becomes the program of one rank (`rank.lower_for_rank`).

The result is an ordinary IR Graph, valid for ONE micro-batch of batch / plan.micro_batches
samples (the runtime runs it once per micro-batch; `meta["micro_batch_dim"]` names the dim of
each user input the runtime splits), containing:

  * only the nodes of the rank's pipeline stage;
  * its graph inputs with LOCAL types: user inputs and parameters sliced as planned.
    `meta["shard_specs"][name]` says how to cut the full tensor (the micro-batch for user
    inputs, `graph.tensors[name]` for parameters/buffers/constants) into this rank's piece:
    a list of `(dim, index, count)` (take chunk index of count along dim; applied in order,
    mesh axis 0 first), `(dim, index, count, blocks)` (that chunk of each block of the given
    sizes: fused QKV weights) or `("rebatch", dim, size)` (a constant that repeats along the
    batch: keep `size` rows). `shard_tensor(full, spec)` applies it; the lowered graph's
    `tensors` already hold the shards of the input graph's tensors;
  * local shapes everywhere: view/reshape/expand/fill sizes and split sizes are rewritten to
    the local shapes (heads / tp, batch / dp / micro-batches, ...);
  * the collectives the plan's placements imply, as `dist.*` nodes (ir/ops/collectives.py)
    with kwargs axis (mesh axis name) and group (global ranks of this rank's group);
  * stage transfers: values another stage needs are `dist.send(dst=, tag=)` at the end,
    values this stage reads from an earlier one are `dist.recv(src=, tag=, shape=, dtype=)`
    at the start (tags number the transfers the same way on every rank). Between stage meshes
    of the same shape a rank exchanges its piece with the rank at the same mesh coordinates;
    between meshes of different shapes (Plan.stage_mesh) each side sends or receives the
    pieces of cross_mesh.transfer_schedule (aten.slice before the sends, aten.cat after the
    receives). Graph outputs live on the last stage, gathered to full (replicated)
    tensors; other stages return nothing.

Per-op rewrites that are more than shape changes (row-parallel bias on one rank only,
vocab-parallel embedding masking, mean over a sharded dim) live in rules.py.

  setup.py       what every rank shares: placements, stages, transfers, blocked layouts
  rank.py        lower_for_rank() and the RankLowering engine behind it
  rules.py       per-op rewrites (LOWERING_RULES), beyond shape changes
  cross_mesh.py  the pieces a value moves in between stage meshes of different shapes
  simulate.py    simulate_plan(): every rank's program in one process (the test oracle)

May import: meshweave.ir, runtime.reference (simulate), ../plan.py and ../strategies/.
"""
