"""The plan report: schedule simulation, HTML structure, no network, and the DOM in Chromium."""

from __future__ import annotations

import html.parser
import itertools
import json
import re
import shutil
import subprocess

import pytest
from meshweave.ir.mesh import DeviceMesh
from meshweave.models import build_model
from meshweave.passes.parallel.plan import CollectiveRecord, Plan, StagePlan

import meshweave
from meshweave.report import SECTION_IDS, pipeline_schedule, render_report, report_data

_GRAPH = {}


def gpt_graph():
    if "g" not in _GRAPH:
        model, inputs = build_model("gpt-tiny")
        _GRAPH["g"] = meshweave.compile(model, inputs).graph
    return _GRAPH["g"]


def handmade_plan(graph, micro_batches=4, schedule="1f1b") -> Plan:
    """dp=2 x tp=2 stage meshes, 2 stages: what the planner's Plan looks like, by hand."""
    names = [n.outputs[0].name for n in graph.nodes]
    half = len(names) // 2
    qkv = next(v.name for v in graph.inputs if v.target == "blocks.0.attn.qkv.weight")
    return Plan(
        DeviceMesh((2, 2), ("dp", "tp")),
        num_stages=2,
        placements={qkv: ("R", "S(0)")},
        stages=[
            StagePlan(0, names[:half], [0, 1, 2, 3], layers=(0, 1)),
            StagePlan(1, names[half:], [4, 5, 6, 7], layers=(1, 2)),
        ],
        micro_batches=micro_batches,
        schedule=schedule,
        training=True,
        collectives=[CollectiveRecord("all_reduce", "linear_1", "tp", 4096, 4)],
        estimate={"compute": 0.010, "comm": 0.002, "bubble": 0.003, "total": 0.015},
        memory={"0": 3 * 2**30, "1": 90 * 2**30},
        search={"model": "gpt-tiny"},
    )


# --------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("times", [[1.0, 1.0, 1.0], [1.0, 3.0, 2.0], [2.0, 0.5]])
@pytest.mark.parametrize("b", [1, 4])
def test_forward_pipeline_latency_formula(times, b):
    ops = pipeline_schedule(times, b, "gpipe", training=False)
    assert len(ops) == len(times) * b
    latency = max(o["end"] for o in ops)
    assert latency == pytest.approx(sum(times) + (b - 1) * max(times))


def test_1f1b_holds_fewer_microbatches_than_gpipe():
    times, b = [3.0, 3.0, 3.0, 3.0], 8
    data = report_data(handmade_plan(gpt_graph(), micro_batches=b))  # 2 stages
    assert data["peak_inflight"]["gpipe"] == [b, b]
    assert data["peak_inflight"]["1f1b"] == [2, 1]
    for sched in ("gpipe", "1f1b"):
        ops = pipeline_schedule(times, b, sched, training=True)
        assert len(ops) == 2 * len(times) * b
        for s in range(len(times)):  # a stage never runs two ops at once
            mine = sorted((o for o in ops if o["stage"] == s), key=lambda o: o["start"])
            assert all(a["end"] <= c["start"] + 1e-12 for a, c in itertools.pairwise(mine))
        # uniform stages: both schedules take sum(t) + (B - 1) max(t)
        assert max(o["end"] for o in ops) == pytest.approx(sum(times) + (b - 1) * max(times))


