"""HTTP routes for the front-end extension (web/js), served by ComfyUI's server through `host.add_get_route`.

GET /nextstep/presets: the recommended settings of each released model (nextstep_runtime.presets).
GET /nextstep/plan?model=NAME&dtype=..&memory=..&fp8=..&gpu_layers=..&device=..&width=..&height=..&batch=..&cfg=..&cfg_img=..&steps=..:
the memory plan of a model from the loader's list for a job, in the weight mode the loader would load it in
with those widgets (`memory` auto chosen as the loader chooses it, for 512x512), against this server's run
device, the loader's chosen device, or each device of its split (then with a `devices` list). For a released model
not on disk yet, {"fetch": ...}: what a run will fetch (bytes in all, still to come, free on the disk) and where.
GET /nextstep/doctor[?device=..&self_check=1&warnings_only=1]: the doctor report (nextstep_runtime.doctor) for the
loader's device (default: this server's run device) and its `nextstep` model folders, with the warnings each loader
setting deserves here; the self-check (seconds) only when asked; with warnings_only, those warnings alone.

Handlers are plain functions of the query parameters returning (HTTP status, JSON body), so they are tested
without a server. A model is named, never given as a path, and only names from the loader's list are looked up.
"""

from __future__ import annotations

import math
from pathlib import Path

from nextstep_runtime import (
    MEMORY_CHOICES,
    GenerationSettings,
    Job,
    ModelFootprint,
    NextStepError,
    doctor_report,
    loader_warnings,
)
from nextstep_runtime.presets import presets_as_json
from nextstep_runtime.weights.fetch import fetch_summary
from nextstep_runtime.weights.released import RELEASED_MODELS

from . import catalog, host
from .loaders import ALL_LAYERS, DEFAULT_DEVICE, DTYPE_CHOICES, loader_devices, loader_plan

Response = tuple[int, dict]
PLAN_PARAMETERS = {"model": str, "dtype": str, "memory": str, "fp8": bool, "gpu_layers": int, "device": str,
                   "width": int, "height": int, "batch": int, "cfg": float, "cfg_img": float, "steps": int}
JOB_PARAMETERS = ("width", "height", "batch", "cfg", "cfg_img", "steps")
BOOLEANS = {"true": True, "1": True, "false": False, "0": False}


def presets_response(query: dict[str, str]) -> Response:
    return 200, presets_as_json()


def _parse(name: str, text: str) -> object:
    """One query parameter as the type PLAN_PARAMETERS gives it."""
    kind = PLAN_PARAMETERS[name]
    if kind is str:
        return text
    if kind is bool:
        if text.lower() in BOOLEANS:
            return BOOLEANS[text.lower()]
    else:
        try:
            value = kind(text)
            if math.isfinite(value):
                return value
        except ValueError:
            pass
    expected = {bool: "true or false", int: "a whole number", float: "a number"}[kind]
    raise NextStepError(f"plan parameter {name}={text!r} is not {expected}")


def _job(values: dict) -> Job:
    """The job the parameters describe, checked as the sampler checks its settings."""
    job = Job(GenerationSettings(**{name: values[name] for name in JOB_PARAMETERS if name in values}))
    job.validate()
    return job


def _check_mode_values(values: dict) -> None:
    """The weight-mode parameters are among the loader's own choices."""
    for name, choices in (("dtype", DTYPE_CHOICES), ("memory", MEMORY_CHOICES)):
        if name in values and values[name] not in choices:
            raise NextStepError(f"plan parameter {name}={values[name]!r} is not one of {', '.join(choices)}")
    if values.get("gpu_layers", ALL_LAYERS) < ALL_LAYERS:
        raise NextStepError(f"plan parameter gpu_layers={values['gpu_layers']} is below {ALL_LAYERS} (all layers)")


def plan_response(query: dict[str, str]) -> Response:
    """The plan as JSON, plus `loads_as` (the mode, in words), `memory_choice` (the loader's one-line account
    of an `auto` choice, else null) and `vae_config_assumed` (where the VAE has no config: which file is missing and
    the values assumed, else null)."""
    unknown = sorted(set(query) - set(PLAN_PARAMETERS))
    if unknown:
        return 400, {"error": f"unknown plan parameter {unknown[0]!r}; known: {', '.join(PLAN_PARAMETERS)}"}
    if "model" not in query:
        return 400, {"error": "the plan needs model=NAME, a model from NextStep Model Loader's list"}
    try:
        values = {name: _parse(name, text) for name, text in query.items()}
        _check_mode_values(values)
        job = _job(values)
    except NextStepError as exc:
        return 400, {"error": str(exc)}
    if values["model"] not in catalog.model_names():
        return 404, {"error": f"NextStep model {values['model']!r} is not in NextStep Model Loader's list "
                              f"(folders under models/{host.MODEL_FOLDER_KEY}/ that hold config.json)"}
    if values["model"] in catalog.absent_released_models():  # what a run will fetch, and where
        return 200, {"fetch": fetch_summary(RELEASED_MODELS[values["model"]], catalog.fetch_folder(values["model"]))}
    try:  # a folder that cannot be read as it is: the loader would refuse it too
        folder = catalog.model_folder(values["model"])
        footprint = ModelFootprint.from_folder(folder)
    except NextStepError as exc:
        return 422, {"error": str(exc)}
    try:
        plan, choice = loader_plan(folder, values.get("dtype", "auto"), values.get("memory", "auto"),
                                   values.get("fp8", False), values.get("gpu_layers", ALL_LAYERS),
                                   values.get("device", DEFAULT_DEVICE), job, footprint)
    except NextStepError as exc:  # widget values the loader refuses too (fp8 on with memory int4, a mode the folder
        return 400, {"error": str(exc)}  # or this device cannot load in, a device list it refuses)
    return 200, {**plan.to_dict(), "memory_choice": choice, "vae_config_assumed": footprint.vae_config_assumed}


DOCTOR_PARAMETERS = ("self_check", "warnings_only", "device")


def doctor_response(query: dict[str, str]) -> Response:
    """The doctor report as JSON for the device the loader's `device` widget names (default: ComfyUI's; of a split,
    the last device, where attention, the flow head and compiling run); `self_check=1` adds the self-check;
    `warnings_only=1` answers {"warnings": ...} alone (the Model Loader's panel), from the run device's reports only."""
    unknown = sorted(set(query) - set(DOCTOR_PARAMETERS))
    if unknown:
        return 400, {"error": f"unknown doctor parameter {unknown[0]!r}; known: {', '.join(DOCTOR_PARAMETERS)}"}
    switches = {name: query.get(name, "0").lower() for name in ("self_check", "warnings_only")}
    for name, text in switches.items():
        if text not in BOOLEANS:
            return 400, {"error": f"doctor parameter {name}={query[name]!r} is not true or false"}
    try:
        devices = loader_devices(query.get("device", DEFAULT_DEVICE))
    except NextStepError as exc:
        return 400, {"error": str(exc)}
    device = devices.devices[-1]
    if BOOLEANS[switches["warnings_only"]]:
        return 200, {"warnings": loader_warnings(device)}
    roots = [Path(root) for root in host.folder_roots(host.MODEL_FOLDER_KEY)]
    return 200, doctor_report(device, roots, check=BOOLEANS[switches["self_check"]])


def register_routes() -> None:
    """Serve the routes when running inside ComfyUI (a no-op elsewhere)."""
    host.add_get_route("/nextstep/presets", presets_response)
    host.add_get_route("/nextstep/plan", plan_response, slow=True)
    host.add_get_route("/nextstep/doctor", doctor_response, slow=True)
