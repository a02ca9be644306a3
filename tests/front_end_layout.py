"""How ComfyUI's front-end (1.35) lays a node out from its input specs: which inputs are sockets, which are
widgets, in the order a saved workflow's widgets_values holds them. Shared by the example-workflow tests
(this pack's nodes, from INPUT_TYPES) and test_distributed.py (ComfyUI-Distributed's, from /object_info)."""

from __future__ import annotations

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")  # COMBO: how /object_info may name a list
SEED_NAMES = ("seed", "noise_seed")  # INT inputs the front-end gives a control widget unless told otherwise


def is_widget(spec: tuple | list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def layout(inputs: dict, outputs: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(socket input names, widget names in saved order, output types) of a node with these required and
    optional input specs; a widget's control (fixed, increment, ...) is saved right after it as "<name>:control"."""
    widgets = []
    for name, spec in inputs.items():
        if is_widget(spec):
            widgets.append(name)
            control = (spec[1] if len(spec) > 1 else {}).get("control_after_generate")
            if control or (control is None and spec[0] == "INT" and name in SEED_NAMES):
                widgets.append(f"{name}:control")
    return [name for name, spec in inputs.items() if not is_widget(spec)], widgets, list(outputs)
