"""Shared bits of the HTTP-based fleet sources: TLS/timeout config fields and the session."""

from __future__ import annotations

import logging
from pathlib import Path

import aiohttp
from pydantic import Field

from gateway.config import Model
from gateway.download import DownloadTimeouts, Downloader, make_ssl

log = logging.getLogger(__name__)


class HttpOptions(Model):
    """TLS and timeout options common to the HTTP backends (mixed into their configs)."""

    ca_file: Path | None = Field(None, description="PEM bundle of CAs to trust (default: system)")
    insecure: bool = Field(False, description="disable TLS certificate checks (logged as a warning)")
    request_timeout_s: float = Field(30.0, gt=0, description="one API request, connect to last byte")
    download_connect_timeout_s: float = Field(15.0, gt=0)
    download_read_timeout_s: float = Field(60.0, gt=0, description="max silence during a download")
    download_retries: int = Field(5, ge=0, le=50)


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
