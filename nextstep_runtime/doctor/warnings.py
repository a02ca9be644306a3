"""The warnings a loader setting deserves on this install, each keyed by the setting it concerns (`compile`,
`attention:flash_attn`, `memory:int4`, `dtype:bfloat16`, ...), so the Model Loader's panel shows those of its
chosen values only and the CLI shows them all. Read from the environment report, which holds the rules' verdicts."""

from __future__ import annotations


def setting_warnings(environment: dict) -> list[dict]:
    """[{"setting": key, "text": warning}] for the run device of `environment` (environment.environment_report)."""
    device = environment["run_device"]
    warnings = []
    compiling = environment["compile"]
    if not compiling["works"] and not compiling["turned_off"]:  # turned off on purpose: runs say nothing either
        warnings.append(("compile", f"compile unavailable: {compiling['problem']}; running uncompiled"))
    for backend, choice in environment["attention"]["backends"].items():
        if choice["warning"]:
            warnings.append((f"attention:{backend}", f"flash-attn unavailable: {choice['warning']}; using PyTorch "
                                                     f"SDPA"))
    if device["fp8"]["problem"]:
        warnings += [(key, f"fp8 unavailable: {device['fp8']['problem']}") for key in ("memory:fp8", "fp8")]
    if device["int4"]["problem"]:
        warnings.append(("memory:int4", f"int4 unavailable: {device['int4']['problem']}"))
    if not device["bf16_native"]:
        warnings.append(("dtype:bfloat16", f"bfloat16 is emulated (slow) on {device['description']}; use dtype auto "
                                           f"({device['auto_dtype']})"))
    return [{"setting": setting, "text": text} for setting, text in warnings]
