"""NextStep Model Loader and NextStep VAE Loader."""

from __future__ import annotations

import logging

from nextstep_runtime import (
    MEMORY_CHOICES,
    DeviceList,
    DeviceTraits,
    ModelFolder,
    Placement,
    WeightMode,
    compile_default,
    resolve_dtype,
    resolve_split,
    resolve_weight_mode,
    set_attention_backend,
)

from . import catalog, host
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
                   "(listed by its repo id).")
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
                                                                  "Hugging Face cache."}),
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
                                                   "(faster sampling). Paid once per image shape, at the first "
                                                   "run: seconds on a GPU, a minute or more on a CPU. Without a "
                                                   "working compiler (common on Windows) it logs one warning and "
                                                   "runs uncompiled. Off by default on Macs (torch.compile's Apple "
                                                   "GPU backend is a prototype)."}),
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
        folder = catalog.model_folder(model_name)
        mode, placement, choice = loader_weight_mode(folder, dtype, memory, fp8, gpu_layers, device)
        set_attention_backend(attention, host.load_device() if placement is None else placement.last)
        if choice:
            log.info("NextStep: %s", choice)
        loaded = load_nextstep_model(folder, mode.dtype, mode.fp8, mode.gpu_layers, mode.int4, placement)
        return (NextStepModelHandle(loaded, attention, compile),)


def loader_devices(device: str) -> DeviceList | None:
    """The devices the loader's `device` names; None for ComfyUI's device (`default`, or `auto` on a machine with
    fewer than two GPUs). Each must exist here."""
    text = device.strip()
    if text in ("", DEFAULT_DEVICE):
        return None
    if text == "auto":
        gpus = host.gpu_devices()
        return DeviceList(tuple(gpus)) if len(gpus) > 1 else None
    return DeviceList.parse(text).check_present()


def loader_weight_mode(folder: ModelFolder, dtype: str, memory: str, fp8: bool, gpu_layers: int,
                       device: str = DEFAULT_DEVICE) -> tuple[WeightMode, Placement | None, str | None]:
    """The weight mode NextStep Model Loader loads `folder` in for these widget values, where (None: ComfyUI's run
    device; else the chosen device or the split, model/placement.py), and the line that explains an `auto` choice
    (planned for 512x512 against ComfyUI's memory budget on each device). The plan route asks the same, so the node
    shows what loading will do."""
    layers = None if gpu_layers == ALL_LAYERS else gpu_layers
    devices = loader_devices(device)
    if devices is None or (len(devices.devices) == 1 and devices.placement is None):
        run = host.load_device() if devices is None else devices.devices[0]
        mode, choice = resolve_weight_mode(folder, memory, run, resolve_dtype(dtype, run), fp8, layers,
                                           host.model_memory_budget(run))
        return mode, None if devices is None else Placement.single(run, folder.config.num_hidden_layers), choice
    mode, placement, choice = resolve_split(folder, memory, devices, resolve_dtype(dtype, devices.devices[-1]), fp8,
                                            layers, host.model_memory_budget)
    return mode, placement, choice


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
        return (load_nextstep_vae(catalog.vae_path(vae_name)),)
