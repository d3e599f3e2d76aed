"""The plan report's inline style and script (meshweave/report/ writes them into the page).

The script reads the `report-data` JSON block and draws the timeline (switchable between GPipe
and 1F1B), the memory bars and the step-time bar as SVG. Charts are built as SVG markup strings
and set with innerHTML, which the HTML parser puts in the SVG namespace, so the script needs no
namespace URI and the page holds no URL at all. When it is done it sets
`<body data-rendered="1">`, which the headless-browser test waits for.
"""

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#222;max-width:1100px}
h1{font-size:20px}h2{font-size:16px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ddd;padding:2px 6px}
th{background:#f4f4f4}tr.sharded td{background:#fff8e6}.note{color:#666;font-size:12px}
svg text{font:11px system-ui,sans-serif}svg text.rank{fill:#fff;font-weight:600}
svg text.label{fill:#333;font-weight:600}.chart{overflow-x:auto}
button[aria-pressed=true]{font-weight:700;background:#dde8f5}
.stages{font-size:12px;color:#444}
"""

JS = r"""
(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("report-data").textContent);
  function fmt(t) {
    if (t <= 0) return "0 s";
    if (t < 1e-3) return (t * 1e6).toFixed(1) + " us";
    if (t < 1) return (t * 1e3).toFixed(2) + " ms";
    return t.toFixed(3) + " s";
  }
  function bytes(b) {
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
    return b.toFixed(i ? 2 : 0) + " " + u[i];
  }
  function esc(s) { return String(s).replace(/&/g, "&amp;").replace(/</g, "&lt;"); }
  function rect(x, y, w, h, fill, cls, id, tip) {
    return '<rect x="' + x + '" y="' + y + '" width="' + w + '" height="' + h + '" fill="' +
      fill + '"' + (cls ? ' class="' + cls + '"' : "") + (id ? ' id="' + id + '"' : "") +
      ">" + (tip ? "<title>" + esc(tip) + "</title>" : "") + "</rect>";
  }
  function text(x, y, s, extra) {
    return '<text x="' + x + '" y="' + y + '"' + (extra || "") + ">" + esc(s) + "</text>";
  }
  function drawTimeline(name) {
    var ops = data.schedules[name], S = data.num_stages, total = data.schedule_latency[name] || 1;
    var W = 960, left = 64, rowH = 30, H = S * rowH + 34, sx = (W - left - 12) / total;
    var out = ['<svg class="timeline-svg" data-schedule="' + name + '" width="' + W +
               '" height="' + H + '">'];
    for (var s = 0; s < S; s++) {
      out.push(text(4, s * rowH + 19, "stage " + s, ' class="label"'));
      out.push(rect(left, s * rowH + 2, W - left - 12, rowH - 4, "#f3f3f3", "lane"));
    }
    ops.forEach(function (op) {
      var x = left + op.start * sx, w = Math.max(1, (op.end - op.start) * sx);
      var hue = (op.mb * 47) % 360, light = op.kind === "F" ? 62 : 42;
      var label = op.kind + op.mb, y = op.stage * rowH + 3;
      out.push(rect(x.toFixed(2), y, w.toFixed(2), rowH - 6, "hsl(" + hue + ",55%," + light +
        "%)", "op op-" + op.kind, "op-" + name + "-s" + op.stage + "-" + label,
        (op.kind === "F" ? "forward" : "backward") + " micro-batch " + op.mb + " on stage " +
        op.stage + ": " + fmt(op.start) + " to " + fmt(op.end)));
      if (w > 22) out.push(text((x + w / 2).toFixed(2), y + 16, label,
                                ' text-anchor="middle" class="rank"'));
    });
    for (var k = 0; k <= 4; k++) {
      out.push(text(left + k * (W - left - 12) / 4 - (k === 4 ? 30 : 0), H - 6,
                    fmt(total * k / 4)));
    }
    out.push("</svg>");
    document.getElementById("timeline-chart").innerHTML = out.join("");
    var busy = data.micro_batches * Math.max.apply(null, data.stage_times);
    document.getElementById("timeline-caption").textContent = name.toUpperCase() + ": " +
      fmt(total) + " per step, bubble " + (100 * Math.max(0, total - busy) / total).toFixed(1) +
      "%, peak in-flight micro-batches per stage [" + data.peak_inflight[name].join(", ") + "]";
    ["gpipe", "1f1b"].forEach(function (n) {
      document.getElementById("sched-" + n).setAttribute("aria-pressed", String(n === name));
    });
  }
  function drawMemory() {
    var bars = data.memory, cap = data.capacity || 0, W = 960, left = 64, rowH = 22;
    if (!bars.length) {
      document.getElementById("memory-chart").textContent = "the plan has no memory estimate";
      return;
    }
    var top = Math.max(cap, Math.max.apply(null, bars.map(function (b) { return b.bytes; })));
    var sx = (W - left - 190) / top, H = bars.length * rowH + 10;
    var out = ['<svg class="memory-svg" width="' + W + '" height="' + H + '">'];
    bars.forEach(function (b, i) {
      var y = i * rowH + 4;
      out.push(text(4, y + 13, "r" + b.rank + " (s" + b.stage + ")"));
      out.push(rect(left, y, Math.max(2, b.bytes * sx).toFixed(2), rowH - 6, b.over ? "#e15759" : "#4e79a7",
        "mem-bar" + (b.over ? " over" : ""), "mem-rank-" + b.rank,
        "rank " + b.rank + ": " + bytes(b.bytes)));
      out.push(text(left + b.bytes * sx + 6, y + 13, bytes(b.bytes) +
                    (cap ? " / " + bytes(cap) : "")));
    });
    if (cap) out.push('<line id="mem-capacity" x1="' + (left + cap * sx) + '" x2="' +
                      (left + cap * sx) + '" y1="0" y2="' + H +
                      '" stroke="#222" stroke-dasharray="4 3"/>');
    out.push("</svg>");
    document.getElementById("memory-chart").innerHTML = out.join("");
  }
  function drawStepTime() {
    var st = data.step_time, total = st.total || 1, W = 960, sx = (W - 20) / total, x = 10;
    var parts = [["compute", st.compute, "#59a14f"], ["comm", st.comm, "#f28e2b"],
                 ["bubble", Math.max(0, total - st.compute - st.comm), "#bab0ac"]];
    var out = ['<svg class="step-time-svg" width="' + W + '" height="64">'];
    parts.forEach(function (p) {
      var w = p[1] * sx;
      out.push(rect(x.toFixed(2), 6, Math.max(0, w).toFixed(2), 26, p[2], "step-" + p[0],
                    "step-" + p[0], p[0] + ": " + fmt(p[1])));
      x += w;
    });
    var lx = 10;
    parts.forEach(function (p) {
      out.push(rect(lx, 42, 10, 10, p[2]));
      out.push(text(lx + 14, 51, p[0] + " " + fmt(p[1]) + " (" +
                    (100 * p[1] / total).toFixed(1) + "%)"));
      lx += 220;
    });
    out.push("</svg>");
    document.getElementById("step-time-chart").innerHTML = out.join("");
  }
  ["gpipe", "1f1b"].forEach(function (n) {
    document.getElementById("sched-" + n).addEventListener("click", function () {
      drawTimeline(n);
    });
  });
  drawTimeline(data.schedule);
  drawMemory();
  drawStepTime();
  document.body.setAttribute("data-rendered", "1");
})();
"""
