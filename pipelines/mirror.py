"""Copy provider outputs into our S3 bucket, streaming, before the provider deletes them.

Downloads go through aiohttp in chunks; boto3 (synchronous) uploads in worker threads
under a capacity limiter. Memory stays at a few MiB whatever the file size:

- an output smaller than one part is read into memory and put in one request;
- an output of known size, up to S3's 5 GiB single-request limit, streams straight from the
  download into one ``PutObject`` (no multipart completion, which costs a second pass over
  the bytes on some S3 implementations);
- anything else (unknown size, or larger) goes up as multipart, one part at a time.

Keys are deterministic, ``{prefix}runs/{run}/{stage}/{n}.{ext}``; the object's metadata
names the run, stage, model and task, and its ``sha256`` tag is written once every byte is
stored, so an object already there for the same task with that tag is not fetched again.
The digest is a tag rather than metadata because metadata is fixed when an upload starts,
and rewriting it needs a copy of the whole object (refused above 5 GiB).

Errors: ``MirrorRejectedError`` is permanent (forbidden scheme or host, too large, the
source answers 4xx); anything else (S3 or network trouble, 5xx) is worth retrying.

Safety: only ``http``/``https``, only hosts the allow-list names, and never a private,
loopback or link-local address after resolution (loopback only when a local endpoint is
configured), checked on every redirect hop and at every connection (``GuardedResolver``).
What the provider serves is stored as served: no automatic decompression (a
``Content-Encoding`` is kept on the object), and every byte counts against the cap.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fnmatch
import hashlib
import ipaddress
import json
import mimetypes
import socket
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, TypeVar
from urllib.parse import urljoin, urlsplit

import aiohttp
import anyio.from_thread
import anyio.to_thread
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from anyio import CapacityLimiter, EndOfStream
from anyio.streams.memory import MemoryObjectReceiveStream
from botocore.exceptions import ClientError

from pipelines.errors import WavechainError
from pipelines.probe import Probe

T = TypeVar("T")
PART_SIZE: Final = 8 * 1024 * 1024
#: S3 takes at most 5 GiB in one PutObject.
SINGLE_PUT_MAX: Final = 5 * 1024**3
#: Chunks buffered between the download and a streaming upload.
_PIPE_CHUNKS: Final = 4
_READ: Final = 1024 * 1024
_MAX_REDIRECTS: Final = 3
EXTENSIONS: Final = {
    "image/jpeg": "jpeg",
    "image/png": "png",
    "image/webp": "webp",
    "video/mp4": "mp4",
    "model/gltf-binary": "glb",
}
_KNOWN_EXT: Final = {"jpeg", "jpg", "png", "webp", "mp4", "glb", "gltf", "obj", "fbx", "usdz"}
_TYPES: Final = {v: k for k, v in EXTENSIONS.items()} | {"jpg": "image/jpeg"}


class MirrorRejectedError(WavechainError):
    """This output can never be copied; the stage fails with this message."""


@dataclass(frozen=True, slots=True)
class MirroredObject:
    uri: str
    key: str
    size: int
    sha256: str
    content_type: str
    reused: bool = False


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    bucket: str
    prefix: str = ""
    #: Hostname patterns outputs may come from (fnmatch: ``*.cloudfront.net``).
    allowed_hosts: tuple[str, ...] = ()
    max_bytes: int = 2 * 1024**3
    #: Loopback sources are allowed only when a local endpoint (an emulator) is configured.
    allow_loopback: bool = False
    #: A download must connect within this, and be done within ``total_timeout_s``.
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    total_timeout_s: float = 3600.0
    part_size: int = PART_SIZE
    #: Outputs of known size up to this go up in one streaming PutObject.
    single_put_max: int = SINGLE_PUT_MAX


def address_refusal(address: str, *, allow_loopback: bool) -> str | None:
    """Why ``address`` may not be fetched from, or None: private, loopback (unless
    allowed), link-local (cloud metadata), multicast, reserved or unspecified addresses;
    an IPv4-mapped IPv6 address is judged by its IPv4."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address!r} is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        return None if allow_loopback else f"{ip} is a loopback address"
    if ip.is_link_local:
        return f"{ip} is a link-local address"
    if ip.is_private or ip.is_reserved or ip.is_multicast or ip.is_unspecified:
        return f"{ip} is a private or reserved address"
    return None


class ForbiddenAddressError(WavechainError, OSError):
    """A host resolved to an address outputs may not come from (an OSError too, which is
    what aiohttp expects of a resolver)."""


