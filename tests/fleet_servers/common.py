"""Shared pieces of the loopback fleet servers: app runner and a Range-capable file store."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on a free loopback port; yields its base URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    status: int = 0


@dataclass
class FileStore:
    """Files served at ``{prefix}/{name}`` with ETag, Range/If-Range (206/416) and fault hooks."""

    prefix: str = "/files"
    files: dict[str, bytes] = field(default_factory=dict)
    etags: dict[str, str] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    cut_after: dict[str, int] = field(default_factory=dict)  # next response stops after N bytes
    corrupt: set[str] = field(default_factory=set)  # flip a byte in what is sent
    fail: dict[str, list[int]] = field(default_factory=dict)  # statuses to answer first
    ignore_range: bool = False  # answer 200 with the whole file even to a Range request
    send_etag: bool = True
    auth_check: Any = None  # callable(request) -> bool
    started: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event | None = None  # when set, responses wait for it after the headers

    def add(self, name: str, data: bytes) -> str:
        self.files[name] = data
        self.etags[name] = '"' + hashlib.sha256(data).hexdigest()[:16] + '"'
        return f"{self.prefix}/{name}"

    def range_requests(self, name: str) -> list[str]:
        return [s.headers["Range"] for s in self.requests if s.path.endswith(name) and "Range" in s.headers]

    def gets(self, name: str) -> int:
        return sum(1 for s in self.requests if s.path.endswith("/" + name))

    def routes(self, app: web.Application) -> None:
        app.router.add_get(self.prefix + "/{name}", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        seen = Seen(request.path, dict(request.headers))
        self.requests.append(seen)
        if self.auth_check is not None and not self.auth_check(request):
            seen.status = 401
            return web.Response(status=401)
        if name not in self.files:
            seen.status = 404
            return web.Response(status=404)
        if self.fail.get(name):
            st = self.fail[name].pop(0)
            seen.status = st
            return web.Response(status=st, headers={"Retry-After": "0"} if st == 503 else {})
        data = self.files[name]
        if name in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        etag = self.etags[name]
        start = 0
        status = 200
        rng = request.headers.get("Range")
        if rng and not self.ignore_range:
            if_range = request.headers.get("If-Range")
            if if_range is None or if_range == etag:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(data):
                    seen.status = 416
                    return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
                status = 206
        body = data[start:]
        headers = {"Content-Length": str(len(body)), "Accept-Ranges": "bytes"}
        if self.send_etag:
            headers["ETag"] = etag
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp = web.StreamResponse(status=status, headers=headers)
        seen.status = status
        await resp.prepare(request)
        self.started.set()
        if self.release is not None:
            await self.release.wait()
        cut = self.cut_after.pop(name, None)
        if cut is not None:
            await resp.write(body[:cut])
            await asyncio.sleep(0)
            assert request.transport is not None
            request.transport.close()
            return resp
        await resp.write(body)
        await resp.write_eof()
        return resp


def require_tool(name: str, package: str) -> str:
    """The path of a system tool the test needs (a Debian package).

    On a developer's machine without it the test is skipped with the install command; in CI
    (``CI`` set, where ``.ci/run`` installs it) its absence is a failure, never a silent skip.
    """
    import os
    import shutil

    import pytest

    path = shutil.which(name) or (f"/usr/sbin/{name}" if os.path.exists(f"/usr/sbin/{name}") else None)
    if path is None:
        msg = f"{name} is not installed: apt-get install -y {package}"
        if os.environ.get("CI"):
            pytest.fail(msg + " (CI must install it: see .ci/run)")
        pytest.skip(msg)
    return path
