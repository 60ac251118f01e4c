"""Where images and videos come from: chat message parts, URLs, paths and base64 data, under a policy.

Parts follow transformers' and OpenAI's shapes: `{"type": "image", "image"|"url"|"path"|"base64": ...}`,
`{"type": "image_url", "image_url": {"url": ...}}`, `{"type": "video", "video"|"url"|"path": ...}` and
`{"type": "video_url", "video_url": {"url": ...}}`. A reference is a `data:` URL (always read), an http(s) URL
(fetched only for hosts the policy lists), a local path (only under the policy's folder, where it names one) or
base64 data; a value may also be a PIL image, bytes, an array, or (video) a list of frames.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .image import MediaError

IMAGE_PARTS = ("image", "image_url")
VIDEO_PARTS = ("video", "video_url")
_BASE64 = re.compile(r"[A-Za-z0-9+/=\s]+")


@dataclass(frozen=True)
class MediaPolicy:
    """What a reference may point to. `allowed_domains`: hosts whose http(s) URLs are fetched (none by default);
    `local_root`: the folder local paths must lie under (None: any path where `allow_local`, none otherwise);
    `max_bytes`: the most bytes read for one image or video."""

    allowed_domains: tuple[str, ...] = ()
    allow_local: bool = True
    local_root: Path | None = None
    max_bytes: int | None = None
    fetch_timeout_s: float = 10.0


def part_media(part: dict[str, Any]) -> tuple[str, Any] | None:
    """("image" | "video", the part's source) for a media part; None for other parts (text)."""
    kind = part.get("type")
    if kind in ("image_url", "video_url"):
        value = part.get(kind)
        source = value.get("url") if isinstance(value, dict) else value
        if not source:
            raise MediaError(f"a {kind} part needs {kind}.url")
        return kind.removesuffix("_url"), source
    if kind in ("image", "video"):
        for key in (kind, "url", "path", "base64"):
            if part.get(key) is not None:
                return kind, ({"base64": part[key]} if key == "base64" else part[key])
        raise MediaError(f"an {kind} part needs one of the keys {kind}, url, path" + (", base64" if kind == "image"
                                                                                        else ""))
    return None


def read_reference(source: Any, policy: MediaPolicy) -> Any:
    """A string reference resolved to bytes or a path under `policy`; other values (PIL images, arrays, bytes,
    frame lists) as they are."""
    if isinstance(source, dict) and "base64" in source:
        return _base64(source["base64"], policy)
    if isinstance(source, Path):
        return _local(source, policy)
    if not isinstance(source, str):
        return source
    scheme = urllib.parse.urlsplit(source).scheme.lower() if ":" in source[:12] else ""
    if scheme == "data":
        return _data_url(source, policy)
    if scheme in ("http", "https"):
        return _fetch(source, policy)
    if scheme == "file":
        return _local(Path(urllib.parse.unquote(urllib.parse.urlsplit(source).path)), policy)
    if scheme and len(scheme) > 1:
        raise MediaError(f"unsupported media URL scheme {scheme!r} (use data:, http(s): or a local path)")
    if len(source) > 256 and _BASE64.fullmatch(source):  # long and path-less: raw base64 data
        return _base64(source, policy)
    return _local(Path(source), policy)


def _check_size(data: bytes, policy: MediaPolicy) -> bytes:
    if policy.max_bytes is not None and len(data) > policy.max_bytes:
        raise MediaError(f"media of {len(data)} bytes is over the limit of {policy.max_bytes} bytes")
    return data


def _base64(text: str, policy: MediaPolicy) -> bytes:
    if policy.max_bytes is not None and len(text) * 3 // 4 > policy.max_bytes + 3:
        raise MediaError(f"media of about {len(text) * 3 // 4} bytes is over the limit of {policy.max_bytes} bytes")
    try:
        return _check_size(base64.b64decode(text, validate=True), policy)
    except (binascii.Error, ValueError):
        raise MediaError("media data is not valid base64") from None


def _data_url(url: str, policy: MediaPolicy) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaError("malformed data: URL (no comma before the data)")
    if header.endswith(";base64"):
        return _base64(payload, policy)
    return _check_size(urllib.parse.unquote_to_bytes(payload), policy)


def _local(path: Path, policy: MediaPolicy) -> Path:
    if not policy.allow_local:
        raise MediaError(f"local media paths are not allowed here ({path}); send the data as a data: URL")
    resolved = path.expanduser().resolve()
    if policy.local_root is not None:
        root = policy.local_root.expanduser().resolve()
        if not resolved.is_relative_to(root):
            raise MediaError(f"media path {path} is outside the allowed folder {root}")
    if not resolved.is_file():
        raise MediaError(f"no media file at {path}")
    if policy.max_bytes is not None and resolved.stat().st_size > policy.max_bytes:
        raise MediaError(f"media file {path} is over the limit of {policy.max_bytes} bytes")
    return resolved


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host not in {d.lower() for d in policy.allowed_domains}:
        raise MediaError(f"media URL host {host!r} is not allowed (allowed: "
                         f"{', '.join(policy.allowed_domains) or 'none; send a data: URL'})")
    limit = policy.max_bytes
    opener = urllib.request.build_opener(_NoRedirect)  # a redirect could lead to a host that is not allowed
    try:
        with opener.open(url, timeout=policy.fetch_timeout_s) as response:
            data = response.read(None if limit is None else limit + 1)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise MediaError(f"cannot fetch {url}: {getattr(e, 'reason', e)}") from None
    return _check_size(data, policy)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: ANN001 (urllib's signature)
        raise urllib.error.URLError(f"redirected to {newurl}; media URLs are not followed through redirects")
