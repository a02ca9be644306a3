"""The front-end extension (web/js) in a real ComfyUI page, driven in Debian's headless Chromium by playwright.

One server and one browser per module; one page per canvas mode (the classic LiteGraph canvas and Nodes 2.0),
shared by the tests of that mode. Pickers are used as a user would (click, choose); the graph is read back
through the page's `app`. Every test saves a screenshot under tests/screenshots/ (git-ignored) to look at.
Skipped locally without COMFYUI_DIR, playwright or Chromium; failed under CI (comfyui_server.missing). The page
machinery is tests/browser_page.py.
"""

from __future__ import annotations

import json
import re

import pytest
from browser_page import EXTENSION, MODES, PAGE_TIMEOUT_MS, VIEWPORT, Page, launched_chromium, open_page
from comfyui_distributed import NODE_DEFINITIONS as DISTRIBUTED_NODES
from comfyui_server import ComfyUI, running_comfyui
from nodes_pack import MODEL_NAME, ROOT

from nextstep_runtime.presets import PRESETS

EXAMPLES = ROOT / "example_workflows"
RUN_TIMEOUT_MS = 300_000
# What a fresh ComfyUI 0.8 page asks for and does not find, with or without this pack.
OUTSIDE_404 = re.compile(r"/favicon\.ico$|/user\.css$|/api/userdata(/comfy\.templates\.json|/user\.css|\?dir=)")
SAMPLER_PICKERS = ["preset", "size", "nextstep_status"]
PRESET_WIDGETS = ["steps", "cfg", "cfg_img", "timesteps_shift", "sampler", "profile", "use_norm", "width", "height"]


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> ComfyUI:
    with running_comfyui(tmp_path_factory.mktemp("comfyui")) as running:
        yield running


@pytest.fixture(scope="module")
def browser():
    with launched_chromium() as launched:
        yield launched


@pytest.fixture(scope="module", params=list(MODES))
def page(request, browser, server) -> Page:
    opened = open_page(browser, server, request.param)
    yield opened
    opened.page.close()


def test_extension_loads_without_console_errors_of_its_own(page):
    page.screenshot("loaded")
    assert page.js("() => app.extensions.filter(e => e.name.startsWith('NextStep')).length") == 1
    assert [request for request in page.failed_requests if not OUTSIDE_404.search(request)] == []
    own_errors = [error for error in page.console_errors
                  if not ("Failed to load resource" in error and OUTSIDE_404.search(error.rstrip(")")))]
    assert own_errors == []


def test_sampler_shows_pickers_and_each_preset_sets_the_table(page):
    loader, sampler = page.new_graph(["NextStepModelLoader", "NextStepSampler"])
    page.js("([a, b]) => app.graph.getNodeById(a).connect(0, app.graph.getNodeById(b), 0)", [loader, sampler])
    names = page.js("id => app.graph.getNodeById(id).widgets.map(w => w.name)", sampler)
    assert names[-3:] == SAMPLER_PICKERS
    assert page.js("id => app.graph.getNodeById(id).widgets.slice(-3).every(w => w.serialize === false && "
                   "w.options.serialize === false)", sampler)
    assert "1024 tokens · 2 guidance rows" in page.panel(sampler, "nextstep_status")
    plan_text = "id => app.graph.getNodeById(id).widgets.find(w => w.name === 'nextstep_plan').element.innerText"
    page.page.wait_for_function(f"id => /^fits/.test(({plan_text})(id))", arg=loader)
    float32_weights = re.search(r"weights (\S+ \S+) · KV cache", page.js(plan_text, loader))[1]
    page.pick(loader, "dtype", "bfloat16")  # the plan is asked again for the new mode: half the weights
    page.page.wait_for_function(f"([id, before]) => {{ const text = ({plan_text})(id); return /^fits/.test(text) && "
                                f"!text.includes(`weights ${{before}} `); }}", arg=[loader, float32_weights])
    assert "loads as bfloat16" in page.js(plan_text, loader)
    page.pick(loader, "memory", "fp8")  # the loader's memory widget changes the planned mode too
    page.page.wait_for_function(f"id => ({plan_text})(id).includes('loads as bfloat16, fp8')", arg=loader)
    for name, preset in PRESETS.items():
        page.pick(sampler, "preset", "custom" if name == "NextStep-1.1" else name)  # a change every time
        page.pick(sampler, "preset", name)
        values = page.widgets(sampler)
        assert {key: values[key] for key in PRESET_WIDGETS} == {key: getattr(preset, key) for key in PRESET_WIDGETS}
        assert values["preset"] == name
        if preset.negative:
            assert f"negative prompt: {preset.negative}" in page.panel(sampler, "nextstep_status")
    page.screenshot("presets")


