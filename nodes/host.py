"""The one adapter between the nodes and ComfyUI: model folders, devices, model management, progress, cancel,
HTTP routes.

Inside ComfyUI each function delegates to `folder_paths`, `comfy.model_management`, `comfy.model_patcher`
and `comfy.utils.ProgressBar`. Without ComfyUI (CI, scripts) plain fallbacks keep the node classes importable
and runnable: folders come from `add_model_folder`, the device is the runtime's `auto` choice, and there is
no model registry, progress display, cancel button or web server to serve.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import torch
from PIL import Image
from torch import nn

from nextstep_runtime import (
    LOADING,
    NextStepError,
    PinHostMemory,
    memory_remedy,
    release_streaming_slots,
    resolve_device,
)
from nextstep_runtime import free_memory as runtime_free_memory

try:
    import folder_paths
except ImportError:  # not running inside ComfyUI
    folder_paths = None

IN_COMFYUI = folder_paths is not None
if IN_COMFYUI:  # a ComfyUI without these is broken: let the import error show rather than fall back silently
    import comfy.model_management as model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.utils
    from aiohttp import web
    from comfy.cli_args import LatentPreviewMethod
    from comfy.cli_args import args as comfy_args
    from server import PromptServer

log = logging.getLogger("NextStep")

MODEL_FOLDER_KEY = "nextstep"
"""models/nextstep/<model folder>/ (config.json, weights, tokenizer, vae/)."""
VAE_FOLDER_KEY = "vae"

_fallback_folders: dict[str, list[str]] = {MODEL_FOLDER_KEY: [], VAE_FOLDER_KEY: []}

class _Managed(nn.Module):
    """Holds a runtime module for ComfyUI's ModelPatcher, which needs a writable `device` attribute
    (the runtime's modules report their device through a read-only property)."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.module = module
        self.device = device


if IN_COMFYUI:
    class _Patcher(comfy.model_patcher.ModelPatcher):
        """ComfyUI's patcher for a NextStep part, told of partial unloads too: ComfyUI frees memory for another model
        by `partially_unload` where that suffices (model_management's `model_unload(memory_to_free)`, and
        `partially_load` asked for less), which moves some weights off and sends no detach event, so the part's
        streaming slots (memory ComfyUI does not see) would stay. `on_unload` runs on every unload path: here, and on
        detach (register_model)."""

        on_unload: Callable[[], int | None] | None = None

        def partially_unload(self, device_to, memory_to_free=0, force_patch_weights=False):
            released = (self.on_unload() or 0) if self.on_unload is not None else 0
            return released + super().partially_unload(device_to, memory_to_free, force_patch_weights)


RouteHandler = Callable[[dict[str, str]], tuple[int, dict]]
"""Takes the query parameters, returns (HTTP status, JSON body)."""
ProgressSink = Callable[[int, int, "Image.Image | None"], None]
"""Called with (done, total, preview image or None)."""


def add_model_folder(key: str, path: str) -> None:
    """Add a search folder for `key`, after those already known (extra_model_paths.yaml entries stay first)."""
    if IN_COMFYUI:
        folder_paths.add_model_folder_path(key, path)
    elif path not in _fallback_folders.setdefault(key, []):
        _fallback_folders[key].append(path)


def folder_roots(key: str) -> list[str]:
    """The folders searched for `key`, in priority order."""
    if IN_COMFYUI:
        return folder_paths.get_folder_paths(key) if key in folder_paths.folder_names_and_paths else []
    return list(_fallback_folders.get(key, []))


if IN_COMFYUI:  # made when missing, so a user sees where NextStep models go (and where the loaders fetch them to)
    os.makedirs(os.path.join(folder_paths.models_dir, MODEL_FOLDER_KEY), exist_ok=True)
    add_model_folder(MODEL_FOLDER_KEY, os.path.join(folder_paths.models_dir, MODEL_FOLDER_KEY))


def load_device() -> torch.device:
    """Where models run: ComfyUI's device (indexed, `cuda:0`, as ComfyUI compares devices), else the runtime's
    `auto` choice."""
    return model_management.get_torch_device() if IN_COMFYUI else resolve_device("auto")


def memory_budget(device: torch.device) -> int | None:
    """Bytes a model and its runs may use on `device`, what the memory planner plans against: on CUDA inside ComfyUI,
    the card less ComfyUI's reserve, since it unloads other models to make room; elsewhere (an Apple GPU, whose share
    of the Mac's memory ComfyUI overstates, the CPU, and outside ComfyUI) what is free there now."""
    if device.type == "cuda" and IN_COMFYUI:
        return model_management.get_total_memory(device) - model_management.extra_reserved_memory()
    return runtime_free_memory(device)


def gpu_devices() -> list[torch.device]:
    """Every CUDA GPU of this machine (what a Model Loader `device` of `auto` splits over)."""
    return [torch.device("cuda", index) for index in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []


def offload_device() -> torch.device:
    """Where a model waits while other models use the GPU."""
    return model_management.unet_offload_device() if IN_COMFYUI else load_device()


def intermediate_device() -> torch.device:
    """Where LATENT and IMAGE tensors passed between nodes live."""
    return model_management.intermediate_device() if IN_COMFYUI else torch.device("cpu")


def vae_devices() -> tuple[torch.device, torch.device]:
    """(device the VAE runs on, device it waits on)."""
    if IN_COMFYUI:
        return model_management.vae_device(), model_management.vae_offload_device()
    return load_device(), load_device()


def vae_dtype(device: torch.device) -> torch.dtype:
    """ComfyUI's VAE precision choice for `device`: --bf16-vae and --fp32-vae as given, else bfloat16 where ComfyUI
    would use it and float32 elsewhere. Never float16, which this VAE family overflows in (black images): under
    --fp16-vae the VAE runs in bfloat16 where ComfyUI would use bfloat16 on that device, else float32, and the log says
    why once. float32 outside ComfyUI."""
    if not IN_COMFYUI:
        return torch.float32
    if comfy_args.fp16_vae:
        return _instead_of_fp16_vae(device)
    return model_management.vae_dtype(device, [torch.bfloat16, torch.float32])


@functools.cache
def _instead_of_fp16_vae(device: torch.device) -> torch.dtype:
    dtype = torch.bfloat16 if model_management.should_use_bf16(device) else torch.float32
    log.warning("NextStep: --fp16-vae is set, but the NextStep VAE overflows in float16 (black images); it runs in "
                "%s on %s instead", str(dtype).removeprefix("torch."), device)
    return dtype


def make_room(needs: dict[torch.device, int]) -> None:
    """Ask ComfyUI to unload other models until each GPU has `needs[device]` bytes free (before the planned weights
    are loaded there); a no-op for the CPU and outside ComfyUI."""
    for device, needed in needs.items():
        if IN_COMFYUI and device.type != "cpu":
            model_management.free_memory(needed, device)


def register_model(parts: list[tuple[torch.device, list[nn.Module]]], wait_device: torch.device, name: str,
                   in_place: bool, on_unload: Callable[[], int | None] | None = None) -> list | None:
    """Put a model under ComfyUI's model management, each device's part (`parts`: its device and modules) as a
    model of its own on that device, so "Unload models" and other models' needs move every part off its GPU and
    `prepare_model` brings every part back. `in_place`: the parts are on their devices already (entered in the
    registry now, as ComfyUI's direct-to-GPU loads are), else they wait on `wait_device`. `on_unload` runs when the
    last part is unloaded, wholly (ComfyUI's detach) or partly (_Patcher), and returns the bytes it freed (or None).
    Returns the handles `prepare_model` takes; None outside ComfyUI."""
    if not IN_COMFYUI:
        return None
    managed = type(name, (_Managed,), {})  # ComfyUI's log names a model by its class: "Requested to load <name>"
    patchers = [_Patcher(managed(nn.ModuleList(modules), device if in_place else wait_device), load_device=device,
                         offload_device=wait_device)
                for device, modules in parts]
    if on_unload is not None:
        patchers[-1].on_unload = on_unload
        patchers[-1].add_callback(comfy.patcher_extension.CallbacksMP.ON_DETACH,
                                  lambda detached, unpatch_all: on_unload())
    if in_place:
        prepare_model(patchers, {})
    return patchers


def release_streaming_slots_of(model: nn.Module) -> int:
    """Free an unloaded model's streaming slots (registered nowhere ComfyUI sees) and say so; returns the bytes
    freed."""
    freed = release_streaming_slots(model)
    if freed:
        log.info("NextStep: freed the streaming slots of the unloaded model (%.0f MB)", freed / 2**20)
    return freed


def prepare_model(handles: list | None, memory_required: dict[torch.device, int]) -> None:
    """Move a registered model's parts onto their devices before use, freeing on each device the bytes
    `memory_required` names for the run there (each device asked for its own share, not the largest).

    Loads fully: the runtime's plain torch layers cannot run partly offloaded."""
    if handles is None:
        return
    try:
        for handle in handles:
            model_management.load_models_gpu([handle], memory_required=memory_required.get(handle.load_device, 0),
                                             force_full_load=True)
    except torch.cuda.OutOfMemoryError:
        devices = ", ".join(str(handle.load_device) for handle in handles)
        raise NextStepError(f"the NextStep model does not fit in GPU memory ({devices}); "
                            f"{memory_remedy(LOADING, handles[-1].load_device)}") from None


def host_memory_pinning() -> PinHostMemory | None:
    """How streamed layers' host memory is page-locked: inside ComfyUI by ComfyUI itself, within its pinned-memory
    budget (45% of RAM on Windows) and its --disable-pinned-memory; elsewhere (and in a ComfyUI older than its
    pin_memory) by the runtime's own rule, the same (None)."""
    return _comfyui_pin if IN_COMFYUI and hasattr(model_management, "pin_memory") else None


def _comfyui_pin(buffer: torch.Tensor) -> Callable[[], None] | None:
    handle = nn.Parameter(buffer, requires_grad=False)  # ComfyUI pins parameters only; this one shares the memory
    if not model_management.pin_memory(handle):
        return None
    return lambda: model_management.unpin_memory(handle)


def free_memory(device: torch.device) -> int | None:
    """Bytes a run may use on `device` now, for the memory check before sampling: ComfyUI's own accounting
    (the driver's free memory plus its allocator's unused cache, or free host RAM), else the runtime's."""
    return int(model_management.get_free_memory(device)) if IN_COMFYUI else runtime_free_memory(device)


def check_interrupt() -> None:
    """Raise ComfyUI's interrupt exception when the user pressed Cancel (no-op outside ComfyUI)."""
    if IN_COMFYUI:
        model_management.throw_exception_if_processing_interrupted()


def previews_enabled() -> bool:
    """Whether the user wants live previews (ComfyUI's --preview-method or the front-end's setting)."""
    return IN_COMFYUI and comfy_args.preview_method != LatentPreviewMethod.NoPreviews


def progress_sink(total: int) -> ProgressSink:
    """A progress display for `total` steps: ComfyUI's progress bar and preview, or nothing."""
    if not IN_COMFYUI:
        return lambda done, steps, image: None
    bar = comfy.utils.ProgressBar(total)

    def update(done: int, steps: int, image: Image.Image | None) -> None:
        bar.update_absolute(done, steps, None if image is None else ("JPEG", image, comfy_args.preview_size))
    return update


ROUTE_WORKERS = 2
"""Threads of the pack's own pool for slow route work (reading a model folder's headers, planning)."""
MAX_WAITING_ROUTE_CALLS = 16
"""Slow route calls queued or running at once; more are answered 429 at once instead of piling up."""
_ROUTE_POOL = ThreadPoolExecutor(ROUTE_WORKERS, thread_name_prefix="nextstep-route")  # threads start at first use
_route_calls = 0


def query_parameters(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """A request's query as one value per name; a name given twice (`width=512&width=abc`) is refused rather than
    resolved silently one way or the other."""
    names = [name for name, _ in pairs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise NextStepError(f"parameter {repeated[0]!r} is given {names.count(repeated[0])} times; give it once")
    return dict(pairs)


class _NotABoolean(str):
    """A value an API prompt gives where a BOOLEAN is meant (the string "false", a number), put back in the prompt in
    its place: ComfyUI converts such inputs with bool() before any VALIDATE_INPUTS sees them, which turns "false" into
    True. This one's conversion fails instead, so ComfyUI refuses the prompt with the message below (a str, so the
    refusal's JSON still shows the value as given)."""

    message = ""

    def __bool__(self) -> bool:
        raise NextStepError(self.message)


def _boolean_inputs(node_class: type) -> tuple[str, ...]:
    inputs = node_class.INPUT_TYPES()
    return tuple(name for group in ("required", "optional") for name, spec in inputs.get(group, {}).items()
                 if spec[0] == "BOOLEAN")


def refuse_non_boolean_inputs(node_classes: dict[str, type], check: Callable[[str, Any], Any]) -> None:
    """Make ComfyUI refuse any prompt that gives one of these nodes' BOOLEAN inputs something other than true or
    false, with `check`'s message (no-op outside ComfyUI). Links (lists) are left to ComfyUI's type check."""
    if not IN_COMFYUI:
        return
    booleans: dict[str, tuple[str, ...]] = {}

    def mark(json_data: Any) -> Any:
        prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
        for node in prompt.values() if isinstance(prompt, dict) else ():
            node_class = node_classes.get(node.get("class_type")) if isinstance(node, dict) else None
            inputs = node.get("inputs") if node_class else None
            if not isinstance(inputs, dict):
                continue
            if node["class_type"] not in booleans:
                booleans[node["class_type"]] = _boolean_inputs(node_class)
            for name in booleans[node["class_type"]]:
                value = inputs.get(name)
                if isinstance(value, dict) and "__value__" in value:  # ComfyUI unwraps such values first
                    value = value["__value__"]
                if name in inputs and not isinstance(value, (bool, list)):
                    try:
                        check(name, value)
                    except NextStepError as exc:
                        inputs[name] = _NotABoolean(value if isinstance(value, str) else json.dumps(value))
                        inputs[name].message = str(exc)
        return json_data
    PromptServer.instance.add_on_prompt_handler(mark)


def add_get_route(path: str, handler: RouteHandler, slow: bool = False) -> None:
    """Serve GET `path` (also under /api) from ComfyUI's server with `handler` (no-op outside ComfyUI). A `slow`
    handler (one that reads files) runs on the pack's own small thread pool, never asyncio's default one that
    ComfyUI's server shares, so a burst of slow calls can delay only each other, and at most
    MAX_WAITING_ROUTE_CALLS wait; a quick one answers on the event loop."""
    if not IN_COMFYUI:
        return

    async def respond(request: "web.Request") -> "web.Response":
        global _route_calls
        try:
            query = query_parameters(list(request.query.items()))
        except NextStepError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        if not slow:
            status, body = handler(query)
            return web.json_response(body, status=status)
        if _route_calls >= MAX_WAITING_ROUTE_CALLS:
            return web.json_response({"error": f"{_route_calls} requests to NextStep's routes are being answered; "
                                               f"try again in a moment"}, status=429)
        _route_calls += 1
        try:
            status, body = await asyncio.get_running_loop().run_in_executor(_ROUTE_POOL, handler, query)
        finally:
            _route_calls -= 1
        return web.json_response(body, status=status)
    PromptServer.instance.routes.get(path)(respond)