def test_report_data_from_plan():
    g = gpt_graph()
    data = report_data(handmade_plan(g), g, capacity_bytes=80 * 2**30)
    assert data["world_size"] == 8 and data["stage_ranks"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    mem = {m["rank"]: m for m in data["memory"]}
    assert sorted(mem) == list(range(8))
    assert not mem[0]["over"] and mem[5]["over"]  # stage 1's 90 GiB exceeds 80 GiB
    sharded = [r for r in data["sharding"] if r["placements"] != ["R", "R"]]
    assert [r["weight"] for r in sharded] == ["blocks.0.attn.qkv.weight"]
    assert sharded[0]["layer"] == "0" and sharded[0]["placements"] == ["R", "S(0)"]
    assert data["step_time"]["total"] == pytest.approx(0.015)


# --------------------------------------------------------------------------------- HTML
class _Collect(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links, self.tags = set(), [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        for key in ("src", "href", "xlink:href", "action", "data"):
            if a.get(key):
                self.links.append(a[key])


def test_report_html_is_self_contained(tmp_path):
    g = gpt_graph()
    text = render_report(handmade_plan(g), g)
    p = _Collect()
    p.feed(text)
    for sid in SECTION_IDS:
        assert sid in p.ids, f"missing #{sid}"
    assert {
        "rank-0",
        "rank-7",
        "stage-0",
        "stage-1",
        "timeline-chart",
        "memory-chart",
        "step-time-chart",
        "report-data",
        "sched-gpipe",
        "sched-1f1b",
    } <= p.ids
    assert not [u for u in p.links if re.match(r"(?i)(https?:)?//", u)], p.links
    assert "http://" not in text and "https://" not in text  # no URL at all, not even xmlns
    assert "<link" not in text and "@import" not in text
    payload = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', text, re.DOTALL
    ).group(1)
    data = json.loads(payload)
    assert data["num_stages"] == 2 and len(data["schedules"]["1f1b"]) == 2 * 2 * 4


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def dump_dom(path, tmp_path) -> str:
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "headless Chromium is not installed (apt-get install -y chromium); the "
            "report's DOM after JS is not checked"
        )
    cmd = [
        exe,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chrome-profile'}",
        "--virtual-time-budget=2000",
        "--dump-dom",
        f"file://{path}",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_report_renders_in_headless_chromium(tmp_path):
    from meshweave.report import write_report

    g = gpt_graph()
    path = write_report(str(tmp_path / "plan.html"), handmade_plan(g), g, capacity_bytes=80 * 2**30)
    dom = dump_dom(path, tmp_path)
    assert 'data-rendered="1"' in dom, "the report's script did not finish"
    p = _Collect()
    p.feed(dom)
    for sid in (*SECTION_IDS, "mem-capacity", "step-compute", "step-comm", "step-bubble"):
        assert sid in p.ids, f"#{sid} missing after JS ran"
    assert len(re.findall(r'class="op op-F"', dom)) == 2 * 4  # stages x micro-batches
    assert len(re.findall(r'class="op op-B"', dom)) == 2 * 4
    assert len(re.findall(r'id="mem-rank-\d+"', dom)) == 8
    assert len(re.findall(r'class="mem-bar over"', dom)) == 4  # stage 1 over capacity
    assert "1F1B:" in dom  # the caption of the plan's schedule


def test_cli_report(tmp_path, capsys):
    pytest.importorskip(
        "meshweave.passes.parallel.search.megatron_grid", reason="megatron_plan is not in this build yet"
    )
    from meshweave.cli import main

    out = tmp_path / "plan.html"
    rc = main(
        ["report", "--model", "gpt-tiny", "--mesh", "dp=2,tp=2,pp=2", "-o", str(out), "--training"]
    )
    assert rc == 0, capsys.readouterr().err
    text = out.read_text()
    p = _Collect()
    p.feed(text)
    assert set(SECTION_IDS) <= p.ids and "rank-7" in p.ids
    assert "http://" not in text and "https://" not in text


def test_non_finite_estimates_stay_valid_json():
    g = gpt_graph()
    plan = handmade_plan(g)
    plan.estimate = {
        "compute": 1e-6,
        "comm": float("inf"),
        "bubble": float("nan"),
        "total": float("nan"),
    }
    text = render_report(plan, g)
    payload = re.search(r'id="report-data">(.*?)</script>', text, re.DOTALL).group(1)

    def reject(name):
        raise AssertionError(f"{name} in the report's JSON: JSON.parse would fail")

    data = json.loads(payload, parse_constant=reject)
    assert data["step_time"]["total"] == pytest.approx(1e-6)


def test_searched_plan_timeline_uses_the_plans_stage_times():
    import meshweave
    from meshweave.models import build_model
    from meshweave.passes.parallel.search.search import plan_parallel
    from meshweave.report import report_data

    model, inputs = build_model("gpt-tiny", batch=4, seq=16)
    graph = meshweave.compile(model, inputs).graph
    plan = plan_parallel(graph, 4, "h100", batch=4, training=True)
    data = report_data(plan, graph)
    assert data["stage_times_source"] == "the plan's stage times"
    assert data["stage_times"] == plan.search["stage_times"]