def test_loader_panel_shows_the_install_warnings_of_its_chosen_settings(page):
    """GET /nextstep/doctor's warnings, those of the loader's chosen values only: this server has no GPU, so choosing
    flash-attn warns with that reason (auto, quiet where flash-attn is simply absent, does not)."""
    (loader,) = page.new_graph(["NextStepModelLoader"])
    assert "flash-attn" not in page.panel(loader, "nextstep_plan")
    page.pick(loader, "attention", "flash_attn")
    page.page.wait_for_function("id => app.graph.getNodeById(id).widgets.find(w => w.name === 'nextstep_plan')"
                                ".element.innerText.includes('flash-attn unavailable: flash-attn runs on CUDA GPUs only')",
                                arg=loader)
    warning = page.js("id => [...app.graph.getNodeById(id).widgets.find(w => w.name === 'nextstep_plan')"
                      ".element.children].at(-1).dataset.tone", loader)
    assert warning == "warn"
    page.screenshot("install-warning")
    page.pick(loader, "attention", "sdpa")
    assert "flash-attn" not in page.panel(loader, "nextstep_plan")
    # the loader's device is the one checked: one this server lacks is said so
    page.js("id => { const widget = app.graph.getNodeById(id).widgets.find(w => w.name === 'device'); "
            "widget.value = 'cuda:0'; widget.callback('cuda:0'); }", loader)
    page.page.wait_for_function("id => app.graph.getNodeById(id).widgets.find(w => w.name === 'nextstep_plan')"
                                ".element.innerText.includes('install check unavailable: device cuda:0 was asked for')",
                                arg=loader)


def test_loader_panel_warns_that_compile_is_unavailable_without_a_compiler(browser, tmp_path):
    """A server whose C++ compiler is missing (CXX pointing nowhere, compiling not turned off): the loader, compile
    off (the CPU's default) says nothing of it; compile on, it says compile is unavailable and runs uncompiled."""
    broken = {"CXX": "/nowhere/g++", "TORCH_COMPILE_DISABLE": None}
    with running_comfyui(tmp_path, env=broken) as server:
        page = open_page(browser, server, "canvas")
        (loader,) = page.new_graph(["NextStepModelLoader"])
        assert page.widgets(loader)["compile"] is False
        page.page.wait_for_function("id => /^fits/.test(app.graph.getNodeById(id).widgets"
                                    ".find(w => w.name === 'nextstep_plan').element.innerText)", arg=loader)
        assert "compile unavailable" not in page.panel(loader, "nextstep_plan")
        page.js("id => { const widget = app.graph.getNodeById(id).widgets.find(w => w.name === 'compile'); "
                "widget.value = true; widget.callback(true); }", loader)
        page.page.wait_for_function("id => app.graph.getNodeById(id).widgets.find(w => w.name === 'nextstep_plan')"
                                    ".element.innerText.includes('compile unavailable: no C++ compiler')", arg=loader)
        assert "; running uncompiled" in page.panel(loader, "nextstep_plan")
        page.screenshot("compile-warning")
        page.page.close()


