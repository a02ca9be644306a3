"""NextStep Model Loader and NextStep VAE Loader."""

from __future__ import annotations

import logging

from nextstep_runtime import (
    MEMORY_CHOICES,
    DeviceList,
    DeviceTraits,
    Job,
    ModelFolder,
    ModelFootprint,
    Plan,
    Targets,
    attention_kernels,
    compile_default,
    memory_setting,
    plan_load,
    plan_mode,
)

from . import catalog, host
from .fetching import fetch_if_absent
from .models import LoadedVAE, NextStepModelHandle, load_nextstep_model, load_nextstep_vae
from .sockets import CATEGORY, MODEL, VAE

DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
ATTENTION_CHOICES = ("auto", "sdpa", "flash_attn")
ALL_LAYERS = -1
DEFAULT_DEVICE = "default"
"""The loader's `device` for ComfyUI's own device."""

log = logging.getLogger("NextStep")


class NextStepModelLoader:
    """Loads a NextStep model folder (weights, tokenizer) from models/nextstep/."""

    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads a NextStep model folder from models/nextstep/<name>/ (the whole Hugging Face repo: "
                   "config.json, weights, tokenizer files, vae/), or a NextStep repo from the Hugging Face cache "
                   "(listed by its repo id). The released models are listed before they are on disk: the first run "
                   "fetches one into models/nextstep/<name>/ (Cancel keeps what arrived; the next run continues).")
    RETURN_TYPES = (MODEL,)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The NextStep model, for NextStep Text Encode and NextStep Sampler.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model_name": (catalog.model_names(), {"tooltip": "A folder in models/nextstep/ holding config.json, "
                                                                  "e.g. NextStep-1.1 or NextStep-1-Large-Edit, or a "
                                                                  "repo id (stepfun-ai/NextStep-1.1) from the "
                                                                  "Hugging Face cache. A released model not on disk "
                                                                  "yet is fetched into models/nextstep/ at the first "
                                                                  "run (about 56 GB for the 14B float32 repos)."}),
                "dtype": (list(DTYPE_CHOICES), {"default": "auto",
                                                "tooltip": "Weight precision. auto: bfloat16 on NVIDIA GPUs from "
                                                           "Ampere (RTX 30xx) on and on Macs from macOS 14, float16 "
                                                           "on older ones, float32 on the CPU. The 14B models need "
                                                           "about 30 GB in bfloat16."}),
                "attention": (list(ATTENTION_CHOICES), {"default": "auto",
                                                        "tooltip": "Attention kernel. auto: flash-attn when it "
                                                                   "imports and the GPU runs it (Ampere or newer), "
                                                                   "else PyTorch SDPA. flash_attn falls back to SDPA "
                                                                   "(with a warning) when missing or broken."}),
            },
            "optional": {
                "fp8": ("BOOLEAN", {"default": False,
                                    "tooltip": "Store the decoder's linear weights as float8 (e4m3fn), computing in "
                                               "the dtype above: the 14B models in about 15 GB instead of 28, for "
                                               "24 GB cards. Images stay close to, not identical with, bfloat16. "
                                               "Same as memory fp8."}),
                "gpu_layers": ("INT", {"default": ALL_LAYERS, "min": ALL_LAYERS, "max": 1024,
                                       "tooltip": "-1: every decoder layer on the GPU (fastest). N >= 0: keep only N "
                                                  "of the 48 layers on the GPU and stream the others from RAM for "
                                                  "every token (slow, for cards that cannot hold the model even "
                                                  "in fp8)."}),
                "memory": (list(MEMORY_CHOICES), {"default": "auto",
                                                  "tooltip": "Decoder weights. auto: the fastest that fits this GPU "
                                                             "(full, then fp8, then int4, then streaming layers; "
                                                             "planned for 512x512). full: the dtype above. fp8: "
                                                             "about 15 GB for the 14B models (not on Macs). int4: "
                                                             "4-bit, about 9 GB, for 12-16 GB cards (needs an "
                                                             "Ampere or newer GPU, or a Mac with torch 2.14+). A "
                                                             "repacked or 4-bit AutoRound/GPTQ folder loads in its "
                                                             "own format."}),
                "compile": ("BOOLEAN", {"default": compile_default(DeviceTraits.of(host.load_device())),
                                        "tooltip": "Compile the flow head with torch.compile into fused kernels "
                                                   "(faster sampling on NVIDIA GPUs). Paid once per image shape, at "
                                                   "the first run: seconds on a GPU. Without a working compiler "
                                                   "(common on Windows) it logs one warning and runs uncompiled. "
                                                   "On by default on NVIDIA GPUs only: on the CPU it is no faster, "
                                                   "and torch.compile's Apple GPU backend is a prototype."}),
                "device": ("STRING", {"default": DEFAULT_DEVICE,
                                      "tooltip": "Where the model runs. default: ComfyUI's device. cuda:1: that GPU. "
                                                 "Several, to split the decoder's layers over them (docs/multi-gpu."
                                                 "md): cuda:0,cuda:1 (ranges sized from each GPU's memory; the flow "
                                                 "head on the last) or explicit inclusive layer ranges "
                                                 "cuda:0:0-23,cuda:1:24-47. auto: split over every GPU of this "
                                                 "machine (ComfyUI's device when there is one)."}),
            },
        }

    def load(self, model_name: str, dtype: str, attention: str, fp8: bool = False,
             gpu_layers: int = ALL_LAYERS, memory: str = "auto", compile: bool = True,
             device: str = DEFAULT_DEVICE) -> tuple[NextStepModelHandle]:
        fetch_if_absent(model_name)
        folder = catalog.model_folder(model_name)
        plan, choice = loader_plan(folder, dtype, memory, fp8, gpu_layers, device)
        if choice:
            log.info("NextStep: %s", choice)
        loaded = load_nextstep_model(folder, plan)
        kernels = attention_kernels(attention, [layer_range.device for layer_range in plan.placement.ranges])
        return (NextStepModelHandle(loaded, kernels, compile),)


