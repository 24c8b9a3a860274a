"""Shared bits of the HTTP-based fleet sources: TLS/timeout config fields and the session."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp

from gateway.download import Downloader, DownloadTimeouts, make_ssl
from gateway.sources.base import FleetSource
from gateway.sources.settings import HttpOptions

log = logging.getLogger(__name__)


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
