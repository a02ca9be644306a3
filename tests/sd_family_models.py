"""Tiny SD-family models with random weights, in the layouts ComfyUI 0.8's own model detection accepts: a
checkpoint (UNet, CLIP, VAE) and a ControlNet made for it, for the graphs that chain NextStep with a diffusion
model (test_comfyui_graphs.py).

ComfyUI's interpreter (COMFYUI_PYTHON) builds them from ComfyUI's own module classes, so the keys and shapes are
exactly what its loaders expect. The smallest shapes its detection takes:
- UNet: detection reads every shape from the keys and matches SD 1.5 (comfy/supported_models.py, SD15) on
  model_channels 320, context_dim 768, no linear transformer projections and no ADM input; the rest is free, so
  one level (channel_mult [1], no downsampling), one res block and one transformer block per stage.
- ControlNet: the same UNet's input half plus its hint block and zero convolutions, in the original "control_model."
  layout; ComfyUI detects its config from those keys as it does a checkpoint's UNet.
- CLIP-L and the VAE are not detected but built from fixed configs (comfy/sd1_clip_config.json; the SD VAE's ddconfig
  in comfy/sd.py), and a state dict of other shapes fails to load: they keep their full size, which makes the
  checkpoint about 470 MB in float16.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from comfyui_server import COMFYUI_DIR, COMFYUI_PYTHON, require_comfyui

CHECKPOINT = "tiny-sd15.safetensors"
CONTROLNET = "tiny-sd15-canny-controlnet.safetensors"

_BUILD = """
import sys
sys.path.insert(0, ".")  # ComfyUI's folder
folder = sys.argv[1]
sys.argv = sys.argv[:1] + ["--cpu"]  # ComfyUI's model management reads its command line when imported
import comfy.options
comfy.options.enable_args_parsing()
import safetensors.torch
import torch
import comfy.ops
import comfy.sd1_clip
from comfy.cldm.cldm import ControlNet
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

unet = dict(image_size=32, in_channels=4, model_channels=320, num_res_blocks=[1], channel_mult=[1],
            transformer_depth=[1], transformer_depth_middle=1, context_dim=768, num_heads=8, num_head_channels=-1,
            use_linear_in_transformer=False, adm_in_channels=None, use_spatial_transformer=True, legacy=False,
            operations=comfy.ops.manual_cast)
vae = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
       "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
generator = torch.Generator().manual_seed(0)

def randomized(module, prefix, keep=""):
    return {prefix + name: (torch.randn(value.shape, generator=generator) * 0.02).half()
            for name, value in module.state_dict().items() if name.startswith(keep) and value.is_floating_point()}

checkpoint = {**randomized(UNetModel(out_channels=4, transformer_depth_output=[1, 1], **unet), "model.diffusion_model."),
              **randomized(AutoencoderKL(ddconfig=vae, embed_dim=4), "first_stage_model."),
              **randomized(comfy.sd1_clip.SDClipModel(device="cpu"), "cond_stage_model.", keep="transformer.")}
safetensors.torch.save_file(checkpoint, f"{folder}/%s")
safetensors.torch.save_file(randomized(ControlNet(hint_channels=3, **unet), "control_model."), f"{folder}/%s")
""" % (CHECKPOINT, CONTROLNET)


def write_sd_family_models(folder: Path) -> dict[str, Path]:
    """Write the checkpoint and its Canny-style ControlNet into `folder`; {ComfyUI model folder: file}."""
    require_comfyui()
    built = subprocess.run([COMFYUI_PYTHON, "-c", _BUILD, str(folder)], cwd=COMFYUI_DIR, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-4000:]
    return {"checkpoints": folder / CHECKPOINT, "controlnet": folder / CONTROLNET}
