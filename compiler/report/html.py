"""``index.html``: one self-contained page to walk graph → stage → pass.

For every graph it shows the pass table, each step's FX code with a diff
against the step before, a picture of each MoE region (graphviz ``dot`` when
installed, a plain layered SVG otherwise) and the estimated comm/compute
timeline. Everything is inlined: the page opens from disk with no network.
"""

from __future__ import annotations

import difflib
import html
import json
import shutil
import subprocess
from pathlib import Path

ROLE_COLOURS = {"router": "#f6c85f", "dispatch": "#6fb1e4", "experts": "#9bd17b", "combine": "#e88f8f"}
LANE_COLOURS = {"compute": "#6fb1e4", "comm": "#e8a33d", "wait": "#d9534f"}


def write_index(folder: Path, views: list[dict], torch_version: str) -> Path:
    """The page for these graph views (from ``graph_view``)."""
    page = _PAGE.replace("__DATA__", json.dumps({"graphs": views, "torch": torch_version}).replace("</", "<\\/"))
    path = folder / "index.html"
    path.write_text(page)
    return path


def graph_view(folder: Path, graph: dict) -> dict:
    """What the page shows of one graph (its summary entry): code and diff per step, pictures, timeline."""
    files = [("input", graph["input_file"])] + [(p["name"], p["file"]) for p in graph["passes"]]
    steps, previous = [], None
    for label, relative in files:
        code = (folder / relative).read_text()
        diff = "" if previous is None else "\n".join(difflib.unified_diff(previous.splitlines(), code.splitlines(),
                                                                          "before", label, lineterm="", n=2))
        steps.append({"label": label, "file": relative, "code": code, "diff": diff})
        previous = code
    estimate = graph.get("estimate") or {}
    measured = graph.get("measured") or {}
    return {
        "name": graph["name"],
        "stage": graph["stage"],
        "role": graph["role"],
        "passes": graph["passes"],
        "steps": steps,
        "layers": graph.get("moe_layers", []),
        "collectives": graph.get("collectives", {}),
        "exchange_bytes": graph.get("exchange_bytes"),
        "estimate": {k: v for k, v in estimate.items() if k != "events"},
        "regions": [{"layer": r["layer"], "svg": region_svg(r)} for r in graph.get("regions", [])],
        "timeline": timeline_svg(estimate.get("events", []), estimate.get("step_s", 0.0)),
        "measured": {k: v for k, v in measured.items() if k != "events"},
        "measured_timeline": timeline_svg(measured.get("events", []), measured.get("step_s", 0.0)) if measured else "",
    }


def region_svg(region: dict) -> str:
    """An SVG of one MoE region: graphviz when ``dot`` is installed, else a layered drawing of our own."""
    if shutil.which("dot"):
        try:
            return _graphviz_svg(region)
        except (subprocess.SubprocessError, OSError):
            pass
    return _layered_svg(region)


def _graphviz_svg(region: dict) -> str:
    lines = ["digraph region {", "rankdir=TB; node [shape=box, style=filled, fontsize=10, fontname=Helvetica];"]
    for node in region["nodes"]:
        label = f"{node['name']}\\n{node['op']}"
        lines.append(f'"{node["name"]}" [label="{label}", fillcolor="{ROLE_COLOURS[node["role"]]}"];')
    lines += [f'"{a}" -> "{b}";' for a, b in region["edges"]]
    lines.append("}")
    out = subprocess.run(["dot", "-Tsvg"], input="\n".join(lines), capture_output=True, text=True, timeout=30,
                         check=True)
    return out.stdout[out.stdout.index("<svg"):]


