"""The offload report: one self-contained HTML file showing a hybrid generation plan.

    meshweave generate --model llama-tiny --batch 16 --memory-gib G --plan-out offload.json
    meshweave report --offload offload.json -o offload.html

Sections (stable element ids): #offload-summary (mode, the split, why), #offload-placement
(one cell per sequence: its cache on the GPU or the CPU), #offload-memory (device bytes:
weights, caches, workspace, against the cap; host bytes against the host's), and, when the
file holds a run's figures, #offload-run (dispatch modes, GPU and CPU busy fractions, the
scheduler's measured/predicted scales). Static HTML and inline SVG: no script, no network.
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

from meshweave.report.assets import CSS

SECTION_IDS = ("offload-summary", "offload-placement", "offload-memory")
_GPU, _CPU = "#4e79a7", "#f28e2b"


def load_offload(path: str) -> dict[str, Any]:
    """The {"offload": plan, "scheduler": ...} document `generate --plan-out` writes."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--offload {path}: cannot read an offload plan: {e}") from None
    plan = doc.get("offload") if isinstance(doc, dict) else None
    needed = ("mode", "batch", "gpu_rows", "cpu_rows", "memory")
    if not isinstance(plan, dict) or any(k not in plan for k in needed):
        raise ValueError(f"--offload {path}: expected {{'offload': {{{', '.join(needed)}, ...}}}}"
                         f" as `meshweave generate --plan-out` writes")
    return doc


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _placement_svg(plan: dict) -> str:
    cpu = set(plan["cpu_rows"])
    cells, per_row = [], 16
    for b in range(plan["batch"]):
        x, y = 4 + (b % per_row) * 30, 4 + (b // per_row) * 30
        color, side = (_CPU, "CPU") if b in cpu else (_GPU, "GPU")
        cells.append(f'<rect x="{x}" y="{y}" width="26" height="26" fill="{color}" '
                     f'data-sequence="{b}" data-side="{side}"><title>sequence {b}: cache on '
                     f'the {side}</title></rect><text x="{x + 13}" y="{y + 17}" '
                     f'text-anchor="middle" font-size="10" fill="#fff">{b}</text>')
    rows = -(-plan["batch"] // per_row)
    return (f'<svg width="{8 + 30 * min(per_row, plan["batch"])}" height="{8 + 30 * rows}" '
            f'role="img">{"".join(cells)}</svg>'
            f'<p class="note"><span style="color:{_GPU}">&#9632;</span> cache on the GPU '
            f'<span style="color:{_CPU}">&#9632;</span> cache and decode attention on the '
            f'CPU</p>')


def _bar(label: str, parts: list[tuple[str, float, str]], total: float) -> str:
    width = 480
    x, rects = 0.0, []
    for name, n, color in parts:
        w = width * n / total if total > 0 else 0
        rects.append(f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="18" fill="{color}">'
                     f'<title>{html.escape(name)}: {_mib(n)}</title></rect>')
        x += w
    legend = ", ".join(f"{html.escape(n)} {_mib(b)}" for n, b, _ in parts)
    return (f'<div class="bar"><b>{html.escape(label)}</b> of {_mib(total)}: {legend}<br>'
            f'<svg width="{width}" height="18"><rect width="{width}" height="18" fill="#eee"/>'
            f'{"".join(rects)}</svg></div>')


def render_offload_report(doc: dict[str, Any], title: str = "meshweave offload plan") -> str:
    plan, run = doc["offload"], doc.get("scheduler")
    m, esc = plan["memory"], html.escape
    n_dev = plan["round_size"] if plan["mode"] == "gpu-rounds" else len(plan["gpu_rows"])
    caches = n_dev * m["kv_per_sequence"]
    workspace = max(0.0, m["device_used"] - m["weights"] - caches)
    pred = plan.get("predicted") or {}
    summary = (f"<li>mode <b>{esc(plan['mode'])}</b>: {len(plan['cpu_rows'])} of "
               f"{plan['batch']} sequences keep their KV cache on the CPU</li>"
               f"<li>cache capacity {plan['capacity']} slots per sequence, "
               f"{_mib(m['kv_per_sequence'])} each</li><li>{esc(plan['reason'])}</li>")
    if pred:
        summary += "<li>predicted: " + ", ".join(
            f"{esc(k)} {v:.0f}" if isinstance(v, float) else f"{esc(k)} {esc(str(v))}"
            for k, v in pred.items()) + "</li>"
    memory = _bar("device", [("weights", m["weights"], "#59a14f"), ("KV caches", caches, _GPU),
                             ("step workspace", workspace, "#bab0ac")], m["limit"])
    if m.get("host_limit"):
        memory += _bar("host", [("offloaded KV caches", m["host_used"], _CPU)],
                       m["host_limit"])
    body = [f"<h1>{esc(title)}</h1>",
            f'<section id="offload-summary"><h2>Summary</h2><ul>{summary}</ul></section>',
            f'<section id="offload-placement"><h2>Placement per sequence</h2>'
            f'{_placement_svg(plan)}</section>',
            f'<section id="offload-memory"><h2>Memory</h2>{memory}</section>']
    if run:
        items = "".join(f"<li>{esc(k)}: {esc(json.dumps(v))}</li>" for k, v in run.items())
        body.append(f'<section id="offload-run"><h2>The run</h2><ul>{items}</ul></section>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{esc(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_offload_report(path: str, doc: dict[str, Any], **kw: Any) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_offload_report(doc, **kw))
    return path
