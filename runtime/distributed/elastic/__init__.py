"""Elastic expert-parallel MoE inference: a running job on N local ranks re-scales to M ranks, up
or down, while it keeps answering requests (issue 16 item 5, after ElasticMoE).

    from meshweave.runtime.distributed.elastic.server import ElasticServer, ScaleError
    from meshweave.runtime.distributed.elastic.weights import moe_config, reference_model
    server = ElasticServer(moe_config("moe-tiny"), checkpoint_path)
    server.start(2)
    logits, gen = server.request(tokens)      # [B, S] -> [B, S, vocab]
    report = server.scale(4)                  # live; report.moves, .experts_sent, timings
    server.stop()

Modules:
  placement.py  the planner: expert -> rank (balanced blocks), re-planned with fewest moves
  exchange.py   EP dispatch/combine: counts, then rows, by all_to_all_single; local experts via
                ir/ops/moe.py's sort_by_expert and expert_mlp
  weights.py    the served configs (moe-tiny; moe-large), the checkpoint, a rank's model
                (dense weights replicated, its experts only, StackedExperts -> EPExperts)
  worker.py     a rank's process: serve, prepare a new generation in a thread, switch
  inbox.py      the server's reply queue, filed by one thread
  server.py     the front end: start, request, scale (spawn, re-plan, move, switch, roll back)
  driver.py     the client: streams requests, checks them against the eager model, summaries

Design. The server process hosts one TCPStore; every generation's gloo groups rendezvous on it
under the prefix "g<gen>/" (a raw ProcessGroupGloo over a PrefixStore: no global default group,
so groups of several generations coexist in one process). Ranks keep their number across a
re-scaling, joiners take the next numbers and leavers are the highest, so a move is (expert, old
owner, new owner). A rank runs the dense part (attention, router, shared expert) on its slice of
the request's sequences and the MoE layers over the group: dense weights are replicated,
experts partitioned. Re-scaling N -> M: the joiners start and load only the dense weights from
the checkpoint (mmap: the experts' pages are never read); then every rank of old and new mesh,
in a background thread while the old generation keeps serving, connects the new groups (a
union group as well when scaling down, so that leavers can send) and posts the sends and
receives of the moved experts, peer to peer; ranks that stay keep their tensors. When all are
ready the server switches between two requests; a rank installs the new placement on the
first request of the new generation and drops the old group and the experts it gave away.

Failure. Nothing waits unbounded: group rendezvous and collectives have short timeouts, and the
server watches every rank's process while it waits. A rank that dies or fails while re-scaling
makes `scale` kill the joiners, tell the old ranks to drop the new generation, and raise
ScaleError naming the rank: the old mesh keeps serving (or, if the dead rank was one of its
own, the error says that its requests will fail). A mesh larger than the expert count raises
placement.PlacementError before anything starts.

Outputs match the single-device eager model (models/moe.py's dense dispatch) to fp32 rounding
(driver.check: allclose rtol 1e-5, atol 1e-6). benchmarks/elastic_moe.py measures scale-up
latency against a stop-and-restart from the checkpoint.
"""