def test_size_picker_sets_width_and_height(page):
    (sampler,) = page.new_graph(["NextStepSampler"])
    page.pick(sampler, "size", "384x672 (4:7)")
    values = page.widgets(sampler)
    assert (values["width"], values["height"], values["preset"]) == (384, 672, "custom")
    assert "1008 tokens" in page.panel(sampler, "nextstep_status")  # 24 x 42 tokens
    page.pick(sampler, "size", "576x448 (9:7)")
    values = page.widgets(sampler)
    assert (values["width"], values["height"]) == (576, 448)
    page.screenshot("sizes")


def example(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def export(page: Page, workflow: dict) -> dict:
    """Load a UI workflow into the page and return what saving it and exporting its API prompt give."""
    return page.js("""async workflow => {
        await app.loadGraphData(workflow, true, true, null, {showMissingModelsDialog: false,
                                                             showMissingNodesDialog: false});
        const {workflow: saved, output} = await app.graphToPrompt();
        return JSON.parse(JSON.stringify({saved, output}));
    }""", workflow)


HAS_PICKERS = "() => LiteGraph.createNode('NextStepSampler').widgets.some(w => w.name === 'preset')"


def test_examples_save_and_export_the_same_with_and_without_the_extension(page, browser, server):
    names = sorted(path.stem for path in EXAMPLES.glob("*.json"))
    with_extension = {name: export(page, example(name)) for name in names}
    page.screenshot("example-with-extension", whole_graph=True)
    assert page.js(HAS_PICKERS)
    assert server.request("/settings/Comfy.Extension.Disabled", [EXTENSION])[0] == 200
    try:
        plain = Page(browser.new_page(viewport=VIEWPORT), page.mode)
        plain.page.set_default_timeout(PAGE_TIMEOUT_MS)
        plain.page.goto(server.url)
        plain.page.wait_for_function("() => window.app?.graph && window.app.extensions?.length")
        assert not plain.js(HAS_PICKERS)
        without_extension = {name: export(plain, example(name)) for name in names}
        plain.screenshot("example-without-extension", whole_graph=True)
        plain.page.close()
    finally:
        assert server.request("/settings/Comfy.Extension.Disabled", [])[0] == 200
    for name in names:
        # This server has no ComfyUI-Distributed: the page keeps the distributed example's Distributed Seed and
        # Collector as unknown nodes (no class_type in the prompt; test_distributed.py runs that example on
        # servers with the extension); every other node, this pack's included, must be known and compared.
        unknown = {key for key, node in with_extension[name]["output"].items() if "class_type" not in node}
        assert unknown == {str(node["id"]) for node in example(name)["nodes"]
                           if node["type"] in DISTRIBUTED_NODES}, name
        assert with_extension[name]["output"] == without_extension[name]["output"], name
        nodes = {node["id"]: node for node in without_extension[name]["saved"]["nodes"]}
        for node in with_extension[name]["saved"]["nodes"]:  # node by node first, for a readable failure
            assert node == nodes[node["id"]], (name, node["type"])
        assert with_extension[name]["saved"] == without_extension[name]["saved"], name
        sampler = next(node for node in with_extension[name]["saved"]["nodes"] if node["type"] == "NextStepSampler")
        assert sampler["widgets_values"] == next(node["widgets_values"] for node in example(name)["nodes"]
                                                 if node["type"] == "NextStepSampler")


def load_runnable_example(page: Page, width: int, height: int, steps: int) -> dict:
    """The text-to-image example on the page with the fixture model, a size and steps; returns node ids by
    type. The sampler's status panel records every text it shows in window.nextstepTexts."""
    page.js("""async workflow => {
        await app.loadGraphData(workflow, true, true, null, {showMissingModelsDialog: false});
    }""", example("nextstep_1.1_text_to_image"))
    ids = page.js("""() => {
        const byType = Object.fromEntries(app.graph.nodes.map(node => [node.type, node]));
        const status = byType.NextStepSampler.widgets.find(w => w.name === 'nextstep_status').element;
        window.nextstepTexts = [];
        new MutationObserver(() => window.nextstepTexts.push(status.innerText))
            .observe(status, {childList: true, subtree: true, characterData: true});
        return Object.fromEntries(Object.entries(byType).map(([type, node]) => [type, node.id]));
    }""")
    set_widgets(page, ids["NextStepModelLoader"], model_name=MODEL_NAME)
    set_widgets(page, ids["NextStepVAELoader"], vae_name=f"{MODEL_NAME}/vae")
    set_widgets(page, ids["NextStepSampler"], width=width, height=height, steps=steps)
    return ids


def set_widgets(page: Page, node_id: int, **values) -> None:
    """Set widgets through their callbacks, as an edit on the node does (Nodes 2.0 shows them then)."""
    page.js("""([id, values]) => {
        const node = app.graph.getNodeById(id);
        for (const [name, value] of Object.entries(values)) {
            const widget = node.widgets.find(w => w.name === name);
            widget.value = value;
            widget.callback?.(value);
        }
    }""", [node_id, values])


def run_button(page: Page):
    return page.page.get_by_role("button", name="Run", exact=True)


def status_texts(page: Page) -> list[str]:
    return page.js("() => window.nextstepTexts")


def wait_for_status(page: Page, server: ComfyUI, sampler: int, pattern: str) -> re.Match:
    try:
        page.page.wait_for_function("""([id, pattern]) => new RegExp(pattern).test(
            app.graph.getNodeById(id).widgets.find(w => w.name === 'nextstep_status').element.innerText)""",
                                    arg=[sampler, pattern], timeout=RUN_TIMEOUT_MS)
    except Exception as exc:  # playwright's timeout, with what the page and the server showed instead
        raise AssertionError(f"no {pattern!r} in {status_texts(page)[-5:]}\n{server.log_tail()}") from exc
    return re.search(pattern, page.panel(sampler, "nextstep_status"))


def test_text_to_image_example_runs_from_the_page_with_live_progress(page, server):
    ids = load_runnable_example(page, width=64, height=64, steps=2)
    sampler = ids["NextStepSampler"]
    assert "16 tokens · 2 guidance rows" in page.panel(sampler, "nextstep_status")
    run_button(page).click()
    wait_for_status(page, server, sampler, r"token 16 / 16 · done in \d+:\d\d")
    page.page.wait_for_function("id => app.nodeOutputs[String(id)]?.images?.length === 1", arg=ids["SaveImage"])
    image = page.js("id => app.nodeOutputs[String(id)].images[0]", ids["SaveImage"])
    assert image["filename"].endswith(".png") and image["type"] == "output"
    assert any(re.search(r"token \d+ / 16", text) for text in status_texts(page)[:-1])  # shown while running
    page.page.wait_for_timeout(500)
    page.screenshot("run", whole_graph=True)


def test_cancel_from_the_page_shows_where_it_stopped_and_the_next_run_works(page, server):
    ids = load_runnable_example(page, width=512, height=512, steps=100)
    sampler = ids["NextStepSampler"]
    run_button(page).click()
    running = wait_for_status(page, server, sampler, r"token (\d+) / 1024 · [\d.]+ tok/s · [\d:]+ left")
    assert 0 < int(running[1]) < 1024
    page.screenshot("running", whole_graph=True)
    page.page.get_by_role("button", name="Cancel current run").click()
    stopped = wait_for_status(page, server, sampler, r"stopped at token (\d+) / 1024")
    assert int(running[1]) <= int(stopped[1]) < 1024
    page.screenshot("stopped", whole_graph=True)
    set_widgets(page, sampler, width=64, height=64, steps=2)
    run_button(page).click()
    wait_for_status(page, server, sampler, r"token 16 / 16 · done in")
    page.page.wait_for_function("id => app.nodeOutputs[String(id)]?.images?.length === 1", arg=ids["SaveImage"])
    page.screenshot("after-cancel", whole_graph=True)
