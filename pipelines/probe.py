"""What an output really is, read from its bytes as they stream past (the mirror feeds
every chunk): its kind and format, its size, a video's duration. Cheap: only headers and
small boxes are kept (an image's first 256 KiB, an MP4's ``moov``, a GLB's JSON chunk);
a video's media data is counted, never held.

- PNG: the IHDR size; the IEND chunk must close the file.
- JPEG: the first SOFn's size; the file must end with EOI.
- WebP: the VP8/VP8L/VP8X size.
- MP4: top-level boxes walked; each box must arrive whole (a truncated file ends inside
  one); ``moov`` gives the duration (``mvhd``) and the video track's size (``tkhd``).
- GLB: magic, version 2, the declared length equal to the bytes that came, and a JSON
  chunk that parses with an ``asset``.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

_HEAD = 256 * 1024
#: The most a ``moov`` box or a GLB JSON chunk may take in memory.
_SMALL_BOX = 16 * 1024 * 1024


class ProbeError(Exception):
    """The bytes are not a valid output of the kind they claim to be."""


@dataclass(frozen=True, slots=True)
class MediaInfo:
    kind: str  #: image, video, mesh, or unknown
    format: str  #: png, jpeg, webp, mp4, glb, or unknown
    size: int  #: bytes
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None


class Probe:
    """Feed it the chunks of one output in order; ``finish`` says what it was."""

    def __init__(self) -> None:
        self._head = bytearray()
        self._tail = b""
        self._size = 0
        # MP4 box walking: the offset where the next top-level box starts, the box being
        # kept (moov), and what was learned.
        self._next_box = 0
        self._keep: bytearray | None = None
        self._keep_end = 0
        self._boxes: list[str] = []
        self._moov: bytes | None = None
        #: The start of a box header cut off at a chunk's end, and where it began.
        self._carry = b""
        self._walking = False

    def feed(self, chunk: bytes) -> None:
        start = self._size
        self._size += len(chunk)
        if len(self._head) < _HEAD:
            self._head += chunk[: _HEAD - len(self._head)]
        self._tail = (self._tail + chunk)[-16:]
        if self._walking:
            self._walk(chunk, start)
        elif len(self._head) >= 8 and self._head[4:8] == b"ftyp":
            # An MP4 (known once 8 bytes came, so what came before this chunk is all in
            # the head): walk its boxes from the first byte.
            self._walking = True
            self._walk(bytes(self._head[:start]) + chunk, 0)

    def _walk(self, chunk: bytes, start: int) -> None:
        """Follow top-level MP4 boxes through this chunk, keeping ``moov``."""
        if self._carry:
            chunk, start = self._carry + chunk, start - len(self._carry)
            self._carry = b""
        pos = 0
        while pos < len(chunk):
            offset = start + pos
            if self._keep is not None:
                take = min(self._keep_end - offset, len(chunk) - pos)
                self._keep += chunk[pos : pos + take]
                pos += take
                if start + pos >= self._keep_end:
                    self._moov, self._keep = bytes(self._keep), None
                continue
            if offset < self._next_box:
                pos = min(len(chunk), self._next_box - start)
                continue
            # A box header starts here (8 bytes, or 16 with a 64-bit size); one cut off at
            # the chunk's end waits for the next chunk.
            header = chunk[pos : pos + 16]
            if len(header) < 8 or (header[:4] == b"\x00\x00\x00\x01" and len(header) < 16):
                self._carry = header
                return
            size, kind = struct.unpack(">I4s", header[:8])
            if size == 1:
                size = struct.unpack(">Q", header[8:16])[0]
            elif size == 0:
                size = 1 << 62  # to the end of the file
            if size < 8:
                raise ProbeError(f"MP4: box {kind!r} at {offset} has an impossible size {size}")
            name = kind.decode("latin-1")
            self._boxes.append(name)
            self._next_box = offset + size
            if name == "moov":
                if size > _SMALL_BOX:
                    raise ProbeError(f"MP4: moov box of {size} bytes, over the probe's limit")
                self._keep, self._keep_end = bytearray(), offset + size
                continue  # kept from its first byte, header included
            pos = min(len(chunk), self._next_box - start)

    def finish(self) -> MediaInfo:
        head, size = bytes(self._head), self._size
        if head.startswith(b"\x89PNG\r\n\x1a\n"):
            return self._png(head, size)
        if head.startswith(b"\xff\xd8"):
            return self._jpeg(head, size)
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            return _webp(head, size)
        if head[4:8] == b"ftyp":
            return self._mp4(size)
        if head[:4] == b"glTF":
            return _glb(head, size)
        return MediaInfo("unknown", "unknown", size)

    def _png(self, head: bytes, size: int) -> MediaInfo:
        if len(head) < 24 or head[12:16] != b"IHDR":
            raise ProbeError("PNG: no IHDR chunk")
        width, height = struct.unpack(">II", head[16:24])
        if not self._tail.endswith(b"IEND\xaeB`\x82"):
            raise ProbeError(f"PNG: the file ends before its IEND chunk ({size} bytes came)")
        return MediaInfo("image", "png", size, width, height)

    def _jpeg(self, head: bytes, size: int) -> MediaInfo:
        pos = 2
        while pos + 9 < len(head):
            if head[pos] != 0xFF:
                raise ProbeError(f"JPEG: no marker at byte {pos}")
            marker = head[pos + 1]
            if marker == 0xFF:
                pos += 1
                continue
            length = struct.unpack(">H", head[pos + 2 : pos + 4])[0]
            if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                height, width = struct.unpack(">HH", head[pos + 5 : pos + 9])
                if not self._tail.endswith(b"\xff\xd9"):
                    raise ProbeError(f"JPEG: the file ends before its EOI ({size} bytes came)")
                return MediaInfo("image", "jpeg", size, width, height)
            pos += 2 + length
        raise ProbeError("JPEG: no frame header (SOF) in its first 256 KiB")

    def _mp4(self, size: int) -> MediaInfo:
        if self._carry:
            raise ProbeError(f"MP4: truncated: the file ends inside a box header at {size}")
        if self._next_box > size and self._next_box < (1 << 62):
            last = self._boxes[-1] if self._boxes else "?"
            raise ProbeError(
                f"MP4: truncated: box '{last}' ends at byte {self._next_box}, the file at {size}"
            )
        if self._keep is not None or self._moov is None:
            raise ProbeError(f"MP4: no complete moov box (boxes: {', '.join(self._boxes)})")
        duration, width, height = _moov(self._moov)
        return MediaInfo("video", "mp4", size, width, height, duration)


def _children(data: bytes, start: int, end: int) -> list[tuple[str, int, int]]:
    """The boxes inside data[start:end]: (type, payload start, box end)."""
    out = []
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", data[pos + 8 : pos + 16])[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ProbeError(f"MP4: box {kind!r} inside moov overruns its parent")
        out.append((kind.decode("latin-1"), pos + header, pos + size))
        pos += size
    return out


def _moov(moov: bytes) -> tuple[float, int | None, int | None]:
    """(duration in seconds, the video track's width and height) from a moov box."""
    duration: float | None = None
    width = height = None
    for kind, start, end in _children(moov, 8, len(moov)):
        if kind == "mvhd":
            version = moov[start]
            if version == 1:
                timescale, length = struct.unpack(">IQ", moov[start + 20 : start + 32])
            else:
                timescale, length = struct.unpack(">II", moov[start + 12 : start + 20])
            duration = length / timescale if timescale else None
        elif kind == "trak":
            for inner, s, _e in _children(moov, start, end):
                if inner == "tkhd":
                    off = s + (88 if moov[s] == 1 else 76)
                    w, h = struct.unpack(">II", moov[off : off + 8])
                    if w and h:
                        width, height = w >> 16, h >> 16
    if duration is None:
        raise ProbeError("MP4: moov has no mvhd (no duration)")
    return duration, width, height


def _webp(head: bytes, size: int) -> MediaInfo:
    chunk = head[12:16]
    if chunk == b"VP8 " and len(head) >= 30:
        width, height = struct.unpack("<HH", head[26:30])
        return MediaInfo("image", "webp", size, width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return MediaInfo("image", "webp", size, (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X" and len(head) >= 30:
        width = int.from_bytes(head[24:27], "little") + 1
        height = int.from_bytes(head[27:30], "little") + 1
        return MediaInfo("image", "webp", size, width, height)
    raise ProbeError("WebP: no VP8, VP8L or VP8X header")


def _glb(head: bytes, size: int) -> MediaInfo:
    if len(head) < 20:
        raise ProbeError("GLB: shorter than its header")
    _magic, version, length = struct.unpack("<4sII", head[:12])
    if version != 2:
        raise ProbeError(f"GLB: version {version}, not 2")
    if length != size:
        raise ProbeError(f"GLB: declares {length} bytes, {size} came")
    json_length, json_type = struct.unpack("<I4s", head[12:20])
    if json_type != b"JSON" or 20 + json_length > min(len(head), _SMALL_BOX + 20):
        raise ProbeError("GLB: no JSON chunk first (or one too large to read)")
    try:
        doc = json.loads(head[20 : 20 + json_length])
    except ValueError as exc:
        raise ProbeError(f"GLB: its JSON chunk does not parse ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("asset"), dict):
        raise ProbeError("GLB: its JSON has no asset")
    return MediaInfo("mesh", "glb", size)
