"""The docs' screenshots: docs/images/text-to-image.png (the README's) and one per ControlNet-style template
(docs/graphs.md), each example as ComfyUI's graph editor shows it once opened, before any run (so no image yet),
taken from a real ComfyUI in Debian's Chromium.

Regenerate it with `NEXTSTEP_UPDATE_SCREENSHOTS=1 python -m pytest -q tests/test_docs_screenshot.py` (ComfyUI and
Chromium set up as for the browser tests: docs/development.md). Without that variable the test takes each
screenshot again and checks that the committed file is what the command gives. The server has no NextStep-1.1
(only the test fixtures) and no Hub to ask (offline), so the Model Loader's panel says where a run fetches it to;
nor the SDXL checkpoint and ControlNet the graphs name, which the editor shows by name as it does any model not
installed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from browser_page import SCREENSHOTS, Page, launched_chromium, open_page
from comfyui_server import running_comfyui
from nodes_pack import ROOT
from PIL import Image

SHOTS = {  # committed image -> (example, viewport: the example's shape plus the page's bars)
    "text-to-image.png": ("nextstep_1.1_text_to_image", {"width": 2200, "height": 920}),
    "graph-nextstep-then-controlnet.png": ("nextstep_1.1_then_sdxl_controlnet", {"width": 2720, "height": 1880}),
    "graph-controlnet-then-edit.png": ("nextstep_sdxl_controlnet_then_edit", {"width": 2320, "height": 2200}),
    "graph-controlnet-then-inpaint.png": ("nextstep_sdxl_controlnet_then_inpaint", {"width": 2320, "height": 2200}),
}
"""Each viewport shows its whole graph at 100 % zoom, its text as a user reads it."""
IMAGES = ROOT / "docs" / "images"
SERVER_ROOT = Path(tempfile.gettempdir()) / "nextstep-docs-screenshot"
"""The server's folders, at the same path on every run: the loader's panel shows where a run would fetch the model,
and a path that changed with each run (pytest's numbered temp folders) would change the picture."""
UPDATE = os.environ.get("NEXTSTEP_UPDATE_SCREENSHOTS", "") not in ("", "0")
SETTINGS = {"Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}
"""Off: the minimap (it covers a corner of the graph) and the canvas's frame-rate line (it differs every time)."""
MARGINS = {"left": 90, "top": 120, "right": 40, "bottom": 80}
"""Canvas pixels left to the side bar, to the workflow name and Run button, and to the canvas toolbar."""
CHANGED_LEVEL = 32
"""A pixel has changed when a channel differs by more than this (of 255)."""
MAX_CHANGED_FRACTION = 0.00005
MAX_MEAN_DIFFERENCE = 0.01
"""How far a screenshot may be from the committed one (about 100 of its 2 million pixels). Measured here: two runs
gave the same pixels (no pixel changed, mean 0); the Sampler moved 10 px changes 0.78 % of the pixels (mean 0.97),
one word of the Note replaced 0.011 % (mean 0.013)."""

FIT_WHOLE_GRAPH = """margins => {  // the canvas's own fit view fills 3/4 of the view: zoom out just enough, at most 1
    const rects = app.graph.nodes.map(node => Array.from(node.boundingRect));
    const left = Math.min(...rects.map(r => r[0])), top = Math.min(...rects.map(r => r[1]));
    const width = Math.max(...rects.map(r => r[0] + r[2])) - left;
    const height = Math.max(...rects.map(r => r[1] + r[3])) - top;
    const box = app.canvas.canvas.getBoundingClientRect();
    const room = [box.width - margins.left - margins.right, box.height - margins.top - margins.bottom];
    const scale = Math.min(1, room[0] / width, room[1] / height);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [margins.left / scale - left + (room[0] / scale - width) / 2, margins.top / scale - top];
    app.graph.setDirtyCanvas(true, true);
    return {scale, rects};
}"""


def overlapping(rects: list[list[float]]) -> list[tuple[int, int]]:
    """Pairs of [x, y, w, h] rectangles that overlap."""
    return [(i, j) for i, a in enumerate(rects) for j, b in enumerate(rects[i + 1:], i + 1)
            if a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]]


def take_screenshot(root: Path, path: Path, example: str, viewport: dict) -> dict:
    """Open the example in a fresh ComfyUI page, fit the whole graph, wait for the loader's panel, and save the
    page as `path`; returns what the fit found (zoom, node rectangles) and the types of the nodes the editor does
    not know."""
    with running_comfyui(root, SETTINGS) as server, launched_chromium() as browser:  # offline (comfyui_server.NO_HUB)
        page: Page = open_page(browser, server, "canvas")
        page.page.set_viewport_size(viewport)
        page.js("""async ([workflow, name]) => {
            await app.loadGraphData(workflow, true, true, name, {showMissingModelsDialog: false});
        }""", [json.loads((ROOT / "example_workflows" / f"{example}.json").read_text()), example])
        page.page.wait_for_function("""() => {  // the plan's question answered, not "memory plan: …"
            const loader = app.graph.nodes.find(node => node.type === 'NextStepModelLoader');
            return !loader.widgets.find(w => w.name === 'nextstep_plan').element.innerText.includes('…');
        }""")
        fit = page.js(FIT_WHOLE_GRAPH, MARGINS)
        fit["unknown"] = page.js("() => app.graph.nodes.filter(node => !LiteGraph.registered_node_types[node.type])"
                                 ".map(node => node.type)")
        page.page.wait_for_timeout(500)
        page.page.screenshot(path=path)
        page.page.close()
    return fit


def difference(a: Path, b: Path) -> tuple[tuple[int, int], tuple[int, int], float, float]:
    """Both sizes, the fraction of pixels that changed (CHANGED_LEVEL) and the mean absolute difference."""
    first, second = (np.asarray(Image.open(path).convert("RGB"), dtype=np.int16) for path in (a, b))
    if first.shape != second.shape:
        return first.shape[:2], second.shape[:2], 1.0, 255.0
    delta = np.abs(first - second)
    return first.shape[:2], second.shape[:2], float((delta.max(axis=2) > CHANGED_LEVEL).mean()), float(delta.mean())


@pytest.mark.parametrize("image", SHOTS, ids=lambda image: image.removesuffix(".png"))
def test_the_screenshot_command_makes_the_committed_image(image):
    """The whole example is in view at full size with no node over another and none missing, and the image is the
    committed one (or, with NEXTSTEP_UPDATE_SCREENSHOTS, becomes it)."""
    example, viewport = SHOTS[image]
    committed = IMAGES / image
    taken = committed if UPDATE else SCREENSHOTS / image
    taken.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(SERVER_ROOT, ignore_errors=True)
    SERVER_ROOT.mkdir()
    try:
        fit = take_screenshot(SERVER_ROOT, taken, example, viewport)
    finally:
        shutil.rmtree(SERVER_ROOT, ignore_errors=True)
    assert fit["scale"] == 1, f"the example does not fit {viewport} at 100 % zoom: {fit}"
    assert overlapping(fit["rects"]) == []
    assert fit["unknown"] == []
    if not UPDATE:
        committed_size, taken_size, changed, mean = difference(committed, taken)
        assert taken_size == committed_size
        assert changed <= MAX_CHANGED_FRACTION and mean <= MAX_MEAN_DIFFERENCE, (
            f"{taken} differs from {committed}: {changed:.2%} of the pixels changed, mean difference {mean:.2f}; "
            f"if the change is meant, regenerate it (docs/development.md)")
