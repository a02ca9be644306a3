"""NextStep in ControlNet-style graphs, end to end in a real ComfyUI: the three templates that chain it with a
diffusion model and its ControlNet, run with tiny SD-family models the test writes (sd_family_models.py) and the
fixture NextStep model; and NextStep's LATENT through ComfyUI's native latent nodes, another model's refused.

Each template runs as its file says, with only the model names, the sizes and the input picture swapped. Its
NextStep part must equal a NextStep-only run with the same seed: the text-to-image template's for the composition,
and for the editing and inpainting templates the edit and inpaint templates given the diffusion image as saved
(the graphs resize it with lanczos, which rounds to 8 bits as Save Image does, so both see the same pixels).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from comfyui_server import API_WORKFLOWS, ComfyUI, running_comfyui
from fixture_workflows import with_fixture_models
from PIL import Image
from sd_family_models import CHECKPOINT, CONTROLNET, write_sd_family_models

SIZES = {1024: 128, 512: 64}  # the templates' sizes -> the test's: SD at 128x128 (16x16 latents), NextStep at 64x64
SIZED = {"NextStepSampler", "ImageScale", "EmptyLatentImage"}
CONTROL_IMAGE = "control.png"


@pytest.fixture(scope="module")
def comfy(tmp_path_factory) -> ComfyUI:
    folder = tmp_path_factory.mktemp("sd-family")
    try:
        with running_comfyui(tmp_path_factory.mktemp("comfyui"), comfy_models=write_sd_family_models(folder)) as server:
            control_image().save(server.input / CONTROL_IMAGE)
            yield server
    finally:
        shutil.rmtree(folder)  # about 500 MB, not worth keeping with pytest's last three temporary folders


def control_image() -> Image.Image:
    """A 128x128 picture with edges for Canny; its bottom-right quadrant transparent: Load Image's MASK there is 1."""
    pixels = np.full((128, 128, 4), 255, np.uint8)
    pixels[16:80, 24:104, :3] = (30, 60, 200)
    pixels[48:120, 8:56, :3] = (220, 40, 40)
    pixels[64:, 64:, 3] = 0
    return Image.fromarray(pixels, "RGBA")


def template(name: str) -> dict:
    return json.loads((API_WORKFLOWS / f"{name}.json").read_text())


def for_this_test(name: str, prefix: str) -> dict:
    """The template with the test's models, sizes, input picture and save prefix, and nothing else changed."""
    prompt = with_fixture_models(template(name), prefix)
    for node in prompt.values():
        inputs = node["inputs"]
        match node["class_type"]:
            case "CheckpointLoaderSimple":
                inputs["ckpt_name"] = CHECKPOINT
            case "ControlNetLoader":
                inputs["control_net_name"] = CONTROLNET
            case "LoadImage":
                inputs["image"] = CONTROL_IMAGE
            case kind if kind in SIZED:
                inputs.update(width=SIZES[inputs["width"]], height=SIZES[inputs["height"]])
    return prompt


def assert_only_models_sizes_and_inputs_differ(prompt: dict, name: str) -> None:
    """The graph's structure is exactly the template's: the same nodes and links, every other value the same."""
    swapped = {"ckpt_name", "control_net_name", "model_name", "vae_name", "width", "height", "image",
               "filename_prefix"}
    original = template(name)
    assert prompt.keys() == original.keys()
    for key, node in original.items():
        assert prompt[key]["class_type"] == node["class_type"] and prompt[key]["inputs"].keys() == node["inputs"].keys()
        for input_name, value in node["inputs"].items():
            if isinstance(value, list) or input_name not in swapped:
                assert prompt[key]["inputs"][input_name] == value, (key, input_name)


def outputs_by_source(prompt: dict, entry: dict, comfy: ComfyUI) -> dict[str, np.ndarray]:
    """The image each Save Image of a finished run wrote, keyed by the class of the node that made it."""
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{comfy.log_tail()}"
    # Save Image rounds NaN and infinities to pixels silently; numpy warns on stderr, which is the server's log
    assert "invalid value encountered" not in comfy.log.read_text(errors="replace")
    saved = {}
    for key, node in prompt.items():
        if node["class_type"] == "SaveImage":
            (image,) = entry["outputs"][key]["images"]
            source = prompt[node["inputs"]["images"][0]]["class_type"]
            saved[source] = np.asarray(Image.open(comfy.output / image["subfolder"] / image["filename"]))
    return saved


def run_template(comfy: ComfyUI, name: str) -> tuple[dict, dict[str, np.ndarray]]:
    prompt = for_this_test(name, f"graphs/{name}")
    assert_only_models_sizes_and_inputs_differ(prompt, name)
    return prompt, outputs_by_source(prompt, comfy.wait(comfy.submit(prompt)), comfy)


