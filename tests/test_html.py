"""The HTML group browser: self-contained, complete, and rendered by a real headless browser."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import zlib
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from depgraph import build_graph
from depgraph.html_view import MAX_NODES, page_data, write_html
from depgraph.paths import models_dir

TINY = models_dir() / "stories260K"
pytestmark = pytest.mark.skipif(not TINY.is_dir(), reason="offline stories260K model missing")
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--window-size=1200,800"]
SELECTED = (245, 158, 11)  # the fill of the selected group's nodes in the channel graph

# Appended to a copy of the page: clicks through every block and group, hovers a unit strip,
# clicks a node, and reports the outcome (or the first script error) on <body>.
SELF_TEST = """<script>
window.onerror = (msg) => { document.body.setAttribute("data-selftest", "error: " + msg); };
(function () {
  const sel = document.getElementById("layer-select");
  let groups = 0, cells = 0;
  for (const option of [...sel.options]) {
    sel.value = option.value; sel.dispatchEvent(new Event("change"));
    for (const item of [...document.querySelectorAll(".group-item")]) {
      document.querySelector(`.group-item[data-id="${item.dataset.id}"]`).click(); groups++;
      const cell = document.querySelector("#members svg rect");
      cell.dispatchEvent(new MouseEvent("mouseenter")); cells++;
    }
  }
  document.querySelector("#graph g.node").dispatchEvent(new MouseEvent("click", {bubbles: true}));
  const info = document.getElementById("node-info").style.display;
  if (!document.body.hasAttribute("data-selftest"))
    document.body.setAttribute("data-selftest", `ok groups=${groups} cells=${cells} info=${info}`);
})();
</script></body>"""


def _tiny_graph():
    config = AutoConfig.from_pretrained(TINY)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return build_graph(model)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    graph = _tiny_graph()
    path = tmp_path_factory.mktemp("html") / "groups.html"
    write_html(graph, path, layer=2)
    return graph, path


def _embedded(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    match = re.search(r'<script type="application/json" id="depgraph-data">(.*?)</script>', text, re.S)
    return json.loads(match.group(1))


def test_page_is_self_contained(page):
    _, path = page
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert not re.search(r"""(src|href)\s*=\s*["']?(?!#)[a-z]+:""", text, re.I)
    assert not re.search(r"@import|url\(\s*['\"]?(//|[a-z]+:)", text, re.I)
    assert not list(path.parent.glob(".*"))  # written atomically, no temporary file left


def test_page_has_every_layer_and_group(page):
    graph, path = page
    data = _embedded(path)
    assert data["initial"] == 2
    assert [layer["key"] for layer in data["layers"]] == ["all", 0, 1, 2, 3, 4]
    assert [g["id"] for g in data["groups"]] == [g.id for g in graph.groups()]
    groups = {g["id"]: g for g in data["groups"]}
    for layer in data["layers"][1:]:
        assert {groups[i]["kind"] for i in layer["groups"]} == {"kv_group", "query_head", "mlp"}
        assert layer["touching"] == ["hidden"]
        assert 0 < len(layer["nodes"]) <= MAX_NODES and layer["edges"]
        nodes = [dict(zip(data["node_fields"], row, strict=True)) for row in layer["nodes"]]
        modules = {n["module"] for n in nodes if not n["outside"] and n["module"]}
        assert all(m.startswith(f"model.layers.{layer['key']}") for m in modules)
    attention = groups["model.layers.2.self_attn"]
    q_proj = attention["members"][0]
    assert q_proj["param"].endswith("q_proj.weight") and q_proj["per_unit"] == 16
    assert q_proj["strip"] == sorted(q_proj["strip"]) and set(q_proj["strip"]) == {0, 1, 2, 3}


def test_bad_layer_is_rejected(page):
    graph, _ = page
    with pytest.raises(ValueError, match="layer 9"):
        page_data(graph, layer=9)


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def _run_browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    browser = _browser()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: install it with `apt-get install -y chromium`")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    profile = tmp_path / "profile"
    return subprocess.run([browser, *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


def _png_pixels(path: Path) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB(A) rows of an 8-bit PNG (the screenshots chromium writes)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width = 8, b"", 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw, stride, rows, prev = zlib.decompress(idat), width * channels, [], bytearray(width * channels)
    for y in range(height):
        kind, line = raw[y * (stride + 1)], bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for x in range(stride):
            left = line[x - channels] if x >= channels else 0
            up, corner = prev[x], prev[x - channels] if x >= channels else 0
            if kind == 1:
                line[x] = (line[x] + left) & 255
            elif kind == 2:
                line[x] = (line[x] + up) & 255
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 255
            elif kind == 4:
                p = left + up - corner
                best = min((abs(p - left), 0, left), (abs(p - up), 1, up), (abs(p - corner), 2, corner))
                line[x] = (line[x] + best[2]) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, [bytes(r[i:i + 3]) for r in rows for i in range(0, stride, channels)]


def test_browser_renders_groups(page, tmp_path):
    graph, path = page
    result = _run_browser(tmp_path, "--dump-dom", path.as_uri())
    dom = result.stdout
    assert 'data-rendered="1"' in dom, result.stderr[-2000:]
    items = re.findall(r'class="group-item[^"]*" data-id="([^"]+)"', dom)
    assert items == ["model.layers.2.self_attn", "model.layers.2.self_attn.query_head",
                     "model.layers.2.mlp", "hidden"]
    assert dom.count('class="member"') == 4  # q, k, v, o of the selected KV group
    assert dom.count('class="node"') > 20


def test_browser_interaction_has_no_script_errors(page, tmp_path):
    _, path = page
    probe = tmp_path / "probe.html"
    probe.write_text(path.read_text(encoding="utf-8").replace("</body>", SELF_TEST, 1))
    dom = _run_browser(tmp_path, "--dump-dom", probe.as_uri()).stdout
    status = re.search(r'data-selftest="([^"]*)"', dom)
    assert status and status.group(1) == "ok groups=21 cells=21 info=block", dom[-500:]


def test_browser_screenshot_is_not_blank(page, tmp_path):
    _, path = page
    shot = tmp_path / "shot.png"
    result = _run_browser(tmp_path, f"--screenshot={shot}", path.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000, result.stderr[-2000:]
    width, height, pixels = _png_pixels(shot)
    assert (width, height) == (1200, 800)
    counts = Counter(pixels)
    assert len(counts) > 50
    background, most = counts.most_common(1)[0]
    assert len(pixels) - most > 0.1 * len(pixels)  # not one flat colour
    selected = sum(all(abs(a - b) <= 12 for a, b in zip(p, SELECTED, strict=True)) for p in pixels)
    assert selected > 200  # the selected group's channels are drawn in the graph
