"""Pictures and sounds in chat requests: from a content part to checked RGB pixels or PCM
samples for the model's worker.

Everything a client sends is judged here, in the server, before a worker sees it: the size
of the file (``max_image_bytes``), its format (sniffed by Pillow from the bytes, never from
a name or a declared type: PNG, JPEG, GIF, WebP, BMP), its pixel count (``max_image_pixels``:
a small file can hold a huge picture) and a complete decode (a truncated file is refused).
The worker gets the decoded RGB pixels, so llama.cpp's own decoder (stb_image) never sees a
client's bytes. Photos are turned upright by their EXIF orientation; transparency is laid on
white; an animated picture gives its first frame; one over ``SENT_PIXELS`` is scaled down.

``input_audio`` is a base64 WAV file (``max_audio_bytes``): integer PCM, 8 to 32 bits, any
rate from 8 kHz, any channel count, at least 0.1 s long (``protocol.MIN_AUDIO_SECONDS``), read
by Python's ``wave`` and sent as mono float samples at its own rate (the worker resamples to
its projector's). MP3 is refused: no decoder here, and
llama.cpp's own (miniaudio) must not see a client's bytes either.

``image_url`` is a ``data:`` URL (base64), or an ``http(s)`` URL whose host is listed in
``image_url_hosts``. A fetch resolves the host once, refuses loopback, private, link-local
and other non-public addresses unless ``image_url_private`` allows them, connects to the
address it checked (no second lookup a DNS answer could change), follows no redirects,
and stops at ``max_image_bytes`` and ``image_url_timeout`` seconds in all.

Concurrency: plain functions on the request's thread; a fetch blocks it, within its limits
(a watchdog timer thread shuts the fetch's socket at its deadline).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import http.client
import io
import ipaddress
import socket
import threading
import time
import wave
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote, unquote_to_bytes, urlsplit

import numpy as np
from PIL import Image, ImageOps

from config import ManagerSettings
from engine.protocol import MIN_AUDIO_RATE, MIN_AUDIO_SECONDS, MediaInput, MediaKind
from errors import InvalidRequest
from schemas import AudioPart, ImagePart, MediaPart

IMAGE_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "GIF": "GIF", "WEBP": "WebP", "BMP": "BMP"}
# Pictures with more pixels are scaled down to this many before they go to the worker: no
# projector reads more (Qwen2.5-VL's default ceiling is 12.8 million), and a 40-megapixel
# photo would otherwise cross the pipe as 120 MB.
SENT_PIXELS = 4096 * 4096
FETCH_CHUNK = 64 * 1024
_URL_SAFE = "".join(chr(c) for c in range(0x21, 0x7F))  # printable ASCII but the space: kept as sent


@dataclass(frozen=True)
class MediaLimits:
    """What the server accepts (the ``model_manager`` settings of the same names)."""

    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    max_media_per_request: int = 16
    max_audio_bytes: int = 20 * 2**20
    url_hosts: tuple[str, ...] = ()
    url_timeout: float = 10.0
    url_private: bool = False

    @classmethod
    def from_settings(cls, settings: ManagerSettings) -> MediaLimits:
        return cls(settings.max_image_bytes, settings.max_image_pixels, settings.max_media_per_request,
                   settings.max_audio_bytes,
                   tuple(host.lower() for host in settings.image_url_hosts), settings.image_url_timeout,
                   settings.image_url_private)


@dataclass(frozen=True)
class Media:
    """One decoded picture (``width`` x ``height`` RGB pixels) or sound (``width`` float32 samples
    at ``height`` per second); ``param`` is where the client put it."""

    kind: MediaKind
    width: int
    height: int
    data: bytes
    digest: bytes
    param: str

    def at(self, index: int) -> MediaInput:
        """The worker's message for this media, going in before prompt token ``index``."""
        return MediaInput(index, self.kind, self.width, self.height, self.data, self.digest, self.param)


Fetch = Callable[[str, "MediaLimits", str], bytes]