def _layered_svg(region: dict) -> str:
    """Nodes in rows by longest-path depth (graph order is topological), edges as lines."""
    depth: dict[str, int] = {}
    inputs: dict[str, list[str]] = {n["name"]: [] for n in region["nodes"]}
    for a, b in region["edges"]:
        inputs[b].append(a)
    rows: dict[int, list[dict]] = {}
    for node in region["nodes"]:
        depth[node["name"]] = 1 + max((depth[i] for i in inputs[node["name"]] if i in depth), default=-1)
        rows.setdefault(depth[node["name"]], []).append(node)
    box_w, box_h, gap_x, gap_y = 170, 34, 14, 26
    position = {}
    for d, row in rows.items():
        for i, node in enumerate(row):
            position[node["name"]] = (10 + i * (box_w + gap_x), 10 + d * (box_h + gap_y))
    width = 20 + max(len(r) for r in rows.values()) * (box_w + gap_x)
    height = 20 + len(rows) * (box_h + gap_y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             'font-family="Helvetica" font-size="10">']
    for a, b in region["edges"]:
        (xa, ya), (xb, yb) = position[a], position[b]
        parts.append(f'<line x1="{xa + box_w / 2}" y1="{ya + box_h}" x2="{xb + box_w / 2}" y2="{yb}" stroke="#888"/>')
    for node in region["nodes"]:
        x, y = position[node["name"]]
        parts.append(
            f'<g><title>{html.escape(node["op"])}</title><rect x="{x}" y="{y}" width="{box_w}" height="{box_h}" rx="4" '
            f'fill="{ROLE_COLOURS[node["role"]]}" stroke="#555"/>'
            f'<text x="{x + 5}" y="{y + 14}">{html.escape(node["name"][:28])}</text>'
            f'<text x="{x + 5}" y="{y + 27}" fill="#333">{html.escape(node["op"][:30])}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)


def timeline_svg(events: list[dict], step_s: float, width: int = 1000) -> str:
    """Compute, communication and wait lanes of an estimated or measured timeline."""
    if not events or step_s <= 0:
        return "<p>no timeline</p>"
    lanes = {"compute": 20, "comm": 50, "wait": 80}
    scale = (width - 90) / step_s
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="110" '
             'font-family="Helvetica" font-size="11">']
    for lane, y in lanes.items():
        parts.append(f'<text x="0" y="{y + 14}">{lane}</text>')
    for e in events:
        x = 80 + e["start"] * scale
        w = max((e["end"] - e["start"]) * scale, 0.5)
        parts.append(
            f'<rect x="{x:.1f}" y="{lanes[e["lane"]]}" width="{w:.1f}" height="20" fill="{LANE_COLOURS[e["lane"]]}">'
            f'<title>{html.escape(e["node"])}: {(e["end"] - e["start"]) * 1e3:.3f} ms</title></rect>'
        )
    parts.append(f'<text x="80" y="106">0</text><text x="{width - 80}" y="106">{step_s * 1e3:.2f} ms</text></svg>')
    return "".join(parts)