def nextstep_settings(prompt: dict) -> tuple[dict, list[dict]]:
    """The inputs of a prompt's NextStep Sampler and of its positive and negative Text Encodes."""
    (sampler,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepSampler"]
    return sampler, [prompt[sampler[sign][0]]["inputs"] for sign in ("positive", "negative")]


def nextstep_only(comfy: ComfyUI, name: str, graph: dict, picture: Image.Image | None = None) -> np.ndarray:
    """The NextStep-only template `name` run with the fixture model, `picture` as its input, and the prompts and
    sampler settings of the NextStep part of `graph`."""
    prompt = for_this_test(name, f"graphs/only-{name}")
    (sampler, texts), (graph_sampler, graph_texts) = nextstep_settings(prompt), nextstep_settings(graph)
    sampler.update({key: value for key, value in graph_sampler.items() if not isinstance(value, list)})
    for text, graph_text in zip(texts, graph_texts):
        text["text"] = graph_text["text"]
    if picture is not None:
        picture.save(comfy.input / f"only-{name}.png")
        (load,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "LoadImage"]
        load["image"] = f"only-{name}.png"
    return comfy.run(prompt)


def test_comfyuis_loaders_list_the_sd_family_models(comfy):
    status, info = comfy.request("/object_info/CheckpointLoaderSimple")
    assert status == 200 and info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0] == [CHECKPOINT]
    status, info = comfy.request("/object_info/ControlNetLoader")
    assert info["ControlNetLoader"]["input"]["required"]["control_net_name"][0] == [CONTROLNET]


def test_nextstep_composes_and_the_diffusion_model_renders_with_its_controlnet(comfy):
    name = "nextstep_1.1_then_sdxl_controlnet"
    prompt, saved = run_template(comfy, name)
    assert saved["NextStepVAEDecode"].shape == (64, 64, 3) and saved["VAEDecode"].shape == (128, 128, 3)
    composition = nextstep_only(comfy, "nextstep_1.1_text_to_image", prompt)
    assert np.array_equal(saved["NextStepVAEDecode"], composition)
    # the ControlNet steers the render: without it (strength 0) the diffusion model draws another picture
    (apply,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "ControlNetApplyAdvanced"]
    apply["strength"] = 0.0
    uncontrolled = outputs_by_source(prompt, comfy.wait(comfy.submit(prompt)), comfy)["VAEDecode"]
    assert np.abs(uncontrolled.astype(int) - saved["VAEDecode"].astype(int)).max() > 0


def test_a_controlled_diffusion_image_is_edited_by_nextstep(comfy):
    name = "nextstep_sdxl_controlnet_then_edit"
    prompt, saved = run_template(comfy, name)
    assert saved["VAEDecode"].shape == (128, 128, 3) and saved["NextStepVAEDecode"].shape == (64, 64, 3)
    edited = nextstep_only(comfy, "nextstep_1_large_edit", prompt, Image.fromarray(saved["VAEDecode"]))
    assert np.array_equal(saved["NextStepVAEDecode"], edited)


def test_nextstep_inpaints_the_masked_region_of_a_controlled_diffusion_image(comfy):
    name = "nextstep_sdxl_controlnet_then_inpaint"
    prompt, saved = run_template(comfy, name)
    assert saved["VAEDecode"].shape == (128, 128, 3) and saved["NextStepVAEDecode"].shape == (64, 64, 3)
    # the inpaint template's mask comes from its picture's alpha: the diffusion image with the control image's alpha
    diffusion = np.dstack([saved["VAEDecode"], np.asarray(control_image())[..., 3]])
    inpainted = nextstep_only(comfy, "nextstep_1.1_inpaint", prompt, Image.fromarray(diffusion, "RGBA"))
    assert np.array_equal(saved["NextStepVAEDecode"], inpainted)


# --- LATENT: NextStep's through ComfyUI's native latent nodes; another model's refused -------------------------

def composition(prefix: str) -> tuple[dict, str, str]:
    """The text-to-image template at 64x64: (prompt, its sampler's key, its decode's key)."""
    prompt = for_this_test("nextstep_1.1_text_to_image", prefix)
    (sampler,) = [key for key, node in prompt.items() if node["class_type"] == "NextStepSampler"]
    (decode,) = [key for key, node in prompt.items() if node["class_type"] == "NextStepVAEDecode"]
    return prompt, sampler, decode


def decoded_and_saved(prompt: dict, decode: str, latent: list, key: str) -> str:
    """Add NextStep VAE Decode of `latent` to `prompt` as node `key`, and a Save Image of it; the Save Image's key."""
    vae = prompt[decode]["inputs"]["vae"]
    prompt[key] = {"class_type": "NextStepVAEDecode", "inputs": {"vae": vae, "samples": latent}}
    save = str(int(key) + 1)
    prompt[save] = {"class_type": "SaveImage", "inputs": {"images": [key, 0], "filename_prefix": f"graphs/{key}"}}
    return save


