"""The plan report: one self-contained HTML file showing what the parallel planner decided.

    from meshweave.report import write_report
    write_report("plan.html", plan, graph, capacity_bytes=80 * 2**30)

Sections (stable element ids, for people and for tests):
  #summary         model, devices, stages, micro-batches, schedule, step time
  #mesh            the device mesh as SVG: which ranks form which pipeline stage
  #sharding-table  per layer: each weight-consuming op, its weight, shape and placement per axis
  #timeline        the pipeline schedule, micro-batches per stage over time (GPipe and 1F1B,
                   switchable), simulated from the plan's stage times
  #memory          per-device memory bars against the device capacity
  #step-time       step time split into compute, communication and bubble

No server and no network: CSS, SVG and JS are inline, and the numbers travel as one JSON block
(`<script type="application/json" id="report-data">`) that the inline JS draws the charts from.
Schedules and all numbers are computed here in Python (`report_data`), so tests check them
without a browser; the browser only draws.
"""

from __future__ import annotations

import html
import json
import math
import os
import re
from typing import Any

from meshweave.ir.graph import Graph
from meshweave.report.assets import CSS, JS

SECTION_IDS = ("summary", "mesh", "sharding-table", "timeline", "memory", "step-time")
BACKWARD_FACTOR = 2.0  # backward ~ 2x forward FLOPs: F takes 1/3, B 2/3 of a training stage time
_LAYER = re.compile(r"(?:^|[._])(\d+)(?:[._]|$)")
_STAGE_COLORS = (
    "#4e79a7",
    "#f28e2b",
    "#59a14f",
    "#e15759",
    "#76b7b2",
    "#edc948",
    "#b07aa1",
    "#ff9da7",
)


# --------------------------------------------------------------------------------- schedules
def pipeline_schedule(
    stage_times: list[float], micro_batches: int, schedule: str, training: bool
) -> list[dict]:
    """Simulate a pipeline: one op per (stage, micro-batch, F/B) with start and end seconds.

    `stage_times[s]` is stage s's time per micro-batch (forward + backward when training).
    Each stage runs its ops in the schedule's order (GPipe: all forwards, then all backwards;
    1F1B: min(S - s - 1, B) warm-up forwards, then one forward / one backward), an op starting
    when its stage is free and its input has arrived (F from stage s - 1, B from stage s + 1).
    """
    n_stages, b = len(stage_times), micro_batches
    f_share = 1.0 / (1.0 + BACKWARD_FACTOR) if training else 1.0
    orders = []
    for s in range(n_stages):
        fwd = [("F", m) for m in range(b)]
        bwd = [("B", m) for m in range(b)] if training else []
        if schedule == "1f1b" and training:
            warm = min(n_stages - s - 1, b)
            order = fwd[:warm]
            for i in range(b - warm):
                order += [fwd[warm + i], bwd[i]]
            order += bwd[b - warm :]
        else:
            order = fwd + bwd
        orders.append(order)
    end: dict[tuple[str, int, int], float] = {}
    free = [0.0] * n_stages
    pos = [0] * n_stages
    ops: list[dict] = []
    while any(pos[s] < len(orders[s]) for s in range(n_stages)):
        progressed = False
        for s in range(n_stages):
            while pos[s] < len(orders[s]):
                kind, m = orders[s][pos[s]]
                dep = (
                    (("F", s - 1, m) if s > 0 else None)
                    if kind == "F"
                    else (("B", s + 1, m) if s < n_stages - 1 else ("F", s, m))
                )
                if dep is not None and dep not in end:
                    break
                dur = stage_times[s] * (f_share if kind == "F" else 1.0 - f_share)
                start = max(free[s], end.get(dep, 0.0) if dep else 0.0)
                end[(kind, s, m)] = free[s] = start + dur
                ops.append({"stage": s, "mb": m, "kind": kind, "start": start, "end": start + dur})
                pos[s] += 1
                progressed = True
        if not progressed:  # cannot happen for the orders above; guards against edits
            raise RuntimeError(f"pipeline_schedule: {schedule} order deadlocks")
    return ops


