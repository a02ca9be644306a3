"""The example workflows agree with the node definitions, and each UI workflow with its API-format twin.

Nodes from outside this pack are checked against definitions written down here (ComfyUI's core nodes) or in
comfyui_distributed.py (ComfyUI-Distributed's, which test_distributed.py checks against the running extension).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from comfyui_distributed import NODE_DEFINITIONS as DISTRIBUTED_NODES
from comfyui_distributed import distributed
from front_end_layout import layout
from nodes_pack import ROOT, load_pack

EXAMPLES = ROOT / "example_workflows"
UI_WORKFLOWS = sorted(EXAMPLES.glob("*.json"))
NODES = load_pack().NODE_CLASS_MAPPINGS
SEED_CONTROLS = ("fixed", "increment", "decrement", "randomize")
NATIVE = {
    # ComfyUI 0.8 core nodes used by the examples: (socket inputs, widgets in UI order, output types).
    # LoadImage's "upload" is a UI-only button widget; the end-to-end test runs the API twins in ComfyUI.
    "LoadImage": ([], ["image", "upload"], ["IMAGE", "MASK"]),
    "ImageScale": (["image"], ["upscale_method", "width", "height", "crop"], ["IMAGE"]),
    "ImageScaleBy": (["image"], ["upscale_method", "scale_by"], ["IMAGE"]),
    "SaveImage": (["images"], ["filename_prefix"], []),
    "ImagePadForOutpaint": (["image"], ["left", "top", "right", "bottom", "feathering"], ["IMAGE", "MASK"]),
    "SetLatentNoiseMask": (["samples", "mask"], [], ["LATENT"]),
    "PreviewImage": (["images"], [], []),
    "Note": ([], ["text"], []),
    "CheckpointLoaderSimple": ([], ["ckpt_name"], ["MODEL", "CLIP", "VAE"]),
    "ControlNetLoader": ([], ["control_net_name"], ["CONTROL_NET"]),
    "CLIPTextEncode": (["clip"], ["text"], ["CONDITIONING"]),
    "ControlNetApplyAdvanced": (["positive", "negative", "control_net", "image", "vae"],
                                ["strength", "start_percent", "end_percent"], ["CONDITIONING", "CONDITIONING"]),
    "Canny": (["image"], ["low_threshold", "high_threshold"], ["IMAGE"]),
    "EmptyLatentImage": ([], ["width", "height", "batch_size"], ["LATENT"]),
    "KSampler": (["model", "positive", "negative", "latent_image"],
                 ["seed", "seed:control", "steps", "cfg", "sampler_name", "scheduler", "denoise"], ["LATENT"]),
    "VAEDecode": (["samples", "vae"], [], ["IMAGE"]),
}
UI_ONLY_WIDGETS = {"upload"}
UI_ONLY_NODES = {"Note"}  # front-end only: not in API prompts
TITLE_HEIGHT = 30  # LiteGraph draws a node's title above its pos
PREVIEW_ROOM = 400  # kept free below each sampler: its live preview and result grow it downwards


def definition(node_type: str) -> tuple[list[str], list[str], list[str]]:
    """(socket input names, widget names in the order the front-end saves them, output types)."""
    if node_type in NATIVE:
        return NATIVE[node_type]
    if node_type in DISTRIBUTED_NODES:
        return DISTRIBUTED_NODES[node_type]
    return layout(all_inputs(node_type), NODES[node_type].RETURN_TYPES)


def all_inputs(node_type: str) -> dict:
    inputs = NODES[node_type].INPUT_TYPES()
    return {**inputs["required"], **inputs.get("optional", {})}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def api_twin(path: Path) -> dict:
    return load(EXAMPLES / "api" / path.name)


def named_widgets(node: dict) -> dict:
    _, widgets, _ = definition(node["type"])
    assert len(node["widgets_values"]) == len(widgets), f"node {node['id']} ({node['type']}) widget count"
    return dict(zip(widgets, node["widgets_values"]))


def test_every_ui_workflow_has_an_api_twin():
    assert [path.name for path in UI_WORKFLOWS] == sorted(path.name for path in (EXAMPLES / "api").glob("*.json"))
    assert len(UI_WORKFLOWS) == 10


def optional_sockets(node_type: str) -> set[str]:
    if node_type not in NODES:
        return set()
    return set(NODES[node_type].INPUT_TYPES().get("optional", {}))


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda path: path.stem)
def test_ui_workflow_matches_node_definitions(path):
    workflow = load(path)
    assert workflow["version"] == 0.4
    links = {link[0]: link for link in workflow["links"]}
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        sockets, widgets, outputs = definition(node["type"])
        # a widget turned into a socket (a linked seed) keeps its value in widgets_values and names its widget
        assert all(slot["widget"]["name"] == slot["name"] in widgets for slot in node["inputs"] if "widget" in slot)
        # a workflow saved before an optional input existed lacks its socket; the front-end adds it on load
        saved = [slot["name"] for slot in node["inputs"] if "widget" not in slot]
        assert saved == [name for name in sockets if name in saved], f"node {node['id']} inputs"
        assert set(sockets) - set(saved) <= optional_sockets(node["type"]), f"node {node['id']} inputs"
        assert [slot["type"] for slot in node["outputs"]] == outputs, f"node {node['id']} outputs"
        for name, value in named_widgets(node).items():
            if name.endswith(":control"):
                assert value in SEED_CONTROLS
            elif node["type"] in NODES and isinstance(all_inputs(node["type"])[name][0], list):
                options = all_inputs(node["type"])[name][0]
                assert value in options or name in ("model_name", "vae_name"), f"{name}={value!r}"
        for slot_index, slot in enumerate(node["inputs"]):
            if slot["link"] is not None:
                _, source, source_slot, target, target_slot, link_type = links[slot["link"]]
                assert (target, target_slot) == (node["id"], slot_index)
                assert link_type == slot["type"] == nodes[source]["outputs"][source_slot]["type"]


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda path: path.stem)
def test_api_twin_matches_ui_workflow(path):
    workflow, api = load(path), api_twin(path)
    nodes = [node for node in workflow["nodes"] if node["type"] not in UI_ONLY_NODES]
    assert set(api) == {str(node["id"]) for node in nodes}
    links = {link[0]: link for link in workflow["links"]}
    for node in nodes:
        twin = api[str(node["id"])]
        assert twin["class_type"] == node["type"]
        expected = {name: value for name, value in named_widgets(node).items()
                    if not name.endswith(":control") and name not in UI_ONLY_WIDGETS}
        for slot in node["inputs"]:
            if slot["link"] is not None:
                _, source, source_slot, *_ = links[slot["link"]]
                expected[slot["name"]] = [str(source), source_slot]
        assert twin["inputs"] == expected, f"node {node['id']} ({node['type']})"


def boxes(workflow: dict) -> dict[int, tuple[float, float, float, float]]:
    """(left, top, right, bottom) of every node with its title; samplers with room for their preview."""
    found = {}
    for node in workflow["nodes"]:
        (x, y), (width, height) = node["pos"], node["size"]
        room = PREVIEW_ROOM if node["type"] == "NextStepSampler" else 0
        found[node["id"]] = (x, y - TITLE_HEIGHT, x + width, y + height + room)
    return found


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda path: path.stem)
def test_no_node_overlaps_another_even_when_the_sampler_preview_appears(path):
    placed = sorted(boxes(load(path)).items())
    for index, (first, a) in enumerate(placed):
        for second, b in placed[index + 1:]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"nodes {first} and {second} overlap"


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda path: path.stem)
def test_each_workflow_has_a_note_naming_its_models(path):
    workflow = load(path)
    (text,) = [node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "Note"]
    models = {node["widgets_values"][0] for node in workflow["nodes"] if node["type"] == "NextStepModelLoader"}
    assert all(f"models/nextstep/{model}" in text for model in models) and "cfg 7.5" in text
    for loader, folder in (("CheckpointLoaderSimple", "checkpoints"), ("ControlNetLoader", "controlnet")):
        assert all(f"models/{folder}/{node['widgets_values'][0]}" in text
                   for node in workflow["nodes"] if node["type"] == loader)


def sampler_and_prompts(api: dict, sampler_id: str | None = None) -> tuple[dict, str, str | None]:
    """The (only, or `sampler_id`) sampler's inputs and the texts of its positive and negative prompts."""
    (sampler,) = [node["inputs"] for key, node in api.items()
                  if node["class_type"] == "NextStepSampler" and sampler_id in (None, key)]
    text = {key: node["inputs"].get("text") for key, node in api.items()}
    negative = sampler.get("negative")
    return sampler, text[sampler["positive"][0]], text[negative[0]] if negative else None