_PAGE = r"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>moe_ascend dump</title>
<style>
body{font-family:Helvetica,Arial,sans-serif;margin:0;display:flex;height:100vh}
#nav{width:270px;overflow:auto;border-right:1px solid #ccc;padding:8px;background:#fafafa;font-size:13px}
#main{flex:1;overflow:auto;padding:12px 18px}
#nav .graph{font-weight:bold;margin-top:10px;cursor:pointer}
#nav .step{margin-left:14px;cursor:pointer;padding:1px 4px}
#nav .step.on,#nav .graph.on{background:#dde8f5}
#nav .mod{color:#2a7a2a}
pre{background:#f6f6f6;padding:8px;font-size:12px;overflow:auto;max-height:60vh}
.add{color:#1a6e1a;background:#eaffea}.del{color:#a11;background:#ffecec}.hunk{color:#777}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
.legend span{display:inline-block;padding:2px 8px;margin-right:6px;border-radius:3px}
.tabs button{margin-right:4px}
</style></head><body>
<div id="nav"></div><div id="main"></div>
<script>
const DATA = __DATA__;
const ROLE = {router:"#f6c85f",dispatch:"#6fb1e4",experts:"#9bd17b",combine:"#e88f8f"};
const esc = s => String(s).replace(/[&<>]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;"}[c]));
// A link like index.html#graph_0.forward/2 opens that graph at that step.
function fromHash() {
  const [name, step] = decodeURIComponent(location.hash.slice(1)).split("/");
  const g = Math.max(0, DATA.graphs.findIndex(x => x.name === name));
  return {g: g, s: step === undefined || step === "" ? null : Number(step), view: "diff"};
}
let current = fromHash();
function nav() {
  const el = document.getElementById("nav");
  el.innerHTML = "<div><b>moe_ascend</b> (torch " + esc(DATA.torch) + ")</div>";
  DATA.graphs.forEach((g, gi) => {
    const head = document.createElement("div");
    head.className = "graph" + (current.g === gi && current.s === null ? " on" : "");
    head.textContent = g.name + " · " + g.stage;
    head.onclick = () => { current = {g: gi, s: null, view: current.view}; render(); };
    el.appendChild(head);
    g.steps.forEach((s, si) => {
      const p = si ? g.passes[si - 1] : null;
      const d = document.createElement("div");
      d.className = "step" + (current.g === gi && current.s === si ? " on" : "");
      d.innerHTML = esc(si + ". " + s.label) + (p && p.modified ? ' <span class="mod">(modified)</span>' : "");
      d.onclick = () => { current = {g: gi, s: si, view: current.view}; render(); };
      el.appendChild(d);
    });
  });
}
function diffHtml(diff) {
  if (!diff) return "<i>no change</i>";
  return diff.split("\n").map(l => {
    const cls = l.startsWith("+") ? "add" : l.startsWith("-") ? "del" : l.startsWith("@@") ? "hunk" : "";
    return '<span class="' + cls + '">' + esc(l) + "</span>";
  }).join("\n");
}
function overview(g) {
  let h = "<h2>" + esc(g.name) + " · " + esc(g.stage) + " (" + esc(g.role) + ")</h2>";
  h += "<h3>Passes</h3><table><tr><th>#</th><th>pass</th><th>modified</th><th>nodes</th><th>added</th><th>removed</th><th>ms</th><th>said</th></tr>";
  g.passes.forEach((p, i) => { h += "<tr><td>" + (i + 1) + "</td><td>" + esc(p.name) + "</td><td>" + p.modified + "</td><td>" + p.nodes_before + " → " + p.nodes_after + "</td><td>" + p.nodes_added + "</td><td>" + p.nodes_removed + "</td><td>" + (p.seconds * 1e3).toFixed(2) + "</td><td>" + (p.said || []).map(s => esc(s.level + ": " + s.message)).join("<br>") + "</td></tr>"; });
  h += "</table><h3>MoE layers</h3>";
  if (!g.layers.length) h += "<p>none found</p>";
  else {
    h += "<table><tr><th>layer</th><th>router</th><th>dispatch</th><th>experts</th><th>combine</th></tr>";
    g.layers.forEach(l => { h += "<tr><td>" + l.layer + "</td>" + ["router","dispatch","experts","combine"].map(r => "<td title='" + esc(l[r].join(", ")) + "'>" + l[r].length + " nodes</td>").join("") + "</tr>"; });
    h += "</table>";
  }
  h += '<h3>Collectives</h3>';
  const kinds = Object.keys(g.collectives);
  h += kinds.length ? "<table><tr><th>kind</th><th>group</th><th>count</th></tr>" + kinds.map(k => Object.entries(g.collectives[k]).map(([grp, n]) => "<tr><td>" + esc(k) + "</td><td>" + esc(grp) + "</td><td>" + n + "</td></tr>").join("")).join("") + "</table>" : "<p>none</p>";
  const sent = g.exchange_bytes;
  if (kinds.length && sent) h += "<p>all-to-all bytes per run: " + (typeof sent === "object" ? "inter-node " + sent.inter_node.toLocaleString() + " · intra-node " + sent.intra_node.toLocaleString() : esc(sent)) + "</p>";
  [["Estimated timeline", g.estimate, g.timeline], ["Measured timeline (options['profile'])", g.measured, g.measured_timeline]].forEach(([title, e, svg]) => {
    if (!svg) return;
    h += "<h3>" + title + "</h3>";
    if (e && e.step_s !== undefined) h += "<p>step " + (e.step_s * 1e3).toFixed(3) + " ms · compute " + (e.compute_s * 1e3).toFixed(3) + " ms · communication " + (e.comm_s * 1e3).toFixed(3) + " ms · <b>exposed communication " + (e.exposed_comm_s * 1e3).toFixed(3) + " ms</b></p>";
    h += svg;
  });
  h += "<h3>MoE regions</h3><div class='legend'>" + Object.entries(ROLE).map(([r, c]) => '<span style="background:' + c + '">' + r + "</span>").join("") + "</div>";
  g.regions.forEach(r => { h += "<h4>layer " + r.layer + "</h4><div style='overflow:auto;max-height:70vh'>" + r.svg + "</div>"; });
  return h;
}
function stepView(g, si) {
  const s = g.steps[si];
  let h = "<h2>" + esc(g.name) + " · " + esc(g.stage) + " · " + si + ". " + esc(s.label) + "</h2><p>" + esc(s.file) + "</p>";
  h += '<div class="tabs"><button onclick="current.view=\'diff\';render()">diff</button><button onclick="current.view=\'code\';render()">code</button></div>';
  h += current.view === "diff" && si > 0 ? "<pre>" + diffHtml(s.diff) + "</pre>" : "<pre>" + esc(s.code) + "</pre>";
  return h;
}
function render() {
  const g = DATA.graphs[current.g];
  if (g) history.replaceState(null, "", "#" + g.name + (current.s === null ? "" : "/" + current.s));
  nav();
  document.getElementById("main").innerHTML = !g ? "<p>no graphs</p>" : current.s === null ? overview(g) : stepView(g, current.s);
}
render();
</script></body></html>
"""  # noqa: E501 (the page's script, kept as written)