def decode_parts(parts: list[tuple[str, MediaPart]], limits: MediaLimits, media: tuple[str, ...],
                 model_id: str, fetch: Fetch | None = None) -> list[Media]:
    """Every media part decoded and checked, in order; ``media`` is what the model's projector
    reads. A part sent again (a conversation's history repeats its pictures each turn) is
    decoded once. Raises ``InvalidRequest`` naming the part."""
    decoded: list[Media] = []
    seen: dict[tuple[str, str], Media] = {}
    for param, part in parts:
        source = ((part.input_audio.format, part.input_audio.data) if isinstance(part, AudioPart)
                  else ("image", part.image_url.url))
        if source in seen:
            decoded.append(replace(seen[source], param=param))
            continue
        if len(seen) >= limits.max_media_per_request:
            raise _refused(param, f"a request may hold at most {limits.max_media_per_request} different pictures "
                                  "and sounds (max_media_per_request)", "too_many_media")
        kind = "image" if isinstance(part, ImagePart) else "audio"
        if kind not in media:
            what = "pictures" if kind == "image" else "sound"
            reason = ("it has no multimodal projector (mmproj)" if not media
                      else f"its projector reads only {', '.join(media)}")
            raise _refused(param, f"the model {model_id} cannot read {what}: {reason}", "model_not_multimodal")
        if isinstance(part, AudioPart):
            one = decode_audio(part.input_audio.data, part.input_audio.format, limits, param)
        else:
            one = decode_image(image_bytes(part.image_url.url, limits, param, fetch or fetch_url), limits, param)
        seen[source] = one
        decoded.append(one)
    return decoded


def decode_audio(data: str, fmt: str, limits: MediaLimits, param: str) -> Media:
    """A base64 WAV file decoded to mono float samples, or ``InvalidRequest`` saying what is wrong."""
    if fmt != "wav":
        raise _refused(param, f"{fmt} audio is not supported; send WAV (PCM)", "unsupported_media")
    raw = read_data_url("data:;base64," + data, limits.max_audio_bytes, param, "sound")
    try:
        with wave.open(io.BytesIO(raw), "rb") as reader:
            channels, width, rate, frames = (reader.getnchannels(), reader.getsampwidth(), reader.getframerate(),
                                             reader.getnframes())
            pcm = reader.readframes(frames)
    except (wave.Error, EOFError, ValueError) as exc:
        raise _refused(param, f"the data is not a WAV file this server reads (integer PCM): {exc}",
                       "invalid_audio") from None
    if not channels or not rate or width not in (1, 2, 3, 4):
        raise _refused(param, "the WAV file has no channels, no rate or an unusual sample width", "invalid_audio")
    if not pcm or len(pcm) < frames * channels * width:
        raise _refused(param, "the WAV file is empty or truncated", "invalid_audio")
    if rate < MIN_AUDIO_RATE:
        raise _refused(param, f"the WAV file's rate is {rate} Hz; this server takes {MIN_AUDIO_RATE} Hz or more",
                       "invalid_audio")
    if frames < rate * MIN_AUDIO_SECONDS:
        raise _refused(param, f"the sound lasts {frames / rate:.3f} s; this server takes {MIN_AUDIO_SECONDS:g} s "
                              "or more", "invalid_audio")
    samples = _mono(pcm[: frames * channels * width], width, channels)
    digest = hashlib.blake2b(b"%d:" % rate + samples.tobytes(), digest_size=32).digest()
    return Media("audio", len(samples), rate, samples.tobytes(), digest, param)


def _mono(pcm: bytes, width: int, channels: int) -> np.ndarray:
    """Interleaved little-endian integer PCM as mono float32 in [-1, 1]."""
    if width == 1:  # 8-bit WAV is unsigned
        values = np.frombuffer(pcm, dtype=np.uint8).astype(np.float32) - 128.0
    elif width == 3:
        triples = np.frombuffer(pcm, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        values = ((triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)) << 8 >> 8).astype(np.float32)
    else:
        values = np.frombuffer(pcm, dtype=np.int16 if width == 2 else np.int32).astype(np.float32)
    values /= float(2 ** (8 * width - 1))
    return values.reshape(-1, channels).mean(axis=1).astype(np.float32)