def test_text_to_image_examples_use_nextstep_1_1_settings():
    defaults = {name: spec[1]["default"] for name, spec in NODES["NextStepSampler"].INPUT_TYPES()["required"].items()
                if len(spec) > 1 and "default" in spec[1]}
    for name in ("nextstep_1.1_text_to_image", "nextstep_1.1_text_to_image_upscale"):
        api = load(EXAMPLES / "api" / f"{name}.json")
        sampler, _, negative = sampler_and_prompts(api)
        assert {key: sampler[key] for key in defaults} == defaults
        assert negative.startswith("lowres")
        loaders = [node["inputs"] for node in api.values() if node["class_type"].endswith("Loader")]
        assert {"model_name": "NextStep-1.1", "dtype": "auto", "attention": "auto", "fp8": False, "gpu_layers": -1,
                "memory": "auto", "compile": True, "device": "default"} in loaders
        assert {"vae_name": "NextStep-1.1/vae"} in loaders


def test_upscale_example_chains_native_nodes_into_save_image():
    api = load(EXAMPLES / "api" / "nextstep_1.1_text_to_image_upscale.json")
    by_type = {node["class_type"]: (key, node["inputs"]) for key, node in api.items()}
    decode_key, _ = by_type["NextStepVAEDecode"]
    scale_key, scale = by_type["ImageScaleBy"]
    assert scale["image"] == [decode_key, 0] and scale["scale_by"] == 2.0
    assert by_type["SaveImage"][1]["images"] == [scale_key, 0]


