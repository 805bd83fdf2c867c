"""Real, cheap, deterministic media for the emulator's outputs.

Every file is derived from ``material`` (bytes hashed from the request: model,
prompt, seed, and any input image), so the same request yields the same bytes.
Images via Pillow, MP4 (H.264, 2 fps) via PyAV, binary glTF via pygltflib. Renders are
pure functions of their arguments and memoised (a few recent ones), so a load of identical
requests, as in the pipeline benchmark, costs the emulator one render per kind.
"""

from __future__ import annotations

import functools
import hashlib
import io
import struct
from typing import Final

import av
import pygltflib
from PIL import Image, ImageDraw, ImageOps

VIDEO_FPS: Final = 2
_RECENT: Final = 16
CONTENT_TYPES: Final = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "mp4": "video/mp4",
    "glb": "model/gltf-binary",
}
EXTENSIONS: Final = {"jpeg": "jpeg", "png": "png", "webp": "webp", "mp4": "mp4", "glb": "glb"}


def digest(*parts: object) -> bytes:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
        h.update(b"\x00")
    return h.digest()


def _palette(material: bytes) -> list[tuple[int, int, int]]:
    return [(material[i], material[i + 1], material[i + 2]) for i in range(0, 24, 3)]


def _picture(width: int, height: int, material: bytes, base: Image.Image | None) -> Image.Image:
    """A gradient with a few shapes; small canvas scaled up keeps it cheap at any size."""
    colours = _palette(material)
    small = Image.new("RGB", (64, 64), colours[0])
    draw = ImageDraw.Draw(small)
    for i in range(1, 7):
        x0, y0 = material[i] % 48, material[i + 8] % 48
        size = 8 + material[i + 16] % 24
        if i % 2:
            draw.ellipse((x0, y0, x0 + size, y0 + size), fill=colours[i])
        else:
            draw.rectangle((x0, y0, x0 + size, y0 + size), fill=colours[i])
    picture = small.resize((width, height), Image.Resampling.BILINEAR)
    if base is not None:
        fitted = ImageOps.fit(base.convert("RGB"), (width, height))
        picture = Image.blend(fitted, picture, 0.35)
    return picture


def _decode(image_bytes: bytes | None) -> Image.Image | None:
    if image_bytes is None:
        return None
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    return image


@functools.lru_cache(maxsize=_RECENT)
def render_image(width: int, height: int, fmt: str, material: bytes) -> bytes:
    buf = io.BytesIO()
    pillow_format = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    options = {"quality": 85} if fmt in ("jpeg", "webp") else {"compress_level": 1}
    _picture(width, height, material, None).save(buf, format=pillow_format, **options)
    return buf.getvalue()


@functools.lru_cache(maxsize=_RECENT)
def render_video(
    width: int, height: int, duration_s: int, material: bytes, first_frame: bytes | None = None
) -> bytes:
    """An H.264 MP4 of exactly ``duration_s`` seconds at VIDEO_FPS."""
    background = _picture(width, height, material, _decode(first_frame))
    side = max(16, min(width, height) // 6)
    colours = _palette(material)
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=VIDEO_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        frames = duration_s * VIDEO_FPS
        for n in range(frames):
            # A square crossing the frame: motion without re-rendering the background.
            picture = background.copy()
            x = (width - side) * n // max(frames - 1, 1)
            picture.paste(colours[n % 8], (x, (height - side) // 2, x + side, (height + side) // 2))
            frame = av.VideoFrame.from_image(picture)  # type: ignore[no-untyped-call]
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# A unit cube: 8 corners, 12 triangles.
_CUBE_POSITIONS: Final = [(x, y, z) for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)]
_CUBE_INDICES: Final = [
    0, 1, 3, 0, 3, 2, 4, 6, 7, 4, 7, 5, 0, 4, 5, 0, 5, 1,
    2, 3, 7, 2, 7, 6, 0, 2, 6, 0, 6, 4, 1, 5, 7, 1, 7, 3,
]  # fmt: skip


@functools.lru_cache(maxsize=_RECENT)
def render_mesh(material: bytes, texture: bytes | None = None) -> bytes:
    """A binary glTF 2.0 cube, vertex-coloured from ``material``, embedding the input image."""
    colours = _palette(material)
    positions = b"".join(struct.pack("<3f", *p) for p in _CUBE_POSITIONS)
    vertex_colours = b"".join(struct.pack("<3f", *(c / 255 for c in colours[i])) for i in range(8))
    uvs = b"".join(struct.pack("<2f", (x + 0.5), (y + 0.5)) for x, y, _ in _CUBE_POSITIONS)
    indices = struct.pack(f"<{len(_CUBE_INDICES)}H", *_CUBE_INDICES)
    chunks = [positions, vertex_colours, uvs, indices]
    if texture is not None:
        chunks.append(texture)

    blob = b""
    views: list[pygltflib.BufferView] = []
    for chunk in chunks:
        blob += b"\x00" * (-len(blob) % 4)
        views.append(pygltflib.BufferView(buffer=0, byteOffset=len(blob), byteLength=len(chunk)))
        blob += chunk

    accessors = [
        pygltflib.Accessor(
            bufferView=0,
            componentType=pygltflib.FLOAT,
            count=8,
            type=pygltflib.VEC3,
            min=[-0.5, -0.5, -0.5],
            max=[0.5, 0.5, 0.5],
        ),
        pygltflib.Accessor(bufferView=1, componentType=pygltflib.FLOAT, count=8, type="VEC3"),
        pygltflib.Accessor(bufferView=2, componentType=pygltflib.FLOAT, count=8, type="VEC2"),
        pygltflib.Accessor(
            bufferView=3,
            componentType=pygltflib.UNSIGNED_SHORT,
            count=len(_CUBE_INDICES),
            type=pygltflib.SCALAR,
        ),
    ]
    attributes = pygltflib.Attributes(POSITION=0, COLOR_0=1, TEXCOORD_0=2)
    gltf = pygltflib.GLTF2(
        asset=pygltflib.Asset(generator="wavechain-emulator", version="2.0"),
        scene=0,
        scenes=[pygltflib.Scene(nodes=[0])],
        nodes=[pygltflib.Node(mesh=0, name="hunyuan3d")],
        meshes=[
            pygltflib.Mesh(
                primitives=[pygltflib.Primitive(attributes=attributes, indices=3, material=0)]
            )
        ],
        accessors=accessors,
        bufferViews=views,
        buffers=[pygltflib.Buffer(byteLength=len(blob))],
    )
    pbr = pygltflib.PbrMetallicRoughness(metallicFactor=0.1, roughnessFactor=0.8)
    if texture is not None:
        mime = "image/png" if texture.startswith(b"\x89PNG") else "image/jpeg"
        gltf.images = [pygltflib.Image(bufferView=4, mimeType=mime)]
        gltf.textures = [pygltflib.Texture(source=0)]
        pbr.baseColorTexture = pygltflib.TextureInfo(index=0)
    gltf.materials = [pygltflib.Material(pbrMetallicRoughness=pbr, name="pbr")]
    gltf.set_binary_blob(blob)
    return b"".join(gltf.save_to_bytes())


def as_texture(image_bytes: bytes) -> bytes:
    """glTF textures must be PNG or JPEG; re-encode anything else (webp) as PNG."""
    if image_bytes.startswith((b"\x89PNG", b"\xff\xd8")):
        return image_bytes
    buf = io.BytesIO()
    Image.open(io.BytesIO(image_bytes)).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()
