"""Shared bits of the HTTP-based fleet sources: TLS/timeout config fields and the session."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp

from gateway.download import Downloader, DownloadTimeouts, make_ssl
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