def test_edit_example_uses_nextstep_1_large_edit_settings():
    api = load(EXAMPLES / "api" / "nextstep_1_large_edit.json")
    sampler, positive, negative = sampler_and_prompts(api)
    assert (sampler["cfg"], sampler["cfg_img"], sampler["timesteps_shift"], sampler["use_norm"]) == (7.5, 2.0, 3.2, True)
    assert negative == "Copy original image."
    assert positive.startswith("<image>")
    (encode,) = [key for key, node in api.items() if node["class_type"] == "NextStepVAEEncode"]
    assert api[sampler["positive"][0]]["inputs"]["image"] == [encode, 0]
    assert any(node["inputs"].get("model_name") == "NextStep-1-Large-Edit" for node in api.values())


def test_outpaint_example_pads_below_and_masks_the_new_rows_into_the_sampler():
    api = load(EXAMPLES / "api" / "nextstep_1.1_outpaint.json")
    by_type = {node["class_type"]: (key, node["inputs"]) for key, node in api.items()}
    pad_key, pad = by_type["ImagePadForOutpaint"]
    assert (pad["left"], pad["top"], pad["right"], pad["bottom"]) == (0, 0, 0, 256)
    encode_key, encode = by_type["NextStepVAEEncode"]
    mask_key, noise_mask = by_type["SetLatentNoiseMask"]
    assert encode["pixels"] == [pad_key, 0]
    assert noise_mask == {"samples": [encode_key, 0], "mask": [pad_key, 1]}
    assert by_type["NextStepSampler"][1]["latent_image"] == [mask_key, 0]
    sampler_key = by_type["NextStepSampler"][0]
    assert by_type["NextStepVAEDecode"][1]["samples"] == [sampler_key, 0]


