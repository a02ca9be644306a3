"""The example API workflows adapted to the fixture model and a golden case, for the tests that run them in a
real ComfyUI (test_comfyui_e2e.py, test_distributed.py)."""

from __future__ import annotations

from comfyui_server import example_prompt
from nodes_pack import MODEL_NAME


def case_settings(case: dict) -> dict:
    """A golden case's settings as NextStep Sampler inputs."""
    height, width = case["hw"]
    return dict(width=width, height=height, batch_size=case["num_images_per_caption"], seed=case["seed"],
                steps=case["num_sampling_steps"], cfg=case["cfg"], cfg_img=case["cfg_img"],
                cfg_schedule=case["cfg_schedule"], timesteps_shift=case["timesteps_shift"], sampler=case["sampler"],
                profile=case["profile"], use_norm=case["use_norm"])


def workflow(name: str, case: dict, prefix: str, **sampler_changes) -> dict:
    """An example API workflow with the fixture model, the golden case's prompts and settings, and its own
    SaveImage prefix."""
    prompt = example_prompt(name)
    (sampler,) = [node["inputs"] for node in prompt.values() if node["class_type"] == "NextStepSampler"]
    sampler.update(case_settings(case), **sampler_changes)
    height, width = sampler["height"], sampler["width"]
    text = case["caption"] + (f" {case['positive_prompt']}" if case["positive_prompt"] else "")
    prompt[sampler["positive"][0]]["inputs"]["text"] = text
    prompt[sampler["negative"][0]]["inputs"]["text"] = case["negative_prompt"] or ""
    for node in with_fixture_models(prompt, prefix).values():
        match node["class_type"]:
            case "LoadImage":
                node["inputs"]["image"] = case["image"]
            case "ImageScale":  # the example resizes the input to 512x512; keep the fixture's size
                node["inputs"].update(width=width, height=height)
    return prompt


def with_fixture_models(prompt: dict, prefix: str) -> dict:
    """`prompt` with the fixture model and its VAE in every loader, and `prefix` for SaveImage."""
    for node in prompt.values():
        inputs = node["inputs"]
        match node["class_type"]:
            case "NextStepModelLoader":
                inputs["model_name"] = MODEL_NAME
            case "NextStepVAELoader":
                inputs["vae_name"] = f"{MODEL_NAME}/vae"
            case "SaveImage":
                inputs["filename_prefix"] = prefix
    return prompt
