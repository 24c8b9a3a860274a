"""Artifact downloads for the HTTP-based fleet sources.

Owns getting a URL's bytes onto disk safely: streamed with aiohttp into
``<state_dir>/downloads/``, resumed with HTTP ``Range`` after an interruption (the ``.part``
file is kept; ``If-Range`` carries the server's validator so a changed file restarts from
zero), size-capped before anything past the cap is written (``MAX_ARTIFACT`` when the caller
has no cap), SHA-256 checked before anyone
uses it, retried with bounded exponential backoff on connection errors and 5xx, and
de-duplicated: one in-flight download per cache key (the sha256 when the server gives one,
otherwise the URL), so N devices needing one artifact fetch it once.

TLS certificates are always verified unless the caller passes ``insecure=True`` (logged as a
warning). Files are created 0600 and directories 0700.

Bounded on disk (``prune``, before each download, at most once a minute): a file of the
directory not touched for ``max_age_s`` (7 days) is removed, then the oldest until the rest
holds at most ``max_bytes``; the downloads in flight are never touched, nor a file handed out
within the last hour (still being verified) or one a caller still holds (``keep``: the LwM2M
source's package waiting in State 2 for the server's Update). (The image store keeps what an
update uses: a download is only needed until it was verified.)
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from gateway.artifacts.bundle import MAX_ARTIFACT
from gateway.config import ConfigError
from gateway.sources.base import FetchError, UpdateResult

log = logging.getLogger(__name__)

_SHA256_RE = re.compile(r"^[0-9a-fA-F]{64}$")
HANDED_OUT_KEEP_S = 3600.0  # a file fetch() returned is spared by prune() this long


def shown(url: str) -> str:
    """``url`` for logs, errors and reports: without its query (a blob SAS token, a presigned
    URL's signature are credentials; they go to the server, never anywhere else)."""
    base, sep, _query = url.partition("?")
    return base + ("?..." if sep else "")


# a URL query (``?a=b&...``) anywhere in a text, with or without its scheme and host
_QUERY_RE = re.compile(r"\?[^\s'\"<>?]*=[^\s'\"<>]*")


def redact(text: str) -> str:
    """``text`` (an exception's message: aiohttp's own errors quote the request's URL, e.g.
    ``TooManyRedirects ... url='https://blob/x?sig=...'``) without any URL query in it."""
    return _QUERY_RE.sub("?...", text)


def _why(exc: BaseException) -> str:
    """An exception as it may be logged or put into a FetchError (reported to the server)."""
    return redact(str(exc) or type(exc).__name__)

_CONTENT_RANGE_RE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE_RE = re.compile(r"^bytes\s+\*/(\d+)$")


@dataclass(frozen=True)
class DownloadTimeouts:
    connect_s: float = 15.0
    read_s: float = 60.0  # max silence between two received chunks


def make_ssl(ca_file: Path | None, insecure: bool, what: str) -> ssl.SSLContext | bool:
    """The ``ssl`` argument for aiohttp: verification on (optionally a private CA) or off."""
    if insecure:
        log.warning("TLS certificate verification is DISABLED for %s (insecure: true)", what)
        return False
    if ca_file is not None and not Path(ca_file).is_file():
        raise ConfigError(ca_file, "ca_file", f"no such CA file (for {what})")
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse ``Retry-After``: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    ts = when.timestamp()
    return max(0.0, ts - (time.time() if now is None else now))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _mkdir_private(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def _open_part(path: Path, truncate: bool) -> int:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return fd


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _unlink(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


class _Restart(Exception):
    """The partial file cannot be continued: start again from byte 0."""


class _Retryable(Exception):
    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


class Downloader:
    """Shared, de-duplicating, resuming artifact downloader (one per gateway/source)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        ca_file: Path | None = None,
        insecure: bool = False,
        timeouts: DownloadTimeouts | None = None,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        chunk_size: int = 64 * 1024,
        url_cache_ttl_s: float = 3600.0,
        max_age_s: float = 7 * 86400.0,
        max_bytes: int = 2 * MAX_ARTIFACT,
    ) -> None:
        self.dir = Path(state_dir) / "downloads"
        self._ssl = make_ssl(ca_file, insecure, "artifact downloads")
        self.timeouts = timeouts or DownloadTimeouts()
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.chunk_size = chunk_size
        self.url_cache_ttl_s = url_cache_ttl_s
        self._session: aiohttp.ClientSession | None = None
        self._inflight: dict[str, asyncio.Task[Path]] = {}
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._pruned_at = float("-inf")
        # files prune() never removes: what a caller still holds (a package waiting for the
        # server's Update), and what was handed out within HANDED_OUT_KEEP_S (being verified)
        self.keep: Callable[[], Iterable[Path]] = lambda: ()
        self._handed_out: dict[Path, float] = {}

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            timeout = aiohttp.ClientTimeout(
                total=None, connect=self.timeouts.connect_s, sock_read=self.timeouts.read_s
            )
            self._session = aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(ssl=self._ssl)
            )
        return self._session

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        if self._session is not None:
            await self._session.close()
            self._session = None

    @staticmethod
    def cache_key(url: str, sha256: str | None) -> str:
        if sha256:
            return "sha256-" + sha256.lower()
        return "url-" + hashlib.sha256(url.encode()).hexdigest()

    async def fetch(
        self,
        url: str,
        *,
        sha256: str | None,
        max_size: int | None,
        size: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Path:
        """Download ``url`` (or reuse the cached copy) and return the verified file's path.

        ``sha256`` (hex) is checked before returning; ``size`` (when the server announced
        it) must match; anything above ``max_size`` bytes is refused. Raises FetchError.
        """
        # never unbounded: without a device slot size, no usable artifact is larger than this
        max_size = MAX_ARTIFACT if max_size is None else max_size
        if sha256 is not None and not _SHA256_RE.match(sha256):
            raise FetchError(f"server gave a malformed sha256 {sha256!r}", UpdateResult.INTEGRITY_FAILURE)
        if size is not None and max_size is not None and size > max_size:
            raise FetchError(
                f"artifact is {size} bytes, more than the {max_size} allowed",
                UpdateResult.NOT_ENOUGH_FLASH,
            )
        key = self.cache_key(url, sha256)
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(
                self._fetch_once(key, url, sha256, max_size, size, dict(headers or {})),
                name=f"download {key[:20]}",
            )
            self._inflight[key] = task
            task.add_done_callback(self._done_callback(key))
        else:
            log.debug("joining the in-flight download of %s", shown(url))
        try:
            path = await asyncio.shield(task)
        except FetchError as exc:  # the one place every download error passes: no URL query
            if redact(str(exc)) == str(exc):
                raise
            raise FetchError(redact(str(exc)), exc.result, permanent=exc.permanent) from None
        # a joiner may have a smaller cap than the caller that started the download
        if max_size is not None and _size(path) > max_size:
            raise FetchError(
                f"artifact is {_size(path)} bytes, more than the {max_size} allowed",
                UpdateResult.NOT_ENOUGH_FLASH,
            )
        self._handed_out[path] = time.monotonic()
        return path

    def prune(self, now: float | None = None) -> list[str]:
        """Bound the directory (module docstring): returns the names removed. Every file is
        counted (other users of the directory too: the LwM2M source's coap:// pulls); a file
        whose name starts with a key in flight is kept."""
        now = time.time() if now is None else now
        self._pruned_at = mono = time.monotonic()
        self._handed_out = {p: t for p, t in self._handed_out.items() if mono - t < HANDED_OUT_KEEP_S}
        spared = {Path(p).resolve() for p in self.keep()} | {p.resolve() for p in self._handed_out}
        files: list[tuple[float, int, Path]] = []
        total = 0  # every file counts; the spared ones are never removed
        with contextlib.suppress(OSError):
            for p in self.dir.iterdir():
                with contextlib.suppress(OSError):
                    st = p.stat()
                    if not p.is_file():
                        continue
                    total += st.st_blocks * 512
                    if not any(p.name.startswith(k) for k in self._inflight) and p.resolve() not in spared:
                        files.append((st.st_mtime, st.st_blocks * 512, p))
        files.sort()
        removed = []
        for mtime, sz, p in files:
            if now - mtime <= self.max_age_s and total <= self.max_bytes:
                break
            _unlink(p)
            total -= sz
            removed.append(p.name)
        if removed:
            log.info("downloads: %d old file(s) removed (%s)", len(removed), ", ".join(removed[:5]))
        return removed

    def _done_callback(self, key: str) -> Callable[[asyncio.Task[Path]], None]:
        def done(_task: asyncio.Task[Path]) -> None:
            self._inflight.pop(key, None)

        return done

    async def _fetch_once(
        self,
        key: str,
        url: str,
        sha256: str | None,
        max_size: int | None,
        size: int | None,
        headers: dict[str, str],
    ) -> Path:
        _mkdir_private(self.dir)
        if time.monotonic() - self._pruned_at > 60.0:
            self.prune()
        final = self.dir / f"{key}.bin"
        part = self.dir / f"{key}.part"
        meta = self.dir / f"{key}.meta"
        if final.exists():
            fresh = sha256 is not None or (time.time() - final.stat().st_mtime) < self.url_cache_ttl_s
            if fresh and (sha256 is None or await asyncio.to_thread(sha256_file, final) == sha256.lower()):
                log.debug("using cached artifact %s", final.name)
                return final
            _unlink(final)

        attempts = 0
        while True:
            before = _size(part)
            try:
                await self._transfer(url, part, meta, sha256, max_size, size, headers)
                break
            except _Restart as exc:
                log.info("download of %s restarts from zero: %s", shown(url), _why(exc))
                _unlink(part, meta)
                attempts += 1
                if attempts > self.retries:
                    raise FetchError(f"download of {shown(url)} failed: {_why(exc)}") from None
            except (_Retryable, aiohttp.ClientError, TimeoutError, ConnectionError) as exc:
                progressed = _size(part) > before
                if not progressed:
                    attempts += 1
                if attempts > self.retries:
                    raise FetchError(
                        f"download of {shown(url)} failed after {attempts} attempts: "
                        f"{_why(exc)}",
                        UpdateResult.CONNECTION_LOST,
                    ) from None
                delay = getattr(exc, "delay", None)
                if delay is None:
                    delay = min(self.max_backoff_s, self.backoff_s * (2 ** max(0, attempts - 1)))
                delay = min(delay, self.max_backoff_s)
                log.warning(
                    "download of %s interrupted at %d bytes (%s); retrying in %.1fs",
                    shown(url),
                    _size(part),
                    _why(exc),
                    delay,
                )
                await asyncio.sleep(delay)

        got_size = _size(part)
        if size is not None and got_size != size:
            _unlink(part, meta)
            raise FetchError(
                f"downloaded {got_size} bytes but the server announced {size}",
                UpdateResult.INTEGRITY_FAILURE,
            )
        if sha256 is not None:
            digest = await asyncio.to_thread(sha256_file, part)
            if digest != sha256.lower():
                _unlink(part, meta)
                raise FetchError(
                    f"sha256 mismatch for {shown(url)}: expected {sha256.lower()}, got {digest}",
                    UpdateResult.INTEGRITY_FAILURE,
                )
        os.replace(part, final)
        _unlink(meta)
        log.info("downloaded %s (%d bytes)", shown(url), got_size)
        return final

    async def _transfer(
        self,
        url: str,
        part: Path,
        meta: Path,
        sha256: str | None,
        max_size: int | None,
        size: int | None,
        headers: dict[str, str],
    ) -> None:
        offset = _size(part)
        validator = self._read_meta(meta, url) if offset else None
        req_headers = dict(headers)
        if offset:
            # resuming without a validator is only safe when the sha256 catches a mix-up
            if validator is None and sha256 is None:
                raise _Restart("no ETag/Last-Modified and no sha256 to validate a resume")
            req_headers["Range"] = f"bytes={offset}-"
            if validator:
                req_headers["If-Range"] = validator
        session = await self._get_session()
        async with session.get(url, headers=req_headers, allow_redirects=True) as resp:
            if resp.status == 416 and offset:
                m = _UNSATISFIED_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                if m and int(m.group(1)) == offset:
                    return  # we already have every byte
                raise _Restart("server refused the range (416)")
            if resp.status in (429, 503):
                delay = retry_after_seconds(resp.headers.get("Retry-After"))
                raise _Retryable(f"HTTP {resp.status}", delay)
            if resp.status >= 500:
                raise _Retryable(f"HTTP {resp.status}")
            if resp.status in (400, 404, 410):
                raise FetchError(f"artifact URL answered HTTP {resp.status}", UpdateResult.INVALID_URI)
            if resp.status not in (200, 206):
                raise FetchError(f"artifact URL answered HTTP {resp.status}", UpdateResult.CONNECTION_LOST)

            if resp.status == 206:
                if not offset:
                    raise _Restart("206 to a request without Range")
                m = _CONTENT_RANGE_RE.match(resp.headers.get("Content-Range", ""))
                if not m or int(m.group(1)) != offset:
                    raise _Restart(f"unexpected Content-Range {resp.headers.get('Content-Range')!r}")
                total = None if m.group(3) == "*" else int(m.group(3))
                truncate = False
                log.info("resuming download of %s at byte %d", shown(url), offset)
            else:
                if offset:
                    log.info("server sent the whole file (200) instead of a range; restarting")
                offset = 0
                truncate = True
                total = resp.content_length
            if total is not None and max_size is not None and total > max_size:
                _unlink(part, meta)
                raise FetchError(
                    f"artifact is {total} bytes, more than the {max_size} allowed",
                    UpdateResult.NOT_ENOUGH_FLASH,
                )
            if total is not None and size is not None and total != size:
                _unlink(part, meta)
                raise FetchError(
                    f"server sends {total} bytes but announced {size}", UpdateResult.INTEGRITY_FAILURE
                )
            self._write_meta(meta, url, resp.headers)
            limit = max_size if max_size is not None else size
            fd = _open_part(part, truncate)
            try:
                written = offset
                async for chunk in resp.content.iter_chunked(self.chunk_size):
                    if limit is not None and written + len(chunk) > limit:
                        os.close(fd)
                        fd = -1
                        _unlink(part, meta)
                        raise FetchError(
                            f"server sent more than the {limit} bytes allowed",
                            UpdateResult.NOT_ENOUGH_FLASH
                            if max_size is not None
                            else UpdateResult.INTEGRITY_FAILURE,
                        )
                    os.write(fd, chunk)
                    written += len(chunk)
            finally:
                if fd >= 0:
                    os.close(fd)
            if total is not None and written < total:
                raise _Retryable(f"connection closed after {written} of {total} bytes")

    @staticmethod
    def _read_meta(meta: Path, url: str) -> str | None:
        try:
            data: Any = json.loads(meta.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict):
            return None
        etag = data.get("etag")
        if isinstance(etag, str) and etag and not etag.startswith("W/"):
            return etag  # only strong ETags may be used in If-Range
        lm = data.get("last_modified")
        return lm if isinstance(lm, str) and lm else None

    @staticmethod
    def _write_meta(meta: Path, url: str, headers: Mapping[str, str]) -> None:
        data = {"url": url, "etag": headers.get("ETag"), "last_modified": headers.get("Last-Modified")}
        fd = os.open(meta, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
