"""A self-contained HTML page to browse a model's coupled groups, block by block.

:func:`write_html` embeds, per block (and once for what lies outside every block), the
groups of that block and the channel-space nodes of :attr:`DependencyGraph.nx` whose module
(or, for parameters, whose parameter) is inside it, with their one-hop neighbours outside
it. The page draws, for the group one clicks, each member parameter as a small matrix whose
rows (``dim 0``) or columns (``dim 1``) are coloured by the unit they belong to, and the
block's channel graph with a layered layout computed in inline JavaScript. Nothing is loaded
from the network; views are capped (:data:`MAX_NODES` nodes, :data:`STRIP_CELLS` cells per
member strip) so that the file stays small for big models.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path

import numpy as np

from .graph import DependencyGraph
from .groups import Group, block_index
from .paths import write_text_atomically

__all__ = ["MAX_NODES", "NODE_FIELDS", "STRIP_CELLS", "page_data", "write_html"]

#: Most channel-space nodes drawn for one block (grouped channels are kept first).
MAX_NODES = 400
#: Most cells in one member's unit strip (longer dims are sampled evenly).
STRIP_CELLS = 128
#: Most members of a model-wide group listed on one page (per block: its own members).
MAX_MEMBERS = 80
#: The fields of each embedded node, in order (``groups``: indices into the group list).
NODE_FIELDS = ("key", "op", "dim", "size", "module", "param", "layout", "groups", "outside")


def write_html(graph: DependencyGraph, path: str | os.PathLike[str], layer: int | None = None) -> Path:
    """Write the page for ``graph`` to ``path`` (atomically) and return the path.

    ``layer`` is the block shown first (default: the first block with groups); ``ValueError``
    if the graph has no such block.
    """
    data = page_data(graph, layer)
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"depgraph: {data['model']}")
    text = _PAGE.replace("__TITLE__", title).replace("__DATA__", payload)
    return write_text_atomically(path, text)


def page_data(graph: DependencyGraph, layer: int | None = None) -> dict:
    """The JSON the page embeds: ``model``, ``groups``, ``layers`` (one per block, after the
    model-wide view ``"all"``), ``initial`` (the layer shown first) and ``node_fields``."""
    groups = graph.groups()
    blocks = sorted({g.layer for g in groups if g.layer is not None}
                    | {_block(d) for _, d in graph.nx.nodes(data=True)} - {None})
    if layer is not None and layer not in blocks:
        raise ValueError(f"layer {layer!r} is not a block of this model (blocks: "
                         f"{blocks[0] if blocks else '-'}..{blocks[-1] if blocks else '-'})")
    program = {key: i for i, key in enumerate(graph.nx.nodes)}  # nodes come in program order
    views = [_view(graph, groups, b, program) for b in [None, *blocks]]
    with_groups = [v["key"] for v in views[1:] if v["groups"]]
    initial = layer if layer is not None else (with_groups[0] if with_groups else "all")
    return {"model": graph.model_name, "initial": initial, "node_fields": NODE_FIELDS,
            "groups": [_group_data(g) for g in groups], "layers": views,
            "caps": {"nodes": MAX_NODES, "cells": STRIP_CELLS, "members": MAX_MEMBERS}}


def _block(data: dict) -> int | None:
    """The block of a channel-space node: of its module, else of its parameter."""
    found = block_index(data["module"]) if data.get("module") else None
    if found is None and data.get("param"):
        found = block_index(data["param"])
    return found


def _group_data(group: Group) -> dict:
    members = []
    for member, per_unit in zip(group.members, group.channels_per_unit, strict=True):
        coords = group.store.coords(member.layout, group.root)
        sampled = coords.size > STRIP_CELLS
        if sampled:
            coords = coords[np.linspace(0, coords.size - 1, STRIP_CELLS).round().astype(int)]
        members.append({
            "param": member.param, "dim": member.dim, "size": member.size, "per_unit": per_unit,
            "layout": str(group.store.resolve(member.layout)), "block": block_index(member.param),
            "shape": list(group.param_shapes.get(member.param, ())),
            "strip": coords.tolist(), "sampled": sampled})
    return {"id": group.id, "kind": group.kind, "layer": group.layer, "units": group.num_units,
            "zero_equivalent": group.zero_equivalent, "params_per_unit": group.params_per_unit,
            "members": members}


def _view(graph: DependencyGraph, groups: list[Group], block: int | None,
          program: dict[str, int]) -> dict:
    """One page view: the groups and the capped channel graph of one block (or model-wide)."""
    nx_graph = graph.nx
    group_index = {g.id: i for i, g in enumerate(groups)}
    inside = [k for k, d in nx_graph.nodes(data=True) if _block(d) == block]
    inside_set = set(inside)
    outside = [] if block is None else list(dict.fromkeys(
        n for k in inside for n in (*nx_graph.predecessors(k), *nx_graph.successors(k))
        if n not in inside_set))
    order = {k: i for i, k in enumerate(inside + outside)}

    def priority(key: str) -> tuple:
        data = nx_graph.nodes[key]
        return (key not in inside_set, not data.get("groups"), "param" not in data, order[key])

    kept = sorted(order, key=priority)[:MAX_NODES]
    kept.sort(key=program.__getitem__)
    index = {k: i for i, k in enumerate(kept)}
    nodes = []  # positional, to keep big pages small: see NODE_FIELDS
    for key in kept:
        data = nx_graph.nodes[key]
        nodes.append([key, str(data.get("op", "")).removeprefix("aten::"), data.get("dim"),
                      data.get("size"), data.get("module", ""), data.get("param"),
                      str(data.get("layout", "")),
                      [group_index[g] for g in data.get("groups", [])], int(key not in inside_set)])
    edges = sorted({(index[a], index[b], d.get("kind", "")) for a, b, d in
                    nx_graph.subgraph(kept).edges(data=True)})
    mine = [g.id for g in groups if g.layer == block]
    touching = [] if block is None else [
        g.id for g in groups if g.layer is None and any(block_index(m.param) == block
                                                        for m in g.members)]
    return {"key": "all" if block is None else block,
            "label": "model-wide" if block is None else f"block {block}",
            "groups": mine, "touching": touching, "nodes": nodes,
            "edges": [list(e) for e in edges], "dropped": len(order) - len(kept)}


_PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>__TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
:root{--bg:#f6f7f9;--panel:#fff;--ink:#1d2330;--mute:#667085;--line:#d9dde5;--accent:#2f6fdb}
*{box-sizing:border-box}
body{margin:0;font:13px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);background:var(--bg);height:100vh;display:flex;flex-direction:column}
header{padding:8px 16px;background:#1d2330;color:#fff;display:flex;gap:16px;align-items:baseline}
header h1{font-size:15px;margin:0;font-weight:600}header .sub{color:#aeb6c6}
main{flex:1;display:grid;grid-template-columns:310px 1fr;min-height:0}
aside{border-right:1px solid var(--line);background:var(--panel);display:flex;flex-direction:column;min-height:0}
.ctl{padding:10px 12px;border-bottom:1px solid var(--line);display:flex;gap:6px;align-items:center}
select,button{font:inherit;padding:3px 6px;border:1px solid var(--line);border-radius:4px;background:#fff}
button{cursor:pointer}select{flex:1}
#group-list{list-style:none;margin:0;padding:6px;overflow:auto;flex:1}
.group-item{border:1px solid var(--line);border-radius:6px;padding:7px 9px;margin:5px 0;cursor:pointer;background:#fff}
.group-item:hover{border-color:#9db5e6}.group-item.sel{border-color:var(--accent);box-shadow:0 0 0 2px #2f6fdb33;background:#f3f7ff}
.gid{font-weight:600;word-break:break-all}.facts{color:var(--mute);margin-top:2px}
.kind{display:inline-block;border-radius:9px;padding:0 7px;font-size:11px;color:#fff;margin-right:4px}
.heading{color:var(--mute);font-size:11px;text-transform:uppercase;letter-spacing:.05em;margin:10px 4px 2px}
#right{display:grid;grid-template-rows:auto 1fr;min-height:0}
section{background:var(--panel);margin:8px;border:1px solid var(--line);border-radius:6px;display:flex;flex-direction:column;min-height:0}
section h2{font-size:13px;margin:0;padding:6px 10px;border-bottom:1px solid var(--line);display:flex;flex-wrap:wrap;gap:4px 12px;align-items:center}
section h2 .tools{margin-left:auto;display:flex;gap:10px;align-items:center;font-size:12px}
section h2 .info{font-weight:400;color:var(--mute)}
#members{overflow:auto;max-height:38vh;padding:8px;display:flex;flex-wrap:wrap;gap:8px;align-content:flex-start}
.member{border:1px solid var(--line);border-radius:6px;padding:6px 8px;flex:1 1 250px;max-width:340px;display:flex;gap:8px}
.member .txt{min-width:0;flex:1}.pname{font-weight:600;word-break:break-all;font-size:12px}
.mono{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:11px;color:#344054;word-break:break-all}
.more{color:var(--mute);padding:6px}
#graph-wrap{flex:1;min-height:0;position:relative}
#graph{width:100%;height:100%;display:block;cursor:grab}
#node-info{position:absolute;right:8px;top:8px;max-width:340px;background:#fffffff0;border:1px solid var(--line);border-radius:6px;padding:6px 8px;display:none}
.legend{font-weight:400;color:var(--mute);font-size:12px}.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin:0 3px 0 8px;vertical-align:-1px}
label{font-weight:400}
</style></head>
<body>
<header><h1 id="title"></h1><span class="sub" id="subtitle"></span></header>
<main>
<aside>
 <div class="ctl"><button id="prev" title="previous block">&#9664;</button><select id="layer-select"></select><button id="next" title="next block">&#9654;</button></div>
 <ul id="group-list"></ul>
</aside>
<div id="right">
 <section><h2>Members <span class="info" id="member-info"></span></h2><div id="members"></div></section>
 <section><h2>Channel graph <span class="info" id="graph-info"></span>
  <span class="tools"><span class="legend"><span class="sw" style="background:#f59e0b"></span>selected group<span class="sw" style="background:#dbe6fb"></span>other groups<span class="sw" style="background:#eef0f3;border:1px dashed #98a2b3"></span>outside the block</span>
  <label title="hide batch and sequence dims and other channels that no group holds"><input type="checkbox" id="grouped-only" checked>grouped only</label><button id="fit">fit</button></span></h2>
  <div id="graph-wrap"><svg id="graph"></svg><div id="node-info"></div></div></section>
</div>
</main>
<script type="application/json" id="depgraph-data">__DATA__</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("depgraph-data").textContent);
const GROUPS = Object.fromEntries(DATA.groups.map((g) => [g.id, g])), GROUP_IDS = DATA.groups.map((g) => g.id);
for (const layer of DATA.layers)  // nodes come as arrays of DATA.node_fields
  layer.nodes = layer.nodes.map((row) => {
    const nd = Object.fromEntries(DATA.node_fields.map((f, i) => [f, row[i]]));
    return Object.assign(nd, {groups: nd.groups.map((i) => GROUP_IDS[i]), outside: !!nd.outside});
  });
const KIND = {hidden:"#7c3aed", mlp:"#0e9f6e", attention_head:"#2f6fdb", kv_group:"#1c64f2", query_head:"#6d28d9", expert:"#d97706"};
const NS = document.getElementById("graph").namespaceURI;  // inline <svg>: the SVG namespace
const state = {layer: DATA.initial, group: null, unit: null, node: null};
const $ = (id) => document.getElementById(id);
function h(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) k === "class" ? e.className = v : e.setAttribute(k, v);
  for (const c of kids) e.append(c);
  return e;
}
function s(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (parent) parent.append(e);
  return e;
}
const unitColour = (u) => u < 0 ? "#e4e7ec" : `hsl(${(u * 137.508) % 360},62%,${u % 2 ? 48 : 60}%)`;
const fmt = (n) => n == null ? "-" : Number(n).toLocaleString("en-US");
const view = () => DATA.layers.find((l) => String(l.key) === String(state.layer)) || DATA.layers[0];

function renderLayers() {
  const sel = $("layer-select");
  sel.replaceChildren(...DATA.layers.map((l) => h("option", {value: l.key},
    `${l.label} (${l.groups.length} group${l.groups.length === 1 ? "" : "s"})`)));
  sel.value = String(view().key);
}
function groupCard(g, local) {
  const li = h("li", {class: "group-item" + (g.id === state.group ? " sel" : ""), "data-id": g.id});
  const badge = h("span", {class: "kind", style: `background:${KIND[g.kind] || "#475467"}`}, g.kind);
  li.append(h("div", {class: "gid"}, badge, g.id));
  const n = local ? g.members.filter((m) => m.block === local).length : g.members.length;
  li.append(h("div", {class: "facts"}, `${fmt(g.units)} units · ${fmt(g.params_per_unit)} params/unit · ` +
    `${n} member${n === 1 ? "" : "s"}${local ? " here" : ""} · ${g.zero_equivalent ? "zero-equivalent" : "not zero-equivalent"}`));
  li.onclick = () => { state.group = g.id; state.unit = null; render(); };
  return li;
}
function renderGroups() {
  const v = view(), list = $("group-list"), local = v.key === "all" ? null : v.key;
  list.replaceChildren();
  if (!v.groups.length && !v.touching.length) list.append(h("li", {class: "more"}, "no prunable groups here"));
  if (v.groups.length) list.append(h("li", {class: "heading"}, `groups of ${v.label}`));
  for (const id of v.groups) list.append(groupCard(GROUPS[id], null));
  if (v.touching.length) list.append(h("li", {class: "heading"}, "model-wide groups with members here"));
  for (const id of v.touching) list.append(groupCard(GROUPS[id], local));
}
function matrix(m, parent) {
  const shape = m.shape.length ? m.shape : [m.size], cells = m.strip.length;
  const rowsDim = m.dim === 0, W = 92, Hmax = 92;
  const other = shape.length > 1 ? shape.filter((_, i) => i !== m.dim).reduce((a, b) => a * b, 1) : 1;
  const along = rowsDim ? Hmax : W, across = Math.max(8, Math.min(rowsDim ? W : Hmax,
    (rowsDim ? W : Hmax) * Math.sqrt(other / Math.max(m.size, other))));
  const w = rowsDim ? across : along, hgt = rowsDim ? along : across;
  const svg = s("svg", {width: w + 2, height: hgt + 2, viewBox: `-1 -1 ${w + 2} ${hgt + 2}`}, parent);
  const step = along / cells;
  m.strip.forEach((u, i) => {
    const faded = state.unit !== null && u !== state.unit;
    const r = s("rect", rowsDim ? {x: 0, y: i * step, width: w, height: step + 0.3}
                                : {x: i * step, y: 0, width: step + 0.3, height: hgt}, svg);
    r.setAttribute("fill", unitColour(u));
    if (faded) r.setAttribute("opacity", "0.12");
    r.onmouseenter = () => { if (u >= 0 && state.unit !== u) { state.unit = u; renderMembers(); } };
    s("title", {}, r).textContent = `${m.param} dim ${m.dim}: position ~${Math.round(i * (m.size - 1) / Math.max(1, cells - 1))} -> unit ${u}`;
  });
  s("rect", {x: 0, y: 0, width: w, height: hgt, fill: "none", stroke: "#475467", "stroke-width": 1}, svg);
  return svg;
}
function renderMembers() {
  const box = $("members"), g = GROUPS[state.group];
  box.replaceChildren();
  if (!g) { $("member-info").textContent = "click a group"; return; }
  const v = view(), local = g.layer === null && v.key !== "all" ? v.key : null;
  let members = local === null ? g.members : g.members.filter((m) => m.block === local);
  const hidden = g.members.length - members.length, shown = members.slice(0, DATA.caps.members);
  $("member-info").textContent = `${g.id}: ${g.kind}, ${fmt(g.units)} units, ` +
    (state.unit === null ? "hover a strip to follow one unit" : `showing unit ${state.unit}`);
  for (const m of shown) {
    const card = h("div", {class: "member"}), txt = h("div", {class: "txt"});
    matrix(m, card);
    txt.append(h("div", {class: "pname"}, m.param),
      h("div", {}, `dim ${m.dim} of [${m.shape.join(", ")}] · ${fmt(m.size)} channels · ${m.per_unit} per unit`),
      h("div", {class: "mono", title: "layout of this dim: a<id>[n] is an axis of n; (A×B) a product, A outer; [A|B] a concatenation"}, m.layout));
    if (m.sampled) txt.append(h("div", {class: "facts"}, `strip: ${m.strip.length} of ${fmt(m.size)} positions, evenly sampled`));
    card.append(txt);
    box.append(card);
  }
  const rest = members.length - shown.length;
  if (rest > 0 || hidden > 0) box.append(h("div", {class: "more"},
    [rest > 0 ? `${rest} more members not drawn` : "", hidden > 0 ? `${hidden} members in other blocks` : ""].filter(Boolean).join("; ")));
  box.onmouseleave = () => { if (state.unit !== null) { state.unit = null; renderMembers(); } };
}
function layout(nodes, edges) {
  const n = nodes.length, rank = new Array(n).fill(0), out = [...Array(n)].map(() => []),
        inn = [...Array(n)].map(() => []), indeg = new Array(n).fill(0);
  // rank along the program: every edge points from the earlier node to the later one
  for (const [a, b] of edges) { const [u, v] = a < b ? [a, b] : [b, a]; if (u !== v) { out[u].push(v); inn[v].push(u); indeg[v]++; } }
  const queue = [...Array(n).keys()].filter((i) => !indeg[i]);
  while (queue.length) { const u = queue.shift();
    for (const v of out[u]) { rank[v] = Math.max(rank[v], rank[u] + 1); if (!--indeg[v]) queue.push(v); } }
  // sources (parameters, inputs) sit right before their first consumer
  for (let i = 0; i < n; i++) if (!inn[i].length && out[i].length) rank[i] = Math.min(...out[i].map((v) => rank[v])) - 1;
  const used = [...new Set(rank)].sort((a, b) => a - b);
  for (let i = 0; i < n; i++) rank[i] = used.indexOf(rank[i]);
  const cols = new Map();
  [...Array(n).keys()].forEach((i) => { if (!cols.has(rank[i])) cols.set(rank[i], []); cols.get(rank[i]).push(i); });
  const keys = [...cols.keys()].sort((a, b) => a - b), pos = new Array(n).fill(0);
  keys.forEach((k) => cols.get(k).forEach((i, j) => pos[i] = j));
  const nbrs = [...Array(n)].map(() => []);
  for (const [a, b] of edges) { nbrs[a].push(b); nbrs[b].push(a); }
  for (let sweep = 0; sweep < 6; sweep++) for (const k of (sweep % 2 ? [...keys].reverse() : keys)) {
    const col = cols.get(k), bary = (i) => nbrs[i].length ? nbrs[i].reduce((t, j) => t + pos[j], 0) / nbrs[i].length : pos[i];
    const b = new Map(col.map((i) => [i, bary(i)]));
    col.sort((x, y) => b.get(x) - b.get(y)).forEach((i, j) => pos[i] = j);
  }
  const tall = Math.max(...keys.map((k) => cols.get(k).length)), xy = new Array(n);
  keys.forEach((k, c) => { const col = cols.get(k), off = (tall - col.length) / 2;
    col.forEach((i) => xy[i] = [c * 122, (pos[i] + off) * 26]); });
  return {xy, width: keys.length * 122, height: tall * 26};
}
const zoom = {x: 0, y: 0, w: 1, h: 1};
function setBox() { $("graph").setAttribute("viewBox", `${zoom.x} ${zoom.y} ${zoom.w} ${zoom.h}`); }
function renderGraph() {
  const v = view(), svg = $("graph"), only = $("grouped-only").checked;
  const keep = v.nodes.map((nd, i) => (!only || nd.groups.length || nd.param) ? i : -1).filter((i) => i >= 0);
  const map = new Map(keep.map((i, j) => [i, j])), nodes = keep.map((i) => v.nodes[i]);
  const edges = v.edges.filter(([a, b]) => map.has(a) && map.has(b)).map(([a, b, k]) => [map.get(a), map.get(b), k]);
  svg.replaceChildren();
  $("graph-info").textContent = `${v.label}: ${nodes.length}/${v.nodes.length} nodes, ${edges.length} edges` +
    (v.dropped ? ` (${v.dropped} more not embedded)` : "");
  if (!nodes.length) return;
  const {xy, width, height} = layout(nodes, edges), g = s("g", {}, svg), NW = 100, NH = 20;
  for (const [a, b, k] of edges) {
    const [x1, y1] = xy[a], [x2, y2] = xy[b], same = k === "same";
    const d = x1 === x2 ? `M${x1 + NW} ${y1 + NH / 2} C${x1 + NW + 30} ${y1 + NH / 2} ${x2 + NW + 30} ${y2 + NH / 2} ${x2 + NW} ${y2 + NH / 2}`
      : `M${x1 + NW} ${y1 + NH / 2} C${x1 + NW + 20} ${y1 + NH / 2} ${x2 - 20} ${y2 + NH / 2} ${x2} ${y2 + NH / 2}`;
    const hot = state.node !== null && (a === map.get(state.node) || b === map.get(state.node));
    s("path", {d, fill: "none", stroke: hot ? "#d92d20" : same ? "#b0b7c3" : "#8792a2", "stroke-width": hot ? 1.8 : 0.9,
      "stroke-dasharray": same ? "3 3" : "", opacity: 0.9}, g).append(Object.assign(document.createElementNS(NS, "title"), {textContent: k}));
  }
  nodes.forEach((nd, i) => {
    const [x, y] = xy[i], inGroup = nd.groups.includes(state.group);
    const fill = nd.outside ? "#eef0f3" : inGroup ? "#f59e0b" : nd.groups.length ? "#dbe6fb" : "#f4f5f7";
    const box = s("g", {transform: `translate(${x},${y})`, class: "node", style: "cursor:pointer"}, g);
    s("rect", {width: NW, height: NH, rx: 4, fill, stroke: keep[i] === state.node ? "#d92d20" : nd.param ? "#1d2330" : "#98a2b3",
      "stroke-width": nd.param || keep[i] === state.node ? 1.6 : 0.8, "stroke-dasharray": nd.outside ? "3 2" : ""}, box);
    const name = nd.param ? nd.param.split(".").slice(-2).join(".") : nd.op;
    const t = s("text", {x: 4, y: 14, "font-size": 10.5, fill: "#1d2330"}, box), tail = `:${nd.dim} [${nd.size}]`;
    t.textContent = (name.length + tail.length > 17 ? name.slice(0, Math.max(4, 16 - tail.length)) + "…" : name) + tail;
    if (t.getComputedTextLength() > NW - 8) { t.setAttribute("textLength", NW - 8); t.setAttribute("lengthAdjust", "spacingAndGlyphs"); }
    s("title", {}, box).textContent = `${nd.key}\nop ${nd.op}\nmodule ${nd.module || "-"}\nlayout ${nd.layout}`;
    box.onclick = (ev) => { ev.stopPropagation(); state.node = state.node === keep[i] ? null : keep[i]; renderGraph(); showNode(); };
  });
  if (!zoom.fitted) fit(width + NW, height + NH);
  setBox();
}
function fit(w, h) {  // whole drawing in view, centred, never magnified beyond 1.25x
  const r = $("graph-wrap").getBoundingClientRect(), pw = Math.max(r.width, 100), ph = Math.max(r.height, 100);
  const scale = Math.min(pw / (w + 24), ph / (h + 24), 1.25), W = pw / scale, H = ph / scale;
  Object.assign(zoom, {x: (w - W) / 2, y: (h - H) / 2, w: W, h: H, fitted: true});
  setBox();
}
function showNode() {
  const info = $("node-info"), nd = state.node === null ? null : view().nodes[state.node];
  if (!nd) { info.style.display = "none"; return; }
  info.replaceChildren(h("div", {class: "pname"}, nd.key),
    ...[["op", nd.op], ["module", nd.module || "-"], ["param", nd.param || "-"], ["dim / size", `${nd.dim} / ${nd.size}`],
        ["layout", nd.layout], ["groups", nd.groups.join(", ") || "none"], ["", nd.outside ? "outside this block" : ""]]
      .filter(([, v]) => v).map(([k, v]) => h("div", {class: "mono"}, k ? `${k}: ${v}` : v)));
  info.style.display = "block";
}
function render() {
  const v = view(), ids = [...v.groups, ...v.touching];
  if (!ids.includes(state.group)) state.group = ids.length ? ids[0] : null;
  history.replaceState(null, "", `#layer=${v.key}` + (state.group ? `&group=${encodeURIComponent(state.group)}` : ""));
  renderLayers(); renderGroups(); renderMembers(); renderGraph(); showNode();
}
function step(d) { const i = DATA.layers.indexOf(view()) + d; if (i >= 0 && i < DATA.layers.length) setLayer(DATA.layers[i].key); }
function setLayer(key) { state.layer = key; state.node = null; zoom.fitted = false; render(); }
(function init() {
  $("title").textContent = `depgraph · ${DATA.model}`;
  $("subtitle").textContent = `${DATA.groups.length} coupled groups in ${DATA.layers.length - 1} blocks`;
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("layer") !== null && DATA.layers.some((l) => String(l.key) === hash.get("layer"))) state.layer = hash.get("layer");
  if (hash.get("group")) state.group = hash.get("group");
  $("layer-select").onchange = (e) => setLayer(e.target.value);
  $("prev").onclick = () => step(-1); $("next").onclick = () => step(1);
  $("grouped-only").onchange = () => { state.node = null; zoom.fitted = false; render(); };
  $("fit").onclick = () => { zoom.fitted = false; renderGraph(); };
  const svg = $("graph");
  svg.onclick = () => { state.node = null; renderGraph(); showNode(); };
  svg.addEventListener("wheel", (e) => { e.preventDefault(); const r = svg.getBoundingClientRect(), f = e.deltaY > 0 ? 1.15 : 1 / 1.15;
    const px = zoom.x + (e.clientX - r.left) / r.width * zoom.w, py = zoom.y + (e.clientY - r.top) / r.height * zoom.h;
    Object.assign(zoom, {x: px - (px - zoom.x) * f, y: py - (py - zoom.y) * f, w: zoom.w * f, h: zoom.h * f}); setBox(); }, {passive: false});
  let drag = null;
  svg.onmousedown = (e) => { drag = [e.clientX, e.clientY, zoom.x, zoom.y]; };
  window.onmouseup = () => { drag = null; };
  window.onmousemove = (e) => { if (!drag) return; const r = svg.getBoundingClientRect();
    zoom.x = drag[2] - (e.clientX - drag[0]) / r.width * zoom.w; zoom.y = drag[3] - (e.clientY - drag[1]) / r.height * zoom.h; setBox(); };
  window.onresize = () => { zoom.fitted = false; renderGraph(); };
  render();
  document.body.setAttribute("data-rendered", "1");
})();
</script>
</body></html>
"""
