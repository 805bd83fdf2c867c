"""Independent readers for the files the emulator serves (not shared with its writers)."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

_CONTAINERS = {b"moov", b"trak", b"mdia", b"minf", b"stbl", b"edts"}


def iter_boxes(
    data: bytes, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, int, int]]:
    """Yield (type, payload_start, box_end) for ISO-BMFF boxes between start and end."""
    end = len(data) if end is None else end
    pos = start
    while pos < end:
        if end - pos < 8:
            raise ValueError(f"truncated box header at {pos}")
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            (size,) = struct.unpack(">Q", data[pos + 8 : pos + 16])
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"box {kind!r} at {pos} overruns its parent")
        yield kind, pos + header, pos + size
        pos += size


@dataclass
class Mp4Info:
    top_level: list[bytes]
    width: int
    height: int
    duration_s: float
    sample_count: int


def parse_mp4(data: bytes) -> Mp4Info:
    top = [kind for kind, _, _ in iter_boxes(data)]
    info: dict[str, Any] = {"sample_count": 0}

    def walk(start: int, end: int) -> None:
        for kind, body, box_end in iter_boxes(data, start, end):
            if kind in _CONTAINERS:
                walk(body, box_end)
            elif kind == b"mvhd":
                version = data[body]
                if version == 1:
                    timescale, duration = struct.unpack(">IQ", data[body + 20 : body + 32])
                else:
                    timescale, duration = struct.unpack(">II", data[body + 12 : body + 20])
                info["duration_s"] = duration / timescale
            elif kind == b"tkhd":
                w, h = struct.unpack(">II", data[box_end - 8 : box_end])
                if w:
                    info["width"], info["height"] = w >> 16, h >> 16
            elif kind == b"stsz":
                (info["sample_count"],) = struct.unpack(">I", data[body + 8 : body + 12])

    for kind, body, box_end in iter_boxes(data):
        if kind == b"moov":
            walk(body, box_end)
    return Mp4Info(top_level=top, **info)


@dataclass
class GlbInfo:
    version: int
    length: int
    document: dict[str, Any]
    bin_length: int


def parse_glb(data: bytes) -> GlbInfo:
    magic, version, length = struct.unpack("<4sII", data[:12])
    if magic != b"glTF":
        raise ValueError(f"bad GLB magic {magic!r}")
    json_len, json_type = struct.unpack("<I4s", data[12:20])
    if json_type != b"JSON":
        raise ValueError("first chunk is not JSON")
    document = json.loads(data[20 : 20 + json_len])
    pos = 20 + json_len
    bin_length = 0
    if pos < len(data):
        bin_length, bin_type = struct.unpack("<I4s", data[pos : pos + 8])
        if bin_type != b"BIN\x00":
            raise ValueError("second chunk is not BIN")
    return GlbInfo(version=version, length=length, document=document, bin_length=bin_length)