def _peak_inflight(ops: list[dict], n_stages: int) -> list[int]:
    """Per stage: the most micro-batches whose activations are held (forward done, not B)."""
    peak = [0] * n_stages
    for s in range(n_stages):
        live = 0
        for op in sorted((o for o in ops if o["stage"] == s), key=lambda o: o["start"]):
            live += 1 if op["kind"] == "F" else -1
            peak[s] = max(peak[s], live)
    return peak


# --------------------------------------------------------------------------------- plan data
def _stage_ranks(plan) -> list[list[int]]:
    size = plan.mesh.size
    out = []
    for s in range(plan.num_stages):
        st = plan.stages[s] if s < len(plan.stages) else None
        out.append(
            list(st.ranks) if st is not None and st.ranks else list(range(s * size, (s + 1) * size))
        )
    return out


def _node_stage(plan) -> dict[str, int]:
    return {name: st.index for st in plan.stages for name in st.nodes}


def _stage_times(plan, graph: Graph | None) -> tuple[list[float], str]:
    """Per-stage time per micro-batch, and where it came from."""
    n = plan.num_stages
    given = plan.search.get("stage_times") if isinstance(plan.search, dict) else None
    if given and len(given) == n:
        return [float(t) for t in given], "the plan's stage times"
    # The estimate's compute and communication are the bottleneck stage's busy time over the
    # step (B micro-batches); the other stages are scaled by their share of the FLOPs.
    busy = sum(_finite(plan.estimate.get(k)) for k in ("compute", "comm"))
    per_mb = busy / max(plan.micro_batches, 1) if busy > 0 else 1.0
    what = "the plan's compute + communication estimate" if busy > 0 else "no estimate (unit)"
    flops = _stage_flops(plan, graph) if graph is not None and n > 1 else None
    if flops and sum(flops) > 0:
        top = max(flops)
        return [per_mb * f / top for f in flops], f"{what}, stages scaled by FLOPs"
    return [per_mb] * n, f"{what}, stages assumed equal"


def _finite(x) -> float:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return 0.0
    return x if math.isfinite(x) else 0.0


def _stage_flops(plan, graph: Graph) -> list[float] | None:
    from meshweave.ir.graph import map_values
    from meshweave.ir.registry import lookup

    where = _node_stage(plan)
    flops = [0.0] * plan.num_stages
    hints = graph.hints()
    for n in graph.nodes:
        info = lookup(n.op)
        s = where.get(n.outputs[0].name) if n.outputs else None
        if info is None or info.flops is None or s is None:
            continue
        try:
            f = info.flops(
                map_values(n.args, lambda v: v.type),
                map_values(n.kwargs, lambda v: v.type),
                [o.type for o in n.outputs],
            )
            flops[s] += float(f.subs(hints) if hasattr(f, "subs") else f)
        except (AttributeError, TypeError, IndexError, ValueError):
            continue
    return flops


def _sharding_rows(plan, graph: Graph | None) -> list[dict]:
    """One row per (weight-consuming node, weight), grouped by layer; or the plan's values."""
    axes = list(plan.mesh.names)
    rows = []
    if graph is None:
        for value, texts in sorted(plan.placements.items()):
            rows.append(
                {
                    "layer": _layer_of(value),
                    "op": "",
                    "value": value,
                    "weight": "",
                    "shape": "",
                    "placements": list(texts),
                    "stage": "",
                }
            )
        return rows
    where = _node_stage(plan)
    for n in graph.nodes:
        weights = [v for v in n.inputs if v.kind in ("param", "buffer")]
        for w in weights:
            t = w.type
            rows.append(
                {
                    "layer": _layer_of(w.target or w.name),
                    "op": n.op,
                    "value": n.outputs[0].name if n.outputs else "",
                    "weight": w.target or w.name,
                    "shape": "x".join(str(d) for d in getattr(t, "shape", ())),
                    "placements": [str(p) for p in plan.placement_of(w.name)],
                    "out_placements": [str(p) for p in plan.placement_of(n.outputs[0].name)]
                    if n.outputs
                    else ["R"] * len(axes),
                    "stage": where.get(n.outputs[0].name, 0 if plan.num_stages == 1 else "?"),
                }
            )
    rows.sort(key=lambda r: (r["layer"] == "", _natural(r["layer"])))
    return rows


