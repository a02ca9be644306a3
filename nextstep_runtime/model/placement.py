"""Which device holds which part of the network: the decoder's layers in contiguous ranges over one or more devices.

The first range's device also holds the token embedding and the image-in projector (where a prompt or a fed-back
token enters); the last range's device holds the final norm, the image-out projector, the flow head, the VAE and
the sampling buffers (where a token's condition is read and the token solved). Hidden states cross from one range's
device to the next once per range per forward pass; each layer's KV cache lives on its layer's device.

A placement is plain data, validated when made: a range list that leaves a layer out, overlaps or is out of order,
more devices than layers, or devices of different kinds are refused with the fix.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..devices import DEVICE_TYPES, resolve_device
from ..errors import NextStepError

INPUT_PARTS = ("embed_tokens", "image_in_projector")
"""The network's parts (top-level names) where inputs enter: on the first device of a split; the other parts
outside the decoder layers go on the last."""
RANGE_ENTRY = re.compile(r"(?P<device>.+):(?P<start>\d+)-(?P<stop>\d+)")
"""`DEVICE:FIRST-LAST`, a device with the decoder layers it holds (inclusive), e.g. cuda:1:20-47."""
DEVICES_EXAMPLE = "cuda:0,cuda:1 (sized by the memory planner) or cuda:0:0-23,cuda:1:24-47 (explicit layer ranges)"


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers [start, stop) on one device."""

    device: torch.device
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start

    def describe(self) -> str:
        return f"{self.device}:{self.start}-{self.stop - 1}"


@dataclass(frozen=True)
class Placement:
    """The decoder's layers over devices, in order; one range is today's single-device model."""

    ranges: tuple[LayerRange, ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise NextStepError("a placement needs at least one device")
        kinds = sorted({layer_range.device.type for layer_range in self.ranges})
        if len(kinds) > 1:
            raise NextStepError(f"the devices of a split are of different kinds ({', '.join(kinds)}); split over "
                                f"devices of one kind, e.g. cuda:0,cuda:1")
        expected = 0
        for layer_range in self.ranges:
            if layer_range.start != expected or layer_range.count < 1:
                raise NextStepError(f"the layer ranges {self.describe()} do not cover the decoder layers in order "
                                    f"(each range starts where the previous one ended, layer {expected} next, and "
                                    f"holds at least one layer); e.g. {_example(self.layers or 48)}")
            expected = layer_range.stop

    @property
    def layers(self) -> int:
        return self.ranges[-1].stop

    @property
    def devices(self) -> tuple[torch.device, ...]:
        return tuple(layer_range.device for layer_range in self.ranges)

    @property
    def first(self) -> torch.device:
        """Where the embedding and the image-in projector are: where inputs enter."""
        return self.ranges[0].device

    @property
    def last(self) -> torch.device:
        """Where the final norm, the image-out projector, the flow head and the VAE are: the run device."""
        return self.ranges[-1].device

    @property
    def is_split(self) -> bool:
        return len(self.ranges) > 1

    def device_of_layer(self, index: int) -> torch.device:
        return next(r.device for r in self.ranges if r.start <= index < r.stop)

    def describe(self) -> str:
        return ",".join(layer_range.describe() for layer_range in self.ranges)

    @classmethod
    def single(cls, device: torch.device | str, layers: int) -> "Placement":
        return cls((LayerRange(torch.device(device), 0, layers),))

    @classmethod
    def from_counts(cls, devices: list[torch.device], counts: list[int]) -> "Placement":
        """Consecutive ranges of these many layers on these devices."""
        ranges, start = [], 0
        for device, count in zip(devices, counts):
            ranges.append(LayerRange(device, start, start + count))
            start += count
        return cls(tuple(ranges))

    def check_layers(self, layers: int) -> None:
        """Refuse a placement made for another number of decoder layers than the model's."""
        if self.layers != layers:
            raise NextStepError(f"the layer ranges {self.describe()} cover layers 0-{self.layers - 1} but the model "
                                f"has {layers} decoder layers (0-{layers - 1}); e.g. {_example(layers)}")

    def check_streamed(self, resident_layers: int | None) -> None:
        """Streamed layers (those from `resident_layers` on) are streamed to the last device: they must lie in its
        range."""
        last = self.ranges[-1]
        if resident_layers is not None and self.is_split and resident_layers < last.start:
            raise NextStepError(f"gpu_layers {resident_layers} would stream layers of {self.ranges[0].device}'s range; "
                                f"in a split only the last device ({last.device}, layers {last.start}-{last.stop - 1}) "
                                f"streams: use gpu_layers {last.start} or more, or give the last device more layers")


def _example(layers: int) -> str:
    half = max(1, layers // 2)
    return f"cuda:0:0-{half - 1},cuda:1:{half}-{layers - 1}"


def parse_device(name: str) -> torch.device:
    """One entry's device, of a known kind (whether it exists is resolve_device's check)."""
    try:
        device = torch.device(name.strip())
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise NextStepError(f"unknown device {name.strip()!r} in the device list; list devices such as "
                            f"{DEVICES_EXAMPLE}")
    return device


@dataclass(frozen=True)
class DeviceList:
    """A parsed device list: devices in order, with explicit layer ranges or without (then the planner sizes
    them)."""

    devices: tuple[torch.device, ...]
    placement: Placement | None = None
    """The explicit ranges, when every entry gave one."""

    @classmethod
    def parse(cls, text: str | list[str]) -> "DeviceList":
        """`cuda:0,cuda:1` or `cuda:0:0-23,cuda:1:24-47` (ranges inclusive; all entries with a range or none)."""
        entries = [entry.strip() for entry in (text.split(",") if isinstance(text, str) else text)]
        if not entries or not all(entries):
            raise NextStepError(f"the device list {text!r} has an empty entry; list devices such as {DEVICES_EXAMPLE}")
        matches = [RANGE_ENTRY.fullmatch(entry) for entry in entries]
        if not any(matches):
            return cls(tuple(parse_device(entry) for entry in entries))
        if not all(matches):
            raise NextStepError(f"the device list {text!r} gives layer ranges for some devices only; give one for "
                                f"every device or for none, e.g. {DEVICES_EXAMPLE}")
        ranges = tuple(LayerRange(parse_device(match["device"]), int(match["start"]), int(match["stop"]) + 1)
                       for match in matches)
        return cls(tuple(r.device for r in ranges), Placement(ranges))

    def check_present(self) -> "DeviceList":
        """Refuse a listed device this machine does not have (devices.resolve_device's check); this list otherwise."""
        for device in self.devices:
            resolve_device(str(device))
        return self

    def check_layers(self, layers: int) -> None:
        """Refuse more devices than decoder layers, and explicit ranges made for another layer count."""
        if len(self.devices) > layers:
            raise NextStepError(f"{len(self.devices)} devices for {layers} decoder layers: each device needs at "
                                f"least one layer; list at most {layers} devices")
        if self.placement is not None:
            self.placement.check_layers(layers)