def image_bytes(url: str, limits: MediaLimits, param: str, fetch: Fetch) -> bytes:
    """The file an ``image_url`` names: a ``data:`` URL's payload, or an allowed URL's body."""
    scheme = url[:8].split(":", 1)[0].lower()
    if scheme == "data":
        return read_data_url(url, limits.max_image_bytes, param)
    if scheme in ("http", "https"):
        return fetch(url, limits, param)
    raise _refused(param, "the image URL must be a data: URL (base64) or an http(s) URL", "invalid_image_url")


def read_data_url(url: str, limit: int, param: str, what: str = "image") -> bytes:
    """A ``data:`` URL's bytes, refusing more than ``limit`` before decoding them."""
    header, comma, payload = url.partition(",")
    if not comma:
        raise _refused(param, "the data: URL has no ',' before its data", "invalid_image_url")
    is_base64 = header.lower().endswith(";base64")
    estimate = len(payload) * 3 // 4 if is_base64 else len(payload)
    if estimate > limit + 3:
        raise _too_large(param, estimate, limit, what)
    if not is_base64:
        data = unquote_to_bytes(payload)
    else:
        try:
            data = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise _refused(param, "the base64 data is not valid", f"invalid_{what}_url" if what == "image"
                       else "invalid_audio") from None
    if len(data) > limit:
        raise _too_large(param, len(data), limit, what)
    if not data:
        raise _refused(param, f"the {what} is empty", "invalid_image" if what == "image" else "invalid_audio")
    return data


def decode_image(raw: bytes, limits: MediaLimits, param: str) -> Media:
    """``raw`` decoded to RGB pixels, or ``InvalidRequest`` saying what is wrong with it."""
    if len(raw) > limits.max_image_bytes:
        raise _too_large(param, len(raw), limits.max_image_bytes)
    try:
        image = Image.open(io.BytesIO(raw), formats=list(IMAGE_FORMATS))
    except Image.DecompressionBombError:
        raise _refused(param, "the image has too many pixels", "image_too_large") from None
    except Exception:  # Pillow raises UnidentifiedImageError, SyntaxError, ValueError... for junk
        raise _refused(param, f"the data is not a picture this server reads ({', '.join(IMAGE_FORMATS.values())})",
                       "invalid_image") from None
    with image:
        width, height = image.size
        if width <= 0 or height <= 0:
            raise _refused(param, "the image has no pixels", "invalid_image")
        if width * height > limits.max_image_pixels:
            raise _refused(param, f"the image has {width}x{height} pixels; this server takes at most "
                                  f"{limits.max_image_pixels} (max_image_pixels)", "image_too_large")
        try:
            image.load()
            rgb = _rgb(ImageOps.exif_transpose(image))
        except Image.DecompressionBombError:
            raise _refused(param, "the image has too many pixels", "image_too_large") from None
        except Exception:  # a truncated or corrupt file fails here, once its data is read
            raise _refused(param, f"the {IMAGE_FORMATS.get(image.format or '', 'image')} file is truncated or corrupt",
                           "invalid_image") from None
    width, height = rgb.size
    if width * height > SENT_PIXELS:
        scale = (SENT_PIXELS / (width * height)) ** 0.5
        rgb = rgb.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BICUBIC)
        width, height = rgb.size
    pixels = rgb.tobytes()
    digest = hashlib.blake2b(b"%dx%d:" % (width, height) + pixels, digest_size=32).digest()
    return Media("image", width, height, pixels, digest, param)


