"""Shared bits of the HTTP-based fleet sources: TLS/timeout config fields, the session, and
bounded reads of a server's answers (``read_body`` / ``read_json``)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp

from gateway import safejson
from gateway.download import Downloader, DownloadTimeouts, make_ssl
from gateway.sources.base import FetchError, FleetSource, UpdateResult
from gateway.sources.settings import HttpOptions

log = logging.getLogger(__name__)

# One answer of a fleet server (a JSON document: controller base, deployment, release, token)
# is never read past this many bytes: input from outside is bounded in bytes and memory.
# Artifacts are not answers: the downloader bounds them by the device's slot size.
MAX_ANSWER_BYTES = 1 << 20
_READ_CHUNK = 64 * 1024


async def read_body(r: aiohttp.ClientResponse, what: str, cap: int = MAX_ANSWER_BYTES) -> bytes:
    """The body of ``r``, read incrementally and abandoned as soon as it passes ``cap`` bytes
    (a Content-Length above it is refused before anything is read): FetchError, the server's
    problem - the connection is dropped, not drained."""
    if r.content_length is not None and r.content_length > cap:
        raise FetchError(f"{what}: answer of {r.content_length} bytes refused (more than "
                         f"{cap} bytes)", UpdateResult.CONNECTION_LOST)
    buf = bytearray()
    while True:
        chunk = await r.content.read(min(_READ_CHUNK, cap + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > cap:
            r.close()
            raise FetchError(f"{what}: answer longer than {cap} bytes refused",
                             UpdateResult.CONNECTION_LOST)


def parse_json(raw: bytes, what: str) -> Any:
    """``raw`` as JSON; any parse problem (not JSON, not UTF-8, nested too deep: RecursionError,
    a number too long) is the server's: FetchError."""
    try:
        return safejson.loads(raw)  # depth-checked before json recurses
    except (ValueError, RecursionError) as exc:
        raise FetchError(f"{what}: unreadable answer ({type(exc).__name__})",
                         UpdateResult.CONNECTION_LOST) from None


async def read_json(r: aiohttp.ClientResponse, what: str, cap: int = MAX_ANSWER_BYTES) -> Any:
    """The body of ``r`` as JSON, bounded in bytes (``read_body``); FetchError otherwise."""
    return parse_json(await read_body(r, what, cap), what)


async def read_text(r: aiohttp.ClientResponse, limit: int = 200) -> str:
    """At most ``limit`` characters of an (error) answer, for a log line; never the whole."""
    with_limit = await r.content.read(limit * 4)
    return with_limit.decode(errors="replace")[:limit]


def make_session(opts: HttpOptions, what: str) -> aiohttp.ClientSession:
    ssl = make_ssl(opts.ca_file, opts.insecure, what)
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=opts.request_timeout_s),
        connector=aiohttp.TCPConnector(ssl=ssl),
    )


def make_downloader(opts: HttpOptions, state_dir: Path) -> Downloader:
    return Downloader(
        state_dir,
        ca_file=opts.ca_file,
        insecure=opts.insecure,
        timeouts=DownloadTimeouts(
            connect_s=opts.download_connect_timeout_s, read_s=opts.download_read_timeout_s
        ),
        retries=opts.download_retries,
    )


class HttpSource(FleetSource):
    """Base of the HTTP backends: one aiohttp session (TLS per config) and one downloader."""

    server_label = "server"

    def __init__(self, opts: HttpOptions, url: str, state_dir: Path) -> None:
        self.base = url.rstrip("/")
        self.state_dir = Path(state_dir)
        self._http_opts = opts
        self._downloader = make_downloader(opts, self.state_dir)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        if self._session is None:
            self._session = make_session(self._http_opts, f"{self.server_label} {self.base}")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._downloader.close()
