"""The doctor report as text for a terminal: one section per topic, a line per fact, the reason beside every no."""

from __future__ import annotations

GB = 2**30


def _bytes(value: int | None) -> str:
    return "unknown" if value is None else f"{value / GB:.1f} GB"


def _yes(works: bool, problem: str | None, detail: str = "") -> str:
    return f"yes{detail}" if works else f"no: {problem}"


def _versions(report: dict) -> list[str]:
    versions = report["versions"]
    cuda = versions["cuda"] or "none (a CPU-only torch)"
    # a CUDA build that finds no GPU is the usual sign of a missing or too old NVIDIA driver
    unavailable = "no (no NVIDIA GPU or working driver found)" if versions["cuda"] else "no"
    return ["versions", f"  python {versions['python']} ({versions['executable']})", f"  torch {versions['torch']}",
            f"  CUDA {cuda}, available: {'yes' if versions['cuda_available'] else unavailable}",
            f"  platform {versions['platform']}"]


def _device(device: dict) -> list[str]:
    capability = f", compute capability {device['capability']}" if device["capability"] else ""
    fp8 = _yes(device["fp8"]["works"], device["fp8"]["problem"], f", {device['fp8']['kernel']}")
    return [f"  {device['device']}: {device['name']}{capability}",
            f"    memory {_bytes(device['memory_free_bytes'])} free of {_bytes(device['memory_total_bytes'])}",
            f"    dtype auto: {device['auto_dtype']}; bfloat16 native: {'yes' if device['bf16_native'] else 'no'}",
            *([f"    float16: {device['float16']}"] if device["float16"] else []),
            f"    fp8 weights: {fp8}", f"    int4 weights: {_yes(device['int4']['works'], device['int4']['problem'])}"]


def _attention(report: dict) -> list[str]:
    attention = report["attention"]
    flash = attention["flash_attn"]
    difference = "" if flash["max_difference"] is None else f" (max difference from SDPA {flash['max_difference']:.2g})"
    backends = ", ".join(f"{name} -> {choice['runs']}" for name, choice in attention["backends"].items())
    return ["attention", f"  flash-attn: {_yes(flash['works'], flash['problem'], difference)}",
            f"  backend that runs, per choice: {backends}"]


def _compile(report: dict) -> list[str]:
    compiling = report["compile"]
    timed = f" (a tiny compile took {compiling['seconds']:.1f} s)" if compiling["works"] else ""
    verdict = _yes(compiling["works"], compiling["problem"], timed)
    return ["compile", f"  torch.compile on {compiling['device']}: {verdict}"]


def _models(report: dict) -> list[str]:
    cache = report["hf_cache"]
    lines = ["models"] + ([f"  ComfyUI {report['comfyui']}"] if report.get("comfyui") else [])
    lines.append(f"  Hugging Face cache {cache['path']}")
    lines += [f"    {repo}: {path}" for repo, path in cache["nextstep_repos"].items()] or ["    no NextStep repos"]
    lines += [f"    {entry}: skipped: {problem}" for entry, problem in cache["problems"].items()]
    for root in report["model_folders"] or []:
        lines.append(f"  model folder {root['path']}" + ("" if root["exists"] else " (does not exist)"))
        for entry in root["entries"]:
            if "problem" in entry:
                lines.append(f"    {entry['name']}: not listed: {entry['problem']}")
            else:
                vae = ", its own vae/" if entry["vae"] else ", no vae/ (choose a VAE)"
                lines.append(f"    {entry['name']}: {entry['parameters'] / 1e9:.2f}B parameters, {entry['weights']} "
                             f"weights{vae}")
        if root["exists"] and not root["entries"]:
            lines.append("    empty")
    return lines


def _capacity(report: dict) -> list[str]:
    capacity = report["nextstep_14b"]
    lines = [f"14B models (NextStep-1.1, NextStep-1-Large, NextStep-1-Large-Edit) on {capacity['device']}"]
    if capacity["fits"]:
        return lines + [f"  run in {capacity['loads_as']} (needs {_bytes(capacity['needs_bytes'])} of "
                        f"{_bytes(capacity['free_bytes'])} free for a 512x512 image)"]
    lines.append(f"  not in {capacity['loads_as']}: {capacity['advice']}")
    suggested = capacity["suggested"]
    if suggested is not None:
        verdict = "runs" if suggested["fits"] else "does not fit either"
        lines.append(f"  in {suggested['loads_as']}: {verdict} (needs {_bytes(suggested['needs_bytes'])})")
    return lines


def _self_check(check: dict) -> list[str]:
    lines = [f"self-check on {check['device']} against the CPU float32 reference ({check['seconds']:.1f} s): "
             f"{'passed' if check['passed'] else 'FAILED'}"]
    for entry in check["checks"]:
        measured = (f"max difference {entry['max_difference']:.2g} (tolerance {entry['tolerance']:g})"
                    if "max_difference" in entry else "")
        note = f" - {entry['note']}" if entry.get("note") else ""
        lines.append(f"  {entry['name']:<10} {entry['precision']:<9} {entry['verdict']:<9} {measured}{note}".rstrip())
    return lines


def render_text(report: dict) -> str:
    lines = _versions(report) + ["devices"]
    for device in report["devices"]:
        lines += _device(device)
    lines.append(f"  models run on: {report['run_device']['device']}")
    lines += _attention(report) + _compile(report) + _models(report) + _capacity(report)
    lines += ["warnings"] + ([f"  {warning['setting']}: {warning['text']}" for warning in report["warnings"]]
                             or ["  none"])
    if report["self_check"] is not None:
        lines += _self_check(report["self_check"])
    lines.append(f"done in {report['seconds']:.1f} s")
    return "\n".join(lines) + "\n"
