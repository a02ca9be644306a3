"""A ComfyUI page in Debian's headless Chromium, driven by playwright: for the browser tests and the documentation's
screenshots (tests/test_browser.py, tests/test_docs_screenshot.py).

Chromium is Debian's (`apt-get install chromium`), never one `playwright install` downloads; without it or
playwright a test skips locally and fails under CI (comfyui_server.missing).
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Iterator

from comfyui_server import ComfyUI, missing
from nodes_pack import ROOT

SCREENSHOTS = ROOT / "tests" / "screenshots"
CHROMIUM_PATHS = ("/usr/lib/chromium/chromium", "/usr/bin/chromium")
EXTENSION = "NextStep.Nodes"
MODES = {"canvas": False, "nodes2": True}
"""Canvas modes by name: the classic LiteGraph canvas and Nodes 2.0 (the setting Comfy.VueNodes.Enabled)."""
PAGE_TIMEOUT_MS = 120_000
VIEWPORT = {"width": 1600, "height": 1000}
MENU_ATTEMPTS, MENU_WAIT_MS = 3, 15_000
"""A combo's menu is clicked open again (after Escape) when it has not opened this long after a click."""


def chromium() -> str:
    path = os.environ.get("CHROMIUM") or next((path for path in CHROMIUM_PATHS if Path(path).exists()), None)
    if path is None:
        missing("Chromium not found (apt-get install chromium chromium-driver, or set CHROMIUM)")
    return path


@contextlib.contextmanager
def launched_chromium() -> Iterator[object]:
    """A headless Chromium (playwright's Browser) for the duration of the block."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install -e '.[test]')")
    executable = chromium()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        try:
            yield launched
        finally:
            launched.close()


class Page:
    """A ComfyUI page in one canvas mode, with what its console and network reported."""

    def __init__(self, page, mode: str) -> None:
        self.page, self.mode = page, mode
        self.console_errors: list[str] = []
        self.failed_requests: list[str] = []
        page.on("console", lambda message: message.type in ("error", "warning") and self.console_errors.append(
            f"{message.type}: {message.text} ({message.location.get('url', '')})"))
        page.on("pageerror", lambda error: self.console_errors.append(f"pageerror: {error}"))
        page.on("response", lambda response: response.status >= 400 and self.failed_requests.append(
            f"{response.status} {response.url}"))

    def js(self, script: str, argument=None):
        return self.page.evaluate(script, argument)

    def fit_view(self) -> None:
        """Zoom and pan so that the whole graph is in view, as the canvas's "fit view" does."""
        self.js("() => app.extensionManager.command.execute('Comfy.Canvas.FitView')")
        self.page.wait_for_timeout(300)

    def screenshot(self, name: str, whole_graph: bool = False) -> None:
        if whole_graph:
            self.fit_view()
        SCREENSHOTS.mkdir(exist_ok=True)
        self.page.screenshot(path=SCREENSHOTS / f"{name}-{self.mode}.png")

    def new_graph(self, node_types: list[str]) -> list[int]:
        """Clear the graph and add the nodes side by side; returns their ids."""
        return self.js("""types => {
            app.graph.clear();
            let x = 40;
            const ids = types.map(type => {
                const node = LiteGraph.createNode(type);
                node.pos = [x, 80];
                app.graph.add(node);
                x += node.size[0] + 60;
                return node.id;
            });
            app.canvas.ds.offset = [40, 40]; app.canvas.ds.scale = 1; app.graph.setDirtyCanvas(true, true);
            return ids;
        }""", node_types)

    def widgets(self, node_id: int) -> dict:
        return self.js("id => Object.fromEntries(app.graph.getNodeById(id).widgets.map(w => [w.name, w.value]))",
                       node_id)

    def panel(self, node_id: int, name: str) -> str:
        return self.js("([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name)"
                       ".element.innerText", [node_id, name])

    def pick(self, node_id: int, widget: str, value: str) -> None:
        """Choose `value` in a combo widget with the mouse, as a user does in this canvas mode."""
        if self.mode == "nodes2":
            self.page.locator(f'[data-node-id="{node_id}"] [role="combobox"][aria-label="{widget}"]').click()
            self.page.get_by_role("option", name=value, exact=True).click()
        else:
            from playwright.sync_api import TimeoutError as PlaywrightTimeout

            entry = self.page.locator(".litecontextmenu .litemenu-entry", has_text=re.compile(f"^{re.escape(value)}$"))
            for attempt in range(MENU_ATTEMPTS):
                self.page.mouse.click(*self._widget_centre(node_id, widget))
                try:
                    entry.wait_for(timeout=MENU_WAIT_MS)
                    break
                except PlaywrightTimeout:  # the node was laid out again between measuring and clicking
                    self.screenshot(f"menu-not-open-{widget}-{attempt}")
                    self.page.keyboard.press("Escape")
            else:
                raise AssertionError(f"clicking {widget!r} {MENU_ATTEMPTS} times opened no menu holding {value!r} "
                                     f"(screenshots menu-not-open-*)")
            entry.click()
        self.page.wait_for_timeout(100)

    def _widget_centre(self, node_id: int, widget: str) -> tuple[float, float]:
        """Where a widget is on the screen now: the node is laid out first (arrange), as drawing it would, so a
        node added or resized since the last frame is measured as it will be drawn."""
        return tuple(self.js("""([id, name]) => {
            const node = app.graph.getNodeById(id);
            node.arrange();
            const widget = node.widgets.find(w => w.name === name);
            const box = app.canvas.canvas.getBoundingClientRect();
            const [ox, oy] = app.canvas.ds.offset, scale = app.canvas.ds.scale;
            const at = [node.pos[0] + node.size[0] / 2, node.pos[1] + widget.y + LiteGraph.NODE_WIDGET_HEIGHT / 2];
            return [(at[0] + ox) * scale + box.left, (at[1] + oy) * scale + box.top];
        }""", [node_id, widget]))


def open_page(browser, server: ComfyUI, mode: str) -> Page:
    """A new page (its own browser context) on `server` in canvas mode `mode`, once the pack's extension is loaded."""
    assert server.request("/settings/Comfy.VueNodes.Enabled", MODES[mode])[0] == 200
    page = Page(browser.new_page(viewport=VIEWPORT), mode)
    page.page.set_default_timeout(PAGE_TIMEOUT_MS)
    page.page.goto(server.url)
    page.page.wait_for_function("name => window.app?.graph && window.app.extensions?.some(e => e.name === name)",
                                arg=EXTENSION)
    page.page.wait_for_timeout(500)
    return page