def saved_by(comfy: ComfyUI, entry: dict, save: str) -> np.ndarray:
    """The image Save Image `save` wrote in a successful run."""
    assert entry["status"]["status_str"] == "success", f"{entry['status']}\n{comfy.log_tail()}"
    (image,) = entry["outputs"][save]["images"]
    return np.asarray(Image.open(comfy.output / image["subfolder"] / image["filename"]))


def test_nextsteps_latent_passes_through_comfyuis_native_latent_nodes(comfy):
    """Batch, from-batch, composite and crop keep what they do not change (batch_index among it), and Save Latent
    + Load Latent keep only the tensor: NextStep VAE Decode takes each, and the unchanged ones decode as before."""
    prompt, sampler, decode = composition("graphs/latent-nodes")
    prompt[sampler]["inputs"]["width"] = 128  # Latent Crop crops to 64 pixels or more
    latent = [sampler, 0]
    prompt.update({
        "100": {"class_type": "LatentBatch", "inputs": {"samples1": latent, "samples2": latent}},
        "101": {"class_type": "LatentFromBatch", "inputs": {"samples": ["100", 0], "batch_index": 1, "length": 1}},
        "102": {"class_type": "LatentComposite", "inputs": {"samples_to": latent, "samples_from": latent, "x": 0,
                                                           "y": 0, "feather": 0}},
        "103": {"class_type": "LatentCrop", "inputs": {"samples": latent, "width": 64, "height": 64, "x": 48, "y": 0}},
        "104": {"class_type": "SaveLatent", "inputs": {"samples": latent, "filename_prefix": "graphs/nextstep"}},
    })
    (save,) = [key for key, node in prompt.items() if node["class_type"] == "SaveImage"]
    saves = {key: decoded_and_saved(prompt, decode, source, key)
             for key, source in (("110", ["101", 0]), ("120", ["102", 0]), ("130", ["103", 0]))}
    entry = comfy.wait(comfy.submit(prompt))
    direct = saved_by(comfy, entry, save)
    assert direct.shape == (64, 128, 3)
    for unchanged in ("110", "120"):  # the second of a batch of two copies; the latent composited onto itself
        assert np.array_equal(saved_by(comfy, entry, saves[unchanged]), direct), unchanged
    assert saved_by(comfy, entry, saves["130"]).shape == (64, 64, 3)
    (latent_file,) = entry["outputs"]["104"]["latents"]
    (comfy.output / latent_file["subfolder"] / latent_file["filename"]).rename(comfy.input / "nextstep.latent")

    reloaded, sampler, decode = composition("graphs/loaded-latent")
    reloaded[sampler]["inputs"]["width"] = 128  # the same prompt: served from ComfyUI's cache
    reloaded["200"] = {"class_type": "LoadLatent", "inputs": {"latent": "nextstep.latent"}}
    loaded = decoded_and_saved(reloaded, decode, ["200", 0], "210")
    assert np.array_equal(saved_by(comfy, comfy.wait(comfy.submit(reloaded)), loaded), direct)


@pytest.mark.parametrize("kind", ["sd_sampler", "video", "audio"])
def test_another_models_latent_is_refused_naming_the_image_route(comfy, kind):
    prompt, sampler, decode = composition(f"graphs/foreign-{kind}")
    if kind == "sd_sampler":  # the SD checkpoint's own KSampler output into NextStep VAE Decode
        prompt.update({
            "300": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
            "301": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["300", 1], "text": "a house"}},
            "302": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "303": {"class_type": "KSampler", "inputs": {"model": ["300", 0], "positive": ["301", 0],
                                                         "negative": ["301", 0], "latent_image": ["302", 0],
                                                         "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
                                                         "scheduler": "normal", "denoise": 1.0}},
        })
        prompt[decode]["inputs"]["samples"] = ["303", 0]
        expected = "NextStep VAE Decode got a LATENT of 4 channels [1, 4, 8, 8] (SD 1.x, SD 2.x and SDXL"
    elif kind == "video":  # a video model's empty latent into the sampler's latent_image
        prompt["300"] = {"class_type": "EmptyHunyuanLatentVideo",
                         "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}}
        prompt[sampler]["inputs"]["latent_image"] = ["300", 0]
        expected = "NextStep Sampler's latent_image got a video LATENT [1, 16, 2, 8, 8]"
    else:  # an audio latent, marked so by ComfyUI, into NextStep VAE Decode
        prompt["300"] = {"class_type": "EmptyAceStepLatentAudio", "inputs": {"seconds": 1.0, "batch_size": 1}}
        prompt[decode]["inputs"]["samples"] = ["300", 0]
        expected = "NextStep VAE Decode got a LATENT of type 'audio'"
    message = comfy.failure_message(prompt)
    assert message.startswith(expected), message
    assert "decode it to an IMAGE with its own model's VAE Decode, then encode that with NextStep VAE Encode" in message
    assert comfy.process.poll() is None