def _rgb(image: Image.Image) -> Image.Image:
    """The picture as RGB, anything transparent laid on white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


# ------------------------------------------------------------------ http(s) fetching


def fetch_url(url: str, limits: MediaLimits, param: str) -> bytes:
    """The body of an http(s) ``url`` on an allowed host, within the size and time limits."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:  # e.g. an unclosed IPv6 literal
        raise _refused(param, "the image URL is not valid", "invalid_image_url") from None
    if not host or host not in limits.url_hosts:
        allowed = "; this server fetches no image URLs, send a data: URL" if not limits.url_hosts else ""
        raise _refused(param, f"the image URL's host {host or '(none)'} is not allowed (image_url_hosts){allowed}",
                       "image_url_not_allowed")
    try:
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        raise _refused(param, "the image URL's port is not valid", "invalid_image_url") from None
    deadline = time.monotonic() + limits.url_timeout
    address = _checked_address(host, port, limits, param)
    connection_type = http.client.HTTPSConnection if parts.scheme.lower() == "https" else http.client.HTTPConnection
    connection: Any = connection_type(host, port, timeout=limits.url_timeout)
    # A socket timeout bounds each read, not their sum: a server dripping a byte at a time
    # would hold this thread for ever. The watchdog shuts the sockets at the deadline (the
    # response may own the socket once the connection hands it over, so each is kept here).
    sockets: list[socket.socket] = []

    def connect(_addr: Any, _timeout: Any, source: Any) -> socket.socket:
        # The address checked above, not a second lookup of the name.
        sock = socket.create_connection((address, port), max(0.001, deadline - time.monotonic()), source)
        sockets.append(sock)
        return sock

    connection._create_connection = connect
    # http.client sends the path as ASCII: anything else is percent-encoded, as browsers do.
    path = quote((parts.path or "/") + (f"?{parts.query}" if parts.query else ""), safe=_URL_SAFE)
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _cut, (sockets,))
    watchdog.daemon = True
    watchdog.start()
    try:
        connection.connect()
        sockets.append(connection.sock)  # https: the TLS socket that took over the plain one
        connection.request("GET", path, headers={"Accept": "image/*", "User-Agent": "llama-cpp-server"})
        response = connection.getresponse()
        if response.status != 200:
            raise _refused(param, f"fetching the image URL answered HTTP {response.status}", "image_url_failed")
        declared = response.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > limits.max_image_bytes:
            raise _too_large(param, int(declared), limits.max_image_bytes)
        return _read_body(response, limits, deadline, param)
    except (OSError, http.client.HTTPException) as exc:
        if time.monotonic() >= deadline:
            raise _timed_out(param, limits) from None
        raise _refused(param, f"fetching the image URL failed: {type(exc).__name__}", "image_url_failed") from None
    finally:
        watchdog.cancel()
        connection.close()


def _cut(sockets: list[socket.socket]) -> None:
    """Wake a fetch blocked on its sockets (the watchdog's deadline passed). A socket already
    closed or handed to TLS has no descriptor any more and refuses, harmlessly."""
    for sock in list(sockets):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _timed_out(param: str, limits: MediaLimits) -> InvalidRequest:
    return _refused(param, f"fetching the image URL took longer than {limits.url_timeout:g} s (image_url_timeout)",
                    "image_url_failed")


def _read_body(response: Any, limits: MediaLimits, deadline: float, param: str) -> bytes:
    body = bytearray()
    while True:
        if time.monotonic() > deadline:
            raise _timed_out(param, limits)
        block = response.read(FETCH_CHUNK)
        if not block:
            if time.monotonic() >= deadline:  # the watchdog cut it short
                raise _timed_out(param, limits)
            return bytes(body)
        body += block
        if len(body) > limits.max_image_bytes:
            raise _too_large(param, len(body), limits.max_image_bytes)


def _checked_address(host: str, port: int, limits: MediaLimits, param: str) -> str:
    """One address of ``host``, every one of them public (or private allowed)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise _refused(param, f"the image URL's host {host} could not be resolved", "image_url_failed") from None
    addresses = [str(info[4][0]) for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not ip.is_global and not limits.url_private:
            raise _refused(param, f"the image URL's host {host} is a loopback or private address "
                                  "(image_url_private)", "image_url_not_allowed")
    return addresses[0]


def _refused(param: str, message: str, code: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid '{param}': {message}", param=param, code=code)


def _too_large(param: str, size: int, limit: int, what: str = "image") -> InvalidRequest:
    key = "max_image_bytes" if what == "image" else "max_audio_bytes"
    return _refused(param, f"the {what} is {size / 2**20:.1f} MiB; this server takes {what}s up to "
                           f"{limit / 2**20:.1f} MiB ({key})", f"{what if what == 'image' else 'audio'}_too_large")