def test_inpaint_example_takes_the_mask_editors_mask():
    api = load(EXAMPLES / "api" / "nextstep_1.1_inpaint.json")
    by_type = {node["class_type"]: (key, node["inputs"]) for key, node in api.items()}
    load_key, _ = by_type["LoadImage"]
    mask_key, noise_mask = by_type["SetLatentNoiseMask"]
    assert noise_mask["mask"] == [load_key, 1]
    assert by_type["ImageScale"][1]["crop"] == "disabled"  # the mask is stretched to the scaled image, not cropped
    assert by_type["NextStepSampler"][1]["latent_image"] == [mask_key, 0]


@pytest.mark.parametrize("name", ["nextstep_1.1_outpaint", "nextstep_1.1_inpaint"])
def test_image_conditioned_examples_explain_their_limit_in_a_note(name):
    notes = [node for node in load(EXAMPLES / f"{name}.json")["nodes"] if node["type"] == "Note"]
    assert notes and "raster order" in notes[0]["widgets_values"][0]


def test_generate_then_edit_example_edits_the_generated_image_with_the_edit_model():
    api = load(EXAMPLES / "api" / "nextstep_generate_then_edit.json")
    samplers = [key for key, node in api.items() if node["class_type"] == "NextStepSampler"]
    loader_of = {key: api[api[key]["inputs"]["model"][0]]["inputs"]["model_name"] for key in samplers}
    (generate,) = [key for key in samplers if loader_of[key] == "NextStep-1.1"]
    (edit,) = [key for key in samplers if loader_of[key] == "NextStep-1-Large-Edit"]
    sampler, _, negative = sampler_and_prompts(api, generate)
    assert (sampler["cfg"], sampler["cfg_img"], sampler["timesteps_shift"], sampler["use_norm"]) == (7.5, 1.0, 1.0, False)
    assert negative.startswith("lowres")
    sampler, positive, negative = sampler_and_prompts(api, edit)
    assert (sampler["cfg"], sampler["cfg_img"], sampler["timesteps_shift"], sampler["use_norm"]) == (7.5, 2.0, 3.2, True)
    assert negative == "Copy original image." and positive.startswith("<image>")
    # the edit prompt's image is the generated one: sampler -> decode -> encode (edit VAE) -> prompt
    encode_key, _ = api[sampler["positive"][0]]["inputs"]["image"]
    encode = api[encode_key]["inputs"]
    decode = api[encode["pixels"][0]]
    assert decode["class_type"] == "NextStepVAEDecode" and decode["inputs"]["samples"] == [generate, 0]
    assert api[encode["vae"][0]]["inputs"]["vae_name"] == "NextStep-1-Large-Edit/vae"


def test_distributed_example_is_the_text_to_image_example_made_distributed():
    """The text-to-image example with ComfyUI-Distributed's two nodes wired in as comfyui_distributed.distributed()
    wires them, which test_distributed.py runs on a real master and worker."""
    api = load(EXAMPLES / "api" / "nextstep_1.1_distributed.json")
    assert api == distributed(load(EXAMPLES / "api" / "nextstep_1.1_text_to_image.json"))


def test_distributed_example_note_says_what_every_server_needs_and_the_seeds():
    (text,) = [node["widgets_values"][0] for node in load(EXAMPLES / "nextstep_1.1_distributed.json")["nodes"]
               if node["type"] == "Note"]
    assert "ComfyUI-Distributed extension on the master and on every worker" in text
    assert "model on every worker too" in text and "worker 1 S+1" in text


