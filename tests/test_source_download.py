"""gateway.download against a loopback file server with Range support and fault hooks."""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import time
from pathlib import Path

import pytest
from aiohttp import web
from fleet_servers.common import FileStore, serve

from gateway.download import Downloader, redact, retry_after_seconds
from gateway.sources.base import FetchError, UpdateResult

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture
async def store():
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    async with serve(app) as base:
        fs.base = base  # type: ignore[attr-defined]
        yield fs


def dl(tmp_path: Path, **kw: object) -> Downloader:
    return Downloader(tmp_path / "state", backoff_s=0.01, **kw)  # type: ignore[arg-type]


async def test_plain_download_is_private_and_cached(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("a.bin", DATA)  # type: ignore[attr-defined]
    d = dl(tmp_path)
    try:
        p = await d.fetch(url, sha256=SHA, max_size=None)
        assert p.read_bytes() == DATA
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert stat.S_IMODE(p.parent.stat().st_mode) == 0o700
        again = await d.fetch(url, sha256=SHA, max_size=None)
        assert again == p
        assert store.gets("a.bin") == 1
    finally:
        await d.close()


async def test_cut_halfway_resumes_with_range(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("b.bin", DATA)  # type: ignore[attr-defined]
    store.cut_after["b.bin"] = len(DATA) // 2
    d = dl(tmp_path)
    try:
        p = await d.fetch(url, sha256=SHA, max_size=None)
    finally:
        await d.close()
    assert p.read_bytes() == DATA
    ranges = store.range_requests("b.bin")
    assert len(ranges) == 1 and ranges[0] != "bytes=0-"
    resumed = [s for s in store.requests if "Range" in s.headers]
    assert resumed[0].status == 206
    assert resumed[0].headers.get("If-Range") == store.etags["b.bin"]


async def test_200_instead_of_206_restarts(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("c.bin", DATA)  # type: ignore[attr-defined]
    store.cut_after["c.bin"] = 100_000
    store.ignore_range = True
    d = dl(tmp_path)
    try:
        p = await d.fetch(url, sha256=SHA, max_size=None)
    finally:
        await d.close()
    assert p.read_bytes() == DATA
    assert store.range_requests("c.bin")  # it asked for a range, got 200, started over


async def test_changed_file_if_range_mismatch_restarts(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("d.bin", DATA)  # type: ignore[attr-defined]
    store.cut_after["d.bin"] = 1000
    store.fail["d.bin"] = []
    d = dl(tmp_path, retries=0)
    store.started.clear()

    async def then_fail() -> None:
        await store.started.wait()
        store.fail["d.bin"] = [500]

    failer = asyncio.create_task(then_fail())
    try:
        with pytest.raises(FetchError):
            await d.fetch(url, sha256=None, max_size=None)
        await failer
        new = os.urandom(5000)
        store.add("d.bin", new)  # new ETag
        p = await d.fetch(url, sha256=None, max_size=None)
    finally:
        await d.close()
    assert p.read_bytes() == new
    last = store.requests[-1]
    assert last.headers.get("If-Range") == '"' + hashlib.sha256(DATA).hexdigest()[:16] + '"'
    assert last.status == 200


async def test_corrupted_download_refused_and_deleted(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("e.bin", DATA)  # type: ignore[attr-defined]
    store.corrupt.add("e.bin")
    d = dl(tmp_path)
    try:
        with pytest.raises(FetchError) as ei:
            await d.fetch(url, sha256=SHA, max_size=None)
    finally:
        await d.close()
    assert ei.value.result == UpdateResult.INTEGRITY_FAILURE
    assert not list((tmp_path / "state" / "downloads").glob("*.part"))
    assert not list((tmp_path / "state" / "downloads").glob("*.bin"))


async def test_size_cap_from_content_length(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("f.bin", DATA)  # type: ignore[attr-defined]
    d = dl(tmp_path)
    try:
        with pytest.raises(FetchError) as ei:
            await d.fetch(url, sha256=SHA, max_size=1000)
    finally:
        await d.close()
    assert ei.value.result == UpdateResult.NOT_ENOUGH_FLASH
    assert not list((tmp_path / "state" / "downloads").iterdir())


async def test_size_cap_without_content_length(tmp_path: Path) -> None:
    written: list[int] = []

    async def chunked(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(50):
            await resp.write(b"x" * 10_000)
            written.append(10_000)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/big", chunked)
    async with serve(app) as base:
        d = dl(tmp_path)
        try:
            with pytest.raises(FetchError) as ei:
                await d.fetch(base + "/big", sha256=None, max_size=25_000)
        finally:
            await d.close()
    assert ei.value.result == UpdateResult.NOT_ENOUGH_FLASH
    assert not list((tmp_path / "state" / "downloads").glob("*.part"))


async def test_5xx_retried_then_ok(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("g.bin", DATA)  # type: ignore[attr-defined]
    store.fail["g.bin"] = [500, 503]
    d = dl(tmp_path)
    try:
        p = await d.fetch(url, sha256=SHA, max_size=None)
    finally:
        await d.close()
    assert p.read_bytes() == DATA
    assert store.gets("g.bin") == 3


async def test_bounded_retries(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("h.bin", DATA)  # type: ignore[attr-defined]
    store.fail["h.bin"] = [500] * 10
    d = dl(tmp_path, retries=2)
    try:
        with pytest.raises(FetchError) as ei:
            await d.fetch(url, sha256=SHA, max_size=None)
    finally:
        await d.close()
    assert ei.value.result == UpdateResult.CONNECTION_LOST
    assert store.gets("h.bin") == 3


async def test_404_is_invalid_uri(store: FileStore, tmp_path: Path) -> None:
    d = dl(tmp_path)
    try:
        with pytest.raises(FetchError) as ei:
            await d.fetch(store.base + "/files/nope", sha256=None, max_size=None)  # type: ignore[attr-defined]
    finally:
        await d.close()
    assert ei.value.result == UpdateResult.INVALID_URI


async def test_concurrent_same_artifact_single_download(store: FileStore, tmp_path: Path) -> None:
    url = store.base + store.add("i.bin", DATA)  # type: ignore[attr-defined]
    store.release = asyncio.Event()
    d = dl(tmp_path)
    try:
        tasks = [asyncio.create_task(d.fetch(url, sha256=SHA, max_size=None)) for _ in range(8)]
        await store.started.wait()  # the one request is in flight; every caller has joined it
        store.release.set()
        paths = await asyncio.gather(*tasks)
    finally:
        await d.close()
    assert len(set(paths)) == 1
    assert store.gets("i.bin") == 1


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("120") == 120
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480 - 60) == 60
    assert retry_after_seconds("garbage") is None
    assert retry_after_seconds(None) is None


async def test_old_downloads_are_pruned_by_age_and_size(store: FileStore, tmp_path: Path) -> None:
    """The downloads directory is bounded: before a download, files not touched for
    ``max_age_s`` go, then the oldest until the rest fits ``max_bytes`` - never the download
    being made, and the freshly downloaded file is there for its caller."""
    d = dl(tmp_path, max_age_s=3600.0, max_bytes=700_000)
    d.dir.mkdir(parents=True)
    now = time.time()
    old = d.dir / "url-old.bin"
    old.write_bytes(b"x" * 1000)
    os.utime(old, (now - 7200, now - 7200))  # past max_age_s
    mid = d.dir / "coap-mid"
    mid.write_bytes(os.urandom(300_000))
    os.utime(mid, (now - 600, now - 600))
    young = d.dir / "url-young.bin"
    young.write_bytes(os.urandom(300_000))
    url = store.base + store.add("a.bin", DATA)  # type: ignore[attr-defined]
    try:
        p = await d.fetch(url, sha256=SHA, max_size=None)
        assert p.read_bytes() == DATA
        # old: too old; then 600 KB held + 300 KB of this download > 700 KB: the oldest (mid)
        # would go on the next prune; at this one (before the download) 600 KB fit
        assert not old.exists() and mid.exists() and young.exists()
        assert d.prune() == ["coap-mid"]  # 900 KB held now: the oldest goes
        assert young.exists() and p.exists()
    finally:
        await d.close()


def test_redact_removes_every_url_query() -> None:
    text = ("0, message='', url='https://blob.example/c/fw.bin?sv=1&sig=SECRET' "
            "URL('http://h/x?se=2&sig=SECRET') /rel/path?sig=SECRET, what? no=")
    out = redact(text)
    assert "SECRET" not in out
    assert "https://blob.example/c/fw.bin?..." in out and "what? no=" in out


@pytest.mark.parametrize("where", ["loop", "closed_port", "not_http"])
async def test_sas_query_never_in_errors_or_logs(tmp_path: Path, where: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    """aiohttp's own errors quote the URL with its query (TooManyRedirects, a redirect to
    another scheme); a presigned URL's signature is a credential: it never reaches a
    FetchError (reported to the fleet server) or a log line, whatever failed."""
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]

    async def blob(request: web.Request) -> web.Response:
        q = request.query_string
        if where == "loop":
            raise web.HTTPFound(str(request.rel_url))  # itself, with the SAS query
        if where == "closed_port":
            raise web.HTTPFound(f"http://127.0.0.1:{closed}/blob?{q}")
        raise web.HTTPFound(f"ftp://blob.example/blob?{q}")

    app = web.Application()
    app.router.add_get("/blob", blob)
    caplog.set_level("DEBUG", logger="gateway")
    async with serve(app) as base:
        d = dl(tmp_path, retries=1)
        try:
            with pytest.raises(FetchError) as ei:
                await d.fetch(base + "/blob?sv=1&sig=SECRET", sha256=None, max_size=None)
        finally:
            await d.close()
    assert "SECRET" not in str(ei.value) and "SECRET" not in caplog.text, str(ei.value)
    assert "/blob?..." in str(ei.value) or "/blob" in str(ei.value)


async def test_prune_spares_a_file_just_handed_out(store: FileStore, tmp_path: Path) -> None:
    """A cached download reused today keeps its old date: a prune started by another download
    must not remove it while its caller still verifies or unpacks it (review core2)."""
    d = dl(tmp_path, max_age_s=3600.0, max_bytes=10_000_000)
    url = store.base + store.add("a.bin", DATA)  # type: ignore[attr-defined]
    try:
        p = await d.fetch(url, sha256=SHA, max_size=None)
        old = time.time() - 8 * 86400
        os.utime(p, (old, old))  # past max_age_s, as a week-old cached copy is
        assert d.prune() == [] and p.exists()
        d._handed_out.clear()  # an hour later (HANDED_OUT_KEEP_S): nobody holds it any more
        assert d.prune() == [p.name] and not p.exists()
    finally:
        await d.close()