class GuardedResolver(AbstractResolver):
    """aiohttp's resolver, refusing hosts that resolve to a forbidden address: checked at
    every connection, so a redirect or a DNS answer cannot lead a download inside."""

    def __init__(self, *, allow_loopback: bool) -> None:
        self._inner = DefaultResolver()
        self._allow_loopback = allow_loopback

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            refusal = address_refusal(result["host"], allow_loopback=self._allow_loopback)
            if refusal is not None:
                raise ForbiddenAddressError(f"output host {host!r} resolves to {refusal}")
        return results

    async def close(self) -> None:
        await self._inner.close()


def mirror_session(*, allow_loopback: bool) -> aiohttp.ClientSession:
    """The session downloads run on: guarded resolution, bytes as served."""
    connector = aiohttp.TCPConnector(
        resolver=GuardedResolver(allow_loopback=allow_loopback), limit=64
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=False)


def host_allowed(url: str, patterns: Sequence[str]) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    return bool(host) and any(fnmatch.fnmatchcase(host, p.lower()) for p in patterns)


class S3Mirror:
    def __init__(
        self,
        s3: Any,
        session: aiohttp.ClientSession,
        config: MirrorConfig,
        *,
        limiter: CapacityLimiter,
    ) -> None:
        self._s3 = s3
        self._session = session
        self.config = config
        self._limiter = limiter

    async def _call(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        return await anyio.to_thread.run_sync(partial(fn, **kwargs), limiter=self._limiter)

    async def _on_bucket(self, fn: Callable[..., T], /, **kwargs: Any) -> T:
        """An S3 call on our bucket, in a worker thread."""
        return await self._call(fn, Bucket=self.config.bucket, **kwargs)

    def key_stem(self, run_id: str, stage: str, n: int) -> str:
        return f"{self.config.prefix}runs/{run_id}/{stage}/{n}"

    async def copy(
        self,
        source: str,
        *,
        stem: str,
        metadata: Mapping[str, str],
        first_try: bool = False,
        probe: Probe | None = None,
    ) -> MirroredObject:
        """Mirror one output (a URL, or inline base64) to ``{stem}.{ext}``.

        ``first_try``: no earlier try of this copy can have stored anything, so the lookup
        of an object already there is skipped (one S3 request less per output).
        ``probe``: fed every byte on the way (decompressed, if the source compressed
        them), for the quality checks; not fed when an earlier try's copy is reused.
        """
        if not first_try and (existing := await self._existing(stem, metadata.get("task-id", ""))):
            return existing
        if not source.startswith(("http://", "https://")):
            return await self._copy_inline(source, stem=stem, metadata=metadata, probe=probe)
        return await self._copy_url(source, stem=stem, metadata=metadata, probe=probe)

    async def _existing(self, stem: str, task_id: str) -> MirroredObject | None:
        """The object a previous run of this job finished, if any (idempotency)."""
        listing = await self._on_bucket(self._s3.list_objects_v2, Prefix=f"{stem}.", MaxKeys=5)
        for item in listing.get("Contents", []):
            bucket, key = self.config.bucket, item["Key"]
            if key.endswith(".json"):
                continue  # an output's provenance manifest, beside it
            head = await self._on_bucket(self._s3.head_object, Key=key)
            if not task_id or head.get("Metadata", {}).get("task-id") != task_id:
                continue
            tags = await self._on_bucket(self._s3.get_object_tagging, Key=key)
            sha = next((t["Value"] for t in tags["TagSet"] if t["Key"] == "sha256"), None)
            if sha:
                return MirroredObject(
                    uri=f"s3://{bucket}/{key}",
                    key=key,
                    size=int(head["ContentLength"]),
                    sha256=sha,
                    content_type=head.get("ContentType", "application/octet-stream"),
                    reused=True,
                )
        return None

    async def _copy_inline(
        self, source: str, *, stem: str, metadata: Mapping[str, str], probe: Probe | None
    ) -> MirroredObject:
        header, _, payload = (
            source.partition(",") if source.startswith("data:") else ("", "", source)
        )
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MirrorRejectedError("output is neither an http(s) URL nor base64") from exc
        if len(data) > self.config.max_bytes:
            raise MirrorRejectedError(f"inline output larger than {self.config.max_bytes} bytes")
        content_type = header[5:].split(";")[0] if header else _sniff(data)
        key = f"{stem}.{EXTENSIONS.get(content_type, 'bin')}"
        digest = hashlib.sha256(data).hexdigest()
        if probe is not None:
            probe.feed(data)
        await self._on_bucket(
            self._s3.put_object,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata=dict(metadata),
            Tagging=_tagging(digest),
        )
        return MirroredObject(
            f"s3://{self.config.bucket}/{key}", key, len(data), digest, content_type
        )

    async def _open(self, url: str) -> aiohttp.ClientResponse:
        """GET with redirects followed by hand, so every hop is checked against the
        allow-list and the address rules (IP literals here; names as they resolve)."""
        config = self.config
        timeout = aiohttp.ClientTimeout(
            total=config.total_timeout_s,
            sock_connect=config.connect_timeout_s,
            sock_read=config.read_timeout_s,
        )
        for _ in range(_MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https"):
                raise MirrorRejectedError(f"output URL scheme not allowed: {parts.scheme}")
            if not host_allowed(url, config.allowed_hosts):
                raise MirrorRejectedError(
                    f"output host {parts.hostname!r} is not in MIRROR_ALLOWED_HOSTS"
                )
            if _is_ip(parts.hostname or ""):
                refusal = address_refusal(
                    parts.hostname or "", allow_loopback=config.allow_loopback
                )
                if refusal is not None:
                    raise MirrorRejectedError(f"output host is {refusal}")
            try:
                resp = await self._session.get(url, allow_redirects=False, timeout=timeout)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, ForbiddenAddressError):
                    raise MirrorRejectedError(str(exc.os_error)) from None
                raise
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                resp.release()
                url = urljoin(url, resp.headers["Location"])
                continue
            return resp
        raise MirrorRejectedError(f"more than {_MAX_REDIRECTS} redirects")

    async def _copy_url(
        self, url: str, *, stem: str, metadata: Mapping[str, str], probe: Probe | None
    ) -> MirroredObject:
        resp = await self._open(url)
        try:
            if 400 <= resp.status < 500 and resp.status not in (408, 429):
                raise MirrorRejectedError(f"output download failed: HTTP {resp.status}")
            if resp.status != 200:
                raise aiohttp.ClientResponseError(
                    resp.request_info, (), status=resp.status, message="output download failed"
                )
            if resp.content_length is not None and resp.content_length > self.config.max_bytes:
                raise MirrorRejectedError(
                    f"output is {resp.content_length} bytes, over the {self.config.max_bytes} cap"
                )
            content_type = _content_type(url, resp.headers.get("Content-Type", ""))
            key = f"{stem}.{_extension(url, content_type)}"
            # Stored as served: a compressed output keeps its Content-Encoding.
            content = {"ContentType": content_type}
            if encoding := resp.headers.get("Content-Encoding", "").strip():
                content["ContentEncoding"] = encoding
            feed = _feeder(probe, encoding)
            length = resp.content_length
            if length is not None and self.config.part_size <= length <= self.config.single_put_max:
                return await self._stream_put(resp, key, length, content, metadata, feed)
            return await self._stream(resp, key, content, metadata, feed)
        finally:
            resp.release()

    async def _stream(
        self,
        resp: aiohttp.ClientResponse,
        key: str,
        content: Mapping[str, str],
        metadata: Mapping[str, str],
        feed: Callable[[bytes], None],
    ) -> MirroredObject:
        bucket, part_size = self.config.bucket, self.config.part_size
        digest = hashlib.sha256()
        buffer = bytearray()
        size = 0
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            async for chunk in resp.content.iter_chunked(_READ):
                size += len(chunk)
                if size > self.config.max_bytes:
                    raise MirrorRejectedError(
                        f"output exceeds the {self.config.max_bytes} byte cap"
                    )
                digest.update(chunk)
                feed(chunk)
                buffer += chunk
                if len(buffer) >= part_size:
                    if upload_id is None:
                        started = await self._on_bucket(
                            self._s3.create_multipart_upload,
                            Key=key,
                            **content,
                            Metadata=dict(metadata),
                        )
                        upload_id = started["UploadId"]
                    body, buffer = bytes(buffer), bytearray()
                    parts.append(await self._part(key, upload_id, len(parts) + 1, body))
            sha = digest.hexdigest()
            if upload_id is None:
                await self._on_bucket(
                    self._s3.put_object,
                    Key=key,
                    Body=bytes(buffer),
                    **content,
                    Metadata=dict(metadata),
                    Tagging=_tagging(sha),
                )
            else:
                if buffer:
                    parts.append(await self._part(key, upload_id, len(parts) + 1, bytes(buffer)))
                    buffer = bytearray()
                await self._on_bucket(
                    self._s3.complete_multipart_upload,
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                upload_id = None
                await self._tag(key, sha)
        except BaseException:
            if upload_id is not None:
                await self._abort(key, upload_id)
            raise
        return MirroredObject(f"s3://{bucket}/{key}", key, size, sha, content["ContentType"])

    async def _stream_put(
        self,
        resp: aiohttp.ClientResponse,
        key: str,
        length: int,
        content: Mapping[str, str],
        metadata: Mapping[str, str],
        feed: Callable[[bytes], None],
    ) -> MirroredObject:
        """Pipe the download into one PutObject: a task feeds chunks, a thread sends them
        (and hashes them, off the event loop, which reads the download meanwhile)."""
        send, receive = anyio.create_memory_object_stream[bytes](_PIPE_CHUNKS)
        failed: list[Exception] = []

        async def pump() -> None:
            received = 0
            async with send:
                try:
                    async for chunk in resp.content.iter_chunked(_READ):
                        received += len(chunk)  # every byte counts, whatever was declared
                        if received > length or received > self.config.max_bytes:
                            raise MirrorSourceError(
                                f"output sent more than its {length} declared bytes"
                            )
                        feed(chunk)
                        await send.send(chunk)
                except Exception as exc:  # re-raised below, once the upload has stopped
                    failed.append(exc)

        body = _PipeReader(receive, length)
        upload_error: Exception | None = None
        async with anyio.create_task_group() as tg:
            tg.start_soon(pump)
            try:
                await self._on_bucket(
                    self._s3.put_object,
                    Key=key,
                    Body=body,
                    ContentLength=length,
                    **content,
                    Metadata=dict(metadata),
                )
            except Exception as exc:  # raised outside the task group, unwrapped
                upload_error = exc
            finally:
                tg.cancel_scope.cancel()
                receive.close()
        if failed:  # the download's own error explains the upload's
            raise failed[0] from None
        if upload_error is not None:
            raise upload_error
        sha = body.sha256()
        await self._tag(key, sha)
        uri = f"s3://{self.config.bucket}/{key}"
        return MirroredObject(uri, key, length, sha, content["ContentType"])

    async def _tag(self, key: str, sha: str) -> None:
        await self._on_bucket(
            self._s3.put_object_tagging,
            Key=key,
            Tagging={"TagSet": [{"Key": "sha256", "Value": sha}]},
        )

    async def _part(self, key: str, upload_id: str, number: int, body: bytes) -> dict[str, Any]:
        answer = await self._on_bucket(
            self._s3.upload_part,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=body,
        )
        return {"ETag": answer["ETag"], "PartNumber": number}

    async def _abort(self, key: str, upload_id: str) -> None:
        # Best effort: a bucket lifecycle rule expires abandoned uploads too.
        with contextlib.suppress(Exception):
            await self._on_bucket(
                self._s3.abort_multipart_upload,
                Key=key,
                UploadId=upload_id,
            )

    async def digest(self, uri: str) -> str | None:
        """The sha256 of an object this mirror wrote (its tag), or None if it is gone or
        has no digest."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            tags = await self._call(self._s3.get_object_tagging, Bucket=bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        return next((t["Value"] for t in tags["TagSet"] if t["Key"] == "sha256"), None)

    async def duplicate(
        self, uri: str, *, stem: str, metadata: Mapping[str, str]
    ) -> MirroredObject | None:
        """Copy an object this mirror wrote to ``{stem}.{ext}`` inside S3 (no bytes pass
        through here; multipart above 5 GiB), with ``metadata`` and its sha256 tag; None
        if the object is gone."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            head = await self._call(self._s3.head_object, Bucket=bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        sha = await self.digest(uri)
        if sha is None:
            return None
        extension = key.rsplit(".", 1)[-1] if "." in key.rsplit("/", 1)[-1] else "bin"
        target = f"{stem}.{extension}"
        content_type = head.get("ContentType", "application/octet-stream")
        await self._call(
            self._s3.copy,
            CopySource={"Bucket": bucket, "Key": key},
            Bucket=self.config.bucket,
            Key=target,
            ExtraArgs={
                "Metadata": dict(metadata),
                "MetadataDirective": "REPLACE",
                "ContentType": content_type,
            },
        )
        await self._tag(target, sha)
        size = int(head["ContentLength"])
        return MirroredObject(
            f"s3://{self.config.bucket}/{target}", target, size, sha, content_type
        )

    async def put_json(self, uri: str, doc: Mapping[str, Any]) -> None:
        """Write a small JSON document (a manifest) at an s3:// URI of this bucket."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        body = json.dumps(doc, indent=1, sort_keys=True).encode()
        await self._call(
            self._s3.put_object,
            Bucket=bucket,
            Key=key,
            Body=body,
            ContentType="application/json",
        )

    async def get_json(self, uri: str) -> dict[str, Any] | None:
        """A small JSON document at an s3:// URI, or None if there is none."""
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        try:
            answer = await self._call(self._s3.get_object, Bucket=bucket, Key=key)
        except ClientError as exc:
            if _missing(exc):
                return None
            raise
        data = await anyio.to_thread.run_sync(answer["Body"].read)
        doc = json.loads(data)
        return doc if isinstance(doc, dict) else None

    async def presign(self, uri: str, *, expires_s: int) -> str:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        url: str = await self._call(
            self._s3.generate_presigned_url,
            ClientMethod="get_object",
            Params={"Bucket": bucket, "Key": key},
            ExpiresIn=expires_s,
        )
        return url


class MirrorSourceError(WavechainError):
    """The output's download ended early; worth retrying."""


class _PipeReader:
    """A file-like body for boto3 in a worker thread, fed with chunks by the event loop.

    ``len()`` is the declared size, so botocore sends Content-Length (or, over TLS, the
    decoded length of a trailer-checksummed body) without seeking. A source that ends
    early raises instead of sending a short body the server would wait on.

    Each chunk is hashed here, in the uploading thread (hashlib lets go of the GIL), not
    on the event loop: there it was the largest part of the loop's work per byte, and
    the loop's reading of the download is what paces the copy.
    """

    def __init__(self, chunks: MemoryObjectReceiveStream[bytes], length: int) -> None:
        self._chunks = chunks
        self._length = length
        self._read = 0
        self._view = memoryview(b"")
        self._digest = hashlib.sha256()

    def __len__(self) -> int:
        return self._length

    def sha256(self) -> str:
        """The hex SHA-256 of every byte handed out; read once the upload has ended."""
        return self._digest.hexdigest()

    def read(self, size: int | None = -1) -> bytes:
        if not self._view:
            try:
                chunk = anyio.from_thread.run(self._chunks.receive)
                self._digest.update(chunk)
                self._view = memoryview(chunk)
            except (EndOfStream, anyio.ClosedResourceError):
                if self._read != self._length:
                    raise MirrorSourceError(
                        f"output download ended at {self._read} of {self._length} bytes"
                    ) from None
                return b""
        take = len(self._view) if size is None or size < 0 else size
        out, self._view = self._view[:take], self._view[take:]
        self._read += len(out)
        return bytes(out)


def _feeder(probe: Probe | None, encoding: str) -> Callable[[bytes], None]:
    """What each downloaded chunk is passed to for the probe: nothing without one; through
    a decompressor for a gzip-encoded download (the probe reads the content)."""
    if probe is None:
        return lambda chunk: None
    if encoding.lower() != "gzip":
        return probe.feed
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)

    def feed(chunk: bytes) -> None:
        # Bounded output per call: a small compressed chunk cannot inflate without limit.
        data = inflate.decompress(chunk, _READ)
        while data:
            probe.feed(data)
            data = inflate.decompress(inflate.unconsumed_tail, _READ)

    return feed


def _missing(exc: ClientError) -> bool:
    """The object (or its bucket) is not there."""
    code = str(exc.response.get("Error", {}).get("Code", ""))
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _tagging(sha: str) -> str:
    return f"sha256={sha}"


def _content_type(url: str, header: str) -> str:
    declared = header.split(";")[0].strip().lower()
    if declared and declared not in ("application/octet-stream", "binary/octet-stream"):
        return declared
    guessed = _TYPES.get(urlsplit(url).path.rsplit(".", 1)[-1].lower())
    return guessed or mimetypes.guess_type(urlsplit(url).path)[0] or "application/octet-stream"


def _extension(url: str, content_type: str) -> str:
    suffix = urlsplit(url).path.rsplit(".", 1)[-1].lower() if "." in urlsplit(url).path else ""
    if suffix in _KNOWN_EXT:
        return "jpeg" if suffix == "jpg" else suffix
    return EXTENSIONS.get(content_type, "bin")


def _sniff(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] == b"glTF":
        return "model/gltf-binary"
    if data[4:8] == b"ftyp":
        return "video/mp4"
    return "application/octet-stream"