def _layer_of(name: str) -> str:
    m = _LAYER.search(name)
    return m.group(1) if m else ""


def _natural(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text))


def _memory_bars(plan, capacity: float | None) -> list[dict]:
    """Bytes per device. Keys of plan.memory name a rank, or a stage ('stage1' / a stage
    index when there is one entry per stage); a stage's figure applies to each of its ranks."""
    ranks = _stage_ranks(plan)
    mem = {str(k): float(v) for k, v in (plan.memory or {}).items()}
    per_rank: dict[int, float] = {}
    world = plan.world_size
    for key, val in mem.items():
        m = re.fullmatch(r"(?:stage[_ ]?)(\d+)", key)
        if m is not None or (key.isdigit() and len(mem) == plan.num_stages and world > len(mem)):
            s = int(m.group(1) if m else key)
            for r in ranks[s] if s < len(ranks) else []:
                per_rank[r] = max(per_rank.get(r, 0.0), val)
        elif re.fullmatch(r"(?:rank[_ ]?)?\d+", key):
            per_rank[int(re.sub(r"\D", "", key))] = val
    if not per_rank and mem:  # unknown keys: show the peak on every device
        peak = max(mem.values())
        per_rank = {r: peak for r in range(world)}
    stage_of = {r: s for s, rs in enumerate(ranks) for r in rs}
    return [
        {
            "rank": r,
            "stage": stage_of.get(r, 0),
            "bytes": b,
            "over": bool(capacity and b > capacity),
        }
        for r, b in sorted(per_rank.items())
    ]


def _step_time(plan, times: list[float], ops: list[dict]) -> dict:
    est = {k: _finite(plan.estimate.get(k)) for k in ("compute", "comm", "bubble", "total")}
    if est["total"] > 0 or est["compute"] > 0:
        parts = est["compute"] + est["comm"] + est["bubble"]
        note = "" if est["total"] > 0 else " (its total was not finite: the sum of the parts)"
        return {**est, "total": est["total"] or parts, "source": "plan estimate" + note}
    total = max((o["end"] for o in ops), default=0.0)
    busy = plan.micro_batches * max(times, default=0.0)
    return {
        "compute": busy,
        "comm": 0.0,
        "bubble": total - busy,
        "total": total,
        "source": "simulated schedule (the plan has no estimate)",
    }


def _capacity(plan, capacity_bytes: float | None) -> float | None:
    if capacity_bytes:
        return float(capacity_bytes)
    search = plan.search if isinstance(plan.search, dict) else {}
    for key in ("memory_capacity", "capacity_bytes", "memory_budget"):
        if search.get(key):
            return float(search[key])
    hw = search.get("hardware") or search.get("spec")
    if isinstance(hw, str):
        try:
            from meshweave.passes.parallel.cost.hardware import get_spec

            return float(get_spec(hw).memory_bytes)
        except (ImportError, KeyError, ValueError, FileNotFoundError):
            return None
    return None


def report_data(
    plan,
    graph: Graph | None = None,
    *,
    capacity_bytes: float | None = None,
    title: str | None = None,
) -> dict:
    """Everything the report shows, as JSON-able data (what the page's JS draws from)."""
    times, times_source = _stage_times(plan, graph)
    schedules = {
        s: pipeline_schedule(times, plan.micro_batches, s, plan.training) for s in ("gpipe", "1f1b")
    }
    capacity = _capacity(plan, capacity_bytes)
    mesh = plan.mesh
    search = plan.search if isinstance(plan.search, dict) else {}
    return {
        "title": title or f"meshweave plan: {search.get('model', getattr(graph, 'name', 'model'))}",
        "mesh": {"shape": list(mesh.shape), "axes": list(mesh.names)},
        "world_size": plan.world_size,
        "num_stages": plan.num_stages,
        "stage_ranks": _stage_ranks(plan),
        "stage_meshes": [list(plan.stage_mesh(i).shape) for i in range(max(plan.num_stages, 1))],
        "stage_layers": [list(st.layers) if st.layers else None for st in plan.stages],
        "micro_batches": plan.micro_batches,
        "schedule": plan.schedule if plan.schedule in schedules else "gpipe",
        "training": plan.training,
        "zero": plan.zero,
        "stage_times": times,
        "stage_times_source": times_source,
        "schedules": schedules,
        "schedule_latency": {
            k: max((o["end"] for o in v), default=0.0) for k, v in schedules.items()
        },
        "peak_inflight": {k: _peak_inflight(v, plan.num_stages) for k, v in schedules.items()},
        "memory": _memory_bars(plan, capacity),
        "capacity": capacity,
        "step_time": _step_time(
            plan, times, schedules[plan.schedule if plan.schedule in schedules else "gpipe"]
        ),
        "sharding": _sharding_rows(plan, graph),
        "collectives": [
            {"kind": c.kind, "value": c.value, "axis": c.axis, "bytes": c.nbytes, "count": c.count}
            for c in plan.collectives
        ],
    }


