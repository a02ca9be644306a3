"""Which device holds which part of the network, and in which dtype it computes there: the decoder's layers in
contiguous ranges over one device or several (one device is a placement with one range).

The first range's device also holds the token embedding and the image-in projector (where a prompt or a fed-back
token enters); the last range's device, the run device, holds the final norm, the image-out projector, the flow
head and the sampling buffers (where a token's condition is read and the token solved). Hidden states cross from
one range to the next once per range per forward pass, cast to the next range's dtype; each layer's KV cache lives
on its layer's device in its range's dtype.

A device list as users type it (`DeviceList`) is parsed once, its device names normalised there
(devices.parse_device); the placement the runtime loads with is made from it by the memory planner, which sizes the
ranges when the list gives none, and each range's dtype is the device's own (devices.resolve_dtype), fixed when
the model is placed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..devices import check_present, parse_device
from ..errors import NextStepError

INPUT_PARTS = ("embed_tokens", "image_in_projector")
"""The network's parts (top-level names) where inputs enter: on the first range's device; the other parts outside
the decoder layers go on the last range's."""
RANGE_ENTRY = re.compile(r"(?P<device>.+?):(?P<start>-?\d+)-(?P<stop>-?\d+)")
"""`DEVICE:FIRST-LAST`, a device with the decoder layers it holds (inclusive), e.g. cuda:1:20-47."""
MAX_LAYER_DIGITS = 6
"""Layer numbers longer than this are refused before they are converted (Python refuses ints of 4300+ digits)."""
DEVICES_EXAMPLE = "cuda:0,cuda:1 (sized by the memory planner) or cuda:0:0-23,cuda:1:24-47 (explicit layer ranges)"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers [start, stop) on one device, computing in `dtype`."""

    device: torch.device
    start: int
    stop: int
    dtype: torch.dtype

    @property
    def count(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.device}:{self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class Placement:
    """The decoder's layers over devices, in order."""

    ranges: tuple[LayerRange, ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise NextStepError("a placement needs at least one device")
        check_one_kind([layer_range.device for layer_range in self.ranges])

    @classmethod
    def from_counts(cls, entries: list[tuple[torch.device, torch.dtype]], counts: list[int]) -> "Placement":
        """Consecutive ranges of these many layers on these (device, dtype) entries."""
        ranges, start = [], 0
        for (device, dtype), count in zip(entries, counts):
            ranges.append(LayerRange(device, start, start + count, dtype))
            start += count
        return cls(tuple(ranges))

    @classmethod
    def single(cls, device: torch.device | str, dtype: torch.dtype, layers: int) -> "Placement":
        """Every layer on one device."""
        return cls((LayerRange(torch.device(device), 0, layers, dtype),))

    @property
    def layers(self) -> int:
        return self.ranges[-1].stop

    @property
    def devices(self) -> tuple[torch.device, ...]:
        """The distinct devices, in order of their first range (a device may hold several ranges: two entries of one
        GPU, or of the CPU in tests)."""
        return tuple(dict.fromkeys(layer_range.device for layer_range in self.ranges))

    @property
    def input_device(self) -> torch.device:
        """Where the embedding and the image-in projector are: where inputs enter."""
        return self.ranges[0].device

    @property
    def input_dtype(self) -> torch.dtype:
        return self.ranges[0].dtype

    @property
    def run_device(self) -> torch.device:
        """Where the final norm, the image-out projector, the flow head and the sampling buffers are."""
        return self.ranges[-1].device

    @property
    def run_dtype(self) -> torch.dtype:
        return self.ranges[-1].dtype

    def range_index_of_layer(self, layer: int) -> int:
        return next(index for index, r in enumerate(self.ranges) if r.start <= layer < r.stop)

    def describe(self) -> str:
        return ",".join(layer_range.describe() for layer_range in self.ranges)

    @property
    def split(self) -> str | None:
        """The ranges in words where the layers are split over several ranges (what a message about a split shows),
        else None."""
        return self.describe() if len(self.ranges) > 1 else None

    def describe_dtypes(self) -> str:
        """The compute dtype, or each device's where they differ (`float16 on cuda:0, bfloat16 on cuda:1`)."""
        per_device = {r.device: r.dtype for r in self.ranges}
        if len(set(per_device.values())) == 1:
            return _dtype_name(self.run_dtype)
        return ", ".join(f"{_dtype_name(dtype)} on {device}" for device, dtype in per_device.items())

    def check_layers(self, layers: int) -> None:
        """Refuse a placement made for another number of decoder layers than the model's."""
        check_spans([(r.device, (r.start, r.stop)) for r in self.ranges], layers)

    def check_streamed(self, gpu_layers: int | None) -> None:
        """Streamed layers (those from `gpu_layers` on) are streamed to the run device: they must lie in the last
        range."""
        last = self.ranges[-1]
        if gpu_layers is not None and gpu_layers < last.start:
            raise NextStepError(f"gpu_layers {gpu_layers} would stream layers of {self.ranges[0].device}'s range; "
                                f"in a split only the last device ({last.device}, layers {last.start}-{last.stop - 1}) "
                                f"streams: use gpu_layers {last.start} or more, or give the last device more layers")


def check_one_kind(devices: list[torch.device]) -> None:
    """Refuse a split over devices of different kinds: hidden states and KV caches cross between them every token."""
    kinds = sorted({device.type for device in devices})
    if len(kinds) > 1:
        raise NextStepError(f"the devices of a split are of different kinds ({', '.join(kinds)}); split over "
                            f"devices of one kind, e.g. cuda:0,cuda:1")


def _example(layers: int) -> str:
    half = max(1, layers // 2)
    return f"cuda:0:0-{half - 1},cuda:1:{half}-{layers - 1}"


def _layer_number(text: str, entry: str) -> int:
    if len(text.lstrip("-")) > MAX_LAYER_DIGITS:
        raise NextStepError(f"the layer number {text[:12]}... in {entry!r} is far beyond any model's layers; give "
                            f"ranges such as {DEVICES_EXAMPLE}")
    number = int(text)
    if number < 0:
        raise NextStepError(f"the layer number {number} in {entry!r} is negative; layers count from 0, e.g. "
                            f"{DEVICES_EXAMPLE}")
    return number


def _parse_entry(entry: str, text: object) -> tuple[torch.device, tuple[int, int] | None]:
    match = RANGE_ENTRY.fullmatch(entry)
    name, span = (match["device"], (match["start"], match["stop"])) if match else (entry, None)
    try:
        device = parse_device(name)
    except NextStepError:
        raise NextStepError(f"unknown device {name.strip()!r} in the device list {text!r}; list devices such as "
                            f"{DEVICES_EXAMPLE}") from None
    if span is None:
        return device, None
    start, last = (_layer_number(number, entry) for number in span)
    return device, (start, last + 1)


@dataclass(frozen=True)
class DeviceList:
    """The devices a model is placed on, as a user listed them: in order, with explicit layer ranges or without
    (the planner sizes them). One device is a list of one."""

    devices: tuple[torch.device, ...]
    spans: tuple[tuple[int, int], ...] | None = None
    """Explicit [start, stop) layers per entry, when every entry gave a range."""

    @classmethod
    def parse(cls, text: "str | torch.device | list[str | torch.device]") -> "DeviceList":
        """`cuda:0,cuda:1` or `cuda:0:0-23,cuda:1:24-47` (ranges inclusive; all entries with a range or none), or a
        list of such entries or of torch.device."""
        if isinstance(text, torch.device):
            entries = [str(text)]
        elif isinstance(text, (list, tuple)) and all(isinstance(entry, (str, torch.device)) for entry in text):
            entries = [str(entry).strip() for entry in text]
        elif isinstance(text, str):
            entries = [entry.strip() for entry in text.split(",")]
        else:
            raise NextStepError(f"a device list is a text such as {DEVICES_EXAMPLE}, or a list of device names or "
                                f"torch.device, not {type(text).__name__} {text!r}")
        if not entries or not all(entries):
            raise NextStepError(f"the device list {text!r} has an empty entry; list devices such as {DEVICES_EXAMPLE}")
        parsed = [_parse_entry(entry, text) for entry in entries]
        spans = [span for _, span in parsed]
        if any(span is not None for span in spans) and None in spans:
            raise NextStepError(f"the device list {text!r} gives layer ranges for some devices only; give one for "
                                f"every device or for none, e.g. {DEVICES_EXAMPLE}")
        check_one_kind([device for device, _ in parsed])
        return cls(tuple(device for device, _ in parsed), None if None in spans else tuple(spans))

    def check_present(self) -> "DeviceList":
        """Refuse a listed device this machine does not have; this list otherwise."""
        for device in self.devices:
            check_present(device)
        return self

    def check_layers(self, layers: int) -> None:
        """Refuse more devices than decoder layers, and explicit ranges that do not cover the model's layers in order
        (each range starting where the previous one ended, none empty)."""
        if len(self.devices) > layers:
            raise NextStepError(f"{len(self.devices)} devices for {layers} decoder layers: each device needs at "
                                f"least one layer; list at most {layers} devices")
        if self.spans is not None:
            check_spans(list(zip(self.devices, self.spans)), layers)


def check_spans(spans: list[tuple[torch.device, tuple[int, int]]], layers: int) -> None:
    """Refuse (device, [start, stop)) ranges that do not cover a model's `layers` decoder layers in order, naming an
    example for that many layers."""
    expected = 0
    for _, (start, stop) in spans:
        if start != expected or stop <= start:
            break
        expected = stop
    if expected != layers:
        given = ",".join(f"{device}:{start}-{stop - 1}" for device, (start, stop) in spans)
        raise NextStepError(f"the layer ranges {given} do not cover the model's {layers} decoder layers (0-"
                            f"{layers - 1}) in order: each range starts where the previous one ended and holds at "
                            f"least one layer; e.g. {_example(layers)}")