LATENT_UTILITIES = {"SetLatentNoiseMask"}  # ComfyUI's latent nodes that keep the space of what they are given


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=lambda path: path.stem)
def test_models_meet_through_image_never_latent(path):
    """Every LATENT link joins nodes of one model: traced back through latent utilities, a NextStep node's LATENT
    comes from a NextStep node, another model's from a node of ComfyUI's (docs/graphs.md)."""
    workflow = load(path)
    types = {node["id"]: node["type"] for node in workflow["nodes"]}
    source_of = {(link[3], link[4]): link[1] for link in workflow["links"]}

    def origin(node_id: int) -> str:
        while types[node_id] in LATENT_UTILITIES:
            node_id = source_of[(node_id, 0)]  # their first input is the LATENT they pass on
        return types[node_id]

    for _, source, _, target, _, link_type in workflow["links"]:
        if link_type == "LATENT" and types[target] not in LATENT_UTILITIES:
            assert origin(source).startswith("NextStep") == types[target].startswith("NextStep"), (source, target)


def by_type(api: dict) -> dict[str, list[tuple[str, dict]]]:
    found: dict[str, list[tuple[str, dict]]] = {}
    for key, node in api.items():
        found.setdefault(node["class_type"], []).append((key, node["inputs"]))
    return found


def test_nextstep_then_controlnet_example_hands_the_picture_to_canny_at_the_larger_size():
    api = load(EXAMPLES / "api" / "nextstep_1.1_then_sdxl_controlnet.json")
    nodes = by_type(api)
    ((decode, _),), ((scale, scaled),), ((canny, _),) = nodes["NextStepVAEDecode"], nodes["ImageScale"], nodes["Canny"]
    ((apply, applied),), ((_, sampler),), ((_, empty),) = (nodes["ControlNetApplyAdvanced"], nodes["KSampler"],
                                                           nodes["EmptyLatentImage"])
    assert scaled["image"] == [decode, 0] and api[canny]["inputs"]["image"] == [scale, 0]
    assert applied["image"] == [canny, 0]
    assert (sampler["positive"], sampler["negative"]) == ([apply, 0], [apply, 1])
    assert (scaled["width"], scaled["height"]) == (empty["width"], empty["height"]) == (1024, 1024)
    ((_, nextstep),) = nodes["NextStepSampler"]
    assert (nextstep["width"], nextstep["height"]) == (512, 512)


@pytest.mark.parametrize("name,crop,model", [("nextstep_sdxl_controlnet_then_edit", "center", "NextStep-1-Large-Edit"),
                                             ("nextstep_sdxl_controlnet_then_inpaint", "disabled", "NextStep-1.1")])
def test_controlnet_then_nextstep_examples_encode_the_diffusion_image(name, crop, model):
    """The diffusion image, resized to 512x512, goes into NextStep VAE Encode: the edit prompt's image, or
    (inpainting) the sampler's latent_image with the control image's painted mask, stretched so it still fits."""
    api = load(EXAMPLES / "api" / f"{name}.json")
    nodes = by_type(api)
    ((decode, _),), ((scale, scaled),), ((encode, encoded),) = (nodes["VAEDecode"], nodes["ImageScale"],
                                                                nodes["NextStepVAEEncode"])
    assert scaled["image"] == [decode, 0] and encoded["pixels"] == [scale, 0]
    assert (scaled["upscale_method"], scaled["width"], scaled["height"], scaled["crop"]) == ("lanczos", 512, 512, crop)
    ((load_key, _),), ((_, apply),) = nodes["LoadImage"], nodes["ControlNetApplyAdvanced"]
    assert api[apply["image"][0]]["inputs"]["image"] == [load_key, 0]  # Canny of the control image
    assert {inputs["model_name"] for _, inputs in nodes["NextStepModelLoader"]} == {model}
    sampler, positive, negative = sampler_and_prompts(api)
    if "edit" in name:
        assert api[sampler["positive"][0]]["inputs"]["image"] == [encode, 0]
        assert (sampler["cfg"], sampler["cfg_img"], sampler["timesteps_shift"], sampler["use_norm"]) == (7.5, 2.0, 3.2,
                                                                                                        True)
        assert negative == "Copy original image." and positive.startswith("<image>")
    else:
        ((mask_key, noise_mask),) = nodes["SetLatentNoiseMask"]
        assert noise_mask == {"samples": [encode, 0], "mask": [load_key, 1]}
        assert sampler["latent_image"] == [mask_key, 0] and negative.startswith("lowres")