# --------------------------------------------------------------------------------- HTML
def render_report(plan, graph: Graph | None = None, **kw: Any) -> str:
    """The report as one HTML string (see the module docstring)."""
    data = report_data(plan, graph, **kw)
    esc = html.escape
    payload = json.dumps(_json_safe(data), separators=(",", ":"), allow_nan=False)
    payload = payload.replace("</", "<\\/")  # keep "</script>" out of the script element
    st = data["step_time"]
    summary = (
        f"<li>{data['world_size']} devices = {data['num_stages']} pipeline stage(s) x mesh "
        f"{_mesh_text(data)}</li>"
        f"<li>{data['micro_batches']} micro-batch(es), schedule {esc(data['schedule'])}, "
        f"{'training' if data['training'] else 'inference'}"
        f"{', ZeRO-1' if data['zero'] else ''}</li>"
        f"<li>step time {_seconds(st['total'])} (compute {_seconds(st['compute'])}, "
        f"communication {_seconds(st['comm'])}, bubble {_seconds(st['bubble'])})</li>"
    )
    timeline = (
        '<div class="controls">schedule: '
        '<button type="button" id="sched-gpipe" data-schedule="gpipe">GPipe</button> '
        '<button type="button" id="sched-1f1b" data-schedule="1f1b">1F1B</button> '
        '<span id="timeline-caption"></span></div>'
        f'<p class="note">stage times from {esc(data["stage_times_source"])}; forward '
        f"{'1/3, backward 2/3 of each' if data['training'] else 'only'}.</p>"
        '<div id="timeline-chart" class="chart"></div>'
    )
    body = [
        f"<h1>{esc(data['title'])}</h1>",
        f'<section id="summary"><h2>Summary</h2><ul>{summary}</ul></section>',
        f'<section id="mesh"><h2>Devices and stages</h2>{_mesh_svg(data)}{_stage_list(data)}</section>',
        f'<section id="sharding"><h2>Sharding per layer</h2>{_sharding_table(data)}</section>',
        f'<section id="timeline"><h2>Pipeline schedule</h2>{timeline}</section>',
        _MEMORY_SECTION,
        f'<section id="step-time"><h2>Step time</h2>{_STEP_CHART}<p class="note">source: {esc(st["source"])}</p></section>',
        _NOSCRIPT,
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{esc(data['title'])}</title><style>{CSS}</style></head><body>\n"
        + "\n".join(body)
        + f'\n<script type="application/json" id="report-data">{payload}</script>\n'
        + f"<script>{JS}</script>\n</body></html>\n"
    )


_MEMORY_SECTION = (
    '<section id="memory"><h2>Memory per device</h2>'
    '<div id="memory-chart" class="chart"></div></section>'
)
_STEP_CHART = '<div id="step-time-chart" class="chart"></div>'
_NOSCRIPT = (
    "<noscript><p>The charts need JavaScript; the numbers are in the report-data block."
    "</p></noscript>"
)