def loader_devices(device: str) -> DeviceList:
    """The devices the loader's `device` names, each of which must exist here: ComfyUI's device for `default` (and
    for `auto` on a machine with fewer than two GPUs), every GPU for `auto`, else the list as typed."""
    text = device.strip()
    if text == "auto" and len(host.gpu_devices()) > 1:
        return DeviceList(tuple(host.gpu_devices()))
    if text in ("", DEFAULT_DEVICE, "auto"):
        return DeviceList((host.load_device(),))
    return DeviceList.parse(text).check_present()


def loader_targets(device: str, dtype: str) -> Targets:
    """What the loader plans for: its devices, ComfyUI's memory budget on each, and the VAE where ComfyUI runs it."""
    vae_device = host.vae_devices()[0]
    return Targets.on(loader_devices(device), dtype, host.memory_budget, (vae_device, host.vae_dtype(vae_device)))


def loader_plan(folder: ModelFolder, dtype: str, memory: str, fp8: bool, gpu_layers: int,
                device: str = DEFAULT_DEVICE, job: Job | None = None,
                footprint: ModelFootprint | None = None) -> tuple[Plan, str | None]:
    """The plan NextStep Model Loader loads `folder` with for these widget values (memory/planner.plan_load: the
    weight mode, and the placement on its devices, planned for one 512x512 image against ComfyUI's memory budget on
    each device), and the line that explains an `auto` choice. With `job` (the panel's: the sampler the loader feeds),
    that same load planned for `job`. The plan route asks this (with the folder's `footprint` it has read), so the
    panel shows what loading will do."""
    targets = loader_targets(device, dtype)
    footprint = footprint or ModelFootprint.from_folder(folder)
    layers = None if gpu_layers == ALL_LAYERS else gpu_layers
    plan, choice = plan_load(footprint, memory_setting(memory, fp8), layers, Job(), targets, str(folder.path))
    if job is not None:
        plan = plan_mode(footprint, plan.mode, job, targets.fixed_to(plan.placement), str(folder.path))
    return plan, choice


class NextStepVAELoader:
    """Loads NextStep's image tokenizer (VAE) from a model folder's vae/ or a file in models/vae/."""

    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads the NextStep VAE: <model>/vae is the one inside a model folder; .safetensors files in "
                   "models/vae/ are single-file NextStep VAEs.")
    RETURN_TYPES = (VAE,)
    RETURN_NAMES = ("vae",)
    OUTPUT_TOOLTIPS = ("The NextStep VAE, for NextStep VAE Decode and NextStep VAE Encode.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "vae_name": (catalog.vae_names(), {"tooltip": "<model>/vae: the VAE folder shipped inside a NextStep "
                                                              "model folder or cached repo (recommended). Or a "
                                                              "single-file NextStep VAE (.safetensors) from "
                                                              "models/vae/."}),
            },
        }

    def load(self, vae_name: str) -> tuple[LoadedVAE]:
        model = catalog.model_of_vae(vae_name)
        if model is not None:
            fetch_if_absent(model)
        return (load_nextstep_vae(catalog.vae_path(vae_name)),)