def write_report(path: str, plan, graph: Graph | None = None, **kw: Any) -> str:
    """Write the report to `path`; returns the path."""
    text = render_report(plan, graph, **kw)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def _json_safe(x: Any) -> Any:
    """NaN and infinities become null: JSON.parse rejects them."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _mesh_text(data: dict) -> str:
    return " x ".join(f"{a}={s}" for a, s in zip(data["mesh"]["axes"], data["mesh"]["shape"]))


def _seconds(t: float) -> str:
    if t <= 0:
        return "0 s"
    if t < 1e-3:
        return f"{t * 1e6:.1f} us"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.3f} s"


def _mesh_svg(data: dict) -> str:
    """Stages side by side; within a stage, devices on a grid of that stage's mesh shape
    (stages may have meshes of different shapes: Plan.stage_mesh)."""
    cell, gap, pad = 46, 6, 14
    axes = data["mesh"]["axes"]
    meshes = data["stage_meshes"]
    grids = [(sh[0] if len(sh) > 1 else 1, math.prod(sh[1:]) if len(sh) > 1 else sh[0])
             for sh in meshes]
    stage_h = max(r for r, _ in grids) * (cell + gap) - gap + 2 * pad + 18
    parts, x0 = [], 0
    for s, ranks in enumerate(data["stage_ranks"]):
        shape, (_, cols) = meshes[s], grids[s]
        stage_w = max(cols * (cell + gap) - gap + 2 * pad, 70)
        color = _STAGE_COLORS[s % len(_STAGE_COLORS)]
        parts.append(
            f'<g class="stage" id="stage-{s}"><rect x="{x0}" y="0" width="{stage_w}" '
            f'height="{stage_h}" rx="8" fill="none" stroke="{color}" stroke-width="2"/>'
            f'<text x="{x0 + pad}" y="14" class="label">stage {s}</text>'
        )
        for i, r in enumerate(ranks):
            row, col = divmod(i, cols)
            x, y = x0 + pad + col * (cell + gap), 22 + pad + row * (cell + gap) - 4
            coords = _coords(i, shape)
            tip = f"rank {r}, stage {s}, " + ", ".join(f"{a}={c}" for a, c in zip(axes, coords))
            parts.append(
                f'<g class="device" id="rank-{r}" data-stage="{s}"><rect x="{x}" '
                f'y="{y}" width="{cell}" height="{cell}" rx="5" fill="{color}" '
                f'fill-opacity="0.85"><title>{html.escape(tip)}</title></rect>'
                f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" '
                f'text-anchor="middle" class="rank">r{r}</text></g>'
            )
        parts.append("</g>")
        x0 += stage_w + 16
    return (
        f'<svg width="{x0}" height="{stage_h + 2}" '
        f'role="img" aria-label="device mesh">{"".join(parts)}</svg>'
    )


def _coords(i: int, shape: list[int]) -> list[int]:
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return list(reversed(out))


def _stage_list(data: dict) -> str:
    items = []
    for s, ranks in enumerate(data["stage_ranks"]):
        layers = data["stage_layers"][s] if s < len(data["stage_layers"]) else None
        lay = f", layers [{layers[0]}, {layers[1]})" if layers else ""
        items.append(
            f"<li>stage {s}: ranks {ranks}{lay}, "
            f"{_seconds(data['stage_times'][s])} per micro-batch</li>"
        )
    return f'<ul class="stages">{"".join(items)}</ul>'


def _sharding_table(data: dict) -> str:
    axes = data["mesh"]["axes"]
    esc = html.escape
    head = (
        "<tr><th>layer</th><th>op</th><th>weight</th><th>shape</th>"
        + "".join(f"<th>weight on {esc(a)}</th>" for a in axes)
        + "".join(f"<th>output on {esc(a)}</th>" for a in axes)
        + "<th>stage</th></tr>"
    )
    rows = []
    for r in data["sharding"]:
        outs = r.get("out_placements", [""] * len(axes))
        cells = [
            r["layer"] or "-",
            r["op"] or r["value"],
            r["weight"],
            r["shape"],
            *r["placements"],
            *outs,
            r["stage"],
        ]
        cls = ' class="sharded"' if any(p != "R" for p in r["placements"]) else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{esc(str(c))}</td>" for c in cells) + "</tr>")
    if not rows:
        rows.append(
            f'<tr><td colspan="{5 + 2 * len(axes)}">no weights (everything replicated)</td></tr>'
        )
    return (
        f'<table id="sharding-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody>'
        '</table><p class="note">R replicated, S(d) sharded on dim d, P partial sum.</p>'
    )
