"""Findings 3 and 4: hostile input from outside is bounded in bytes, memory and time.

3. An artifact is parsed by the gateway before any signature says anything about it: a zip
   whose headers lie, whose members use bzip2/LZMA (``zipfile`` inflates those without an
   output bound), or a Mender tar.gz bomb must be refused with a reason, in bounded memory
   (measured in a subprocess under an address-space limit, so a regression cannot take the
   test machine down), and without stopping the event loop (a ticking coroutine measures the
   loop's lag while the image store verifies).
4. A device that answers every upload chunk but never gets anywhere (ENOMEM, the same offset,
   rewinds, a trickle) must end the upload within its bounds - few requests, a deadline - as a
   FAILED outcome with the reason, and release its lock and ``max_concurrent`` slot: a second
   attempt starts and completes once the device behaves.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import struct
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from safety_support import Request, Tap

from gateway.artifacts.bundle import BundleError, read_bundle
from gateway.artifacts.mender import build_zephyr_artifact
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.images import ImageRefused, ImageStore
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[1]


# -- crafted archives ----------------------------------------------------------------------
def _zeros_deflate(mib: int, head: bytes = b"") -> bytes:
    """Raw deflate of ``head`` + ``mib`` MiB of zeros, made in milliseconds: after a full flush
    the compressor starts afresh, so the block for 1 MiB of zeros is the same every time."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(head) + c.flush(zlib.Z_FULL_FLUSH) if head else b""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * (1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return first + block * mib + b"\x03\x00"  # an empty final block


def _zip(members: list[tuple[str, int, bytes, int, int]], count: int | None = None) -> bytes:
    """A zip built by hand: (name, method, stored bytes, *claimed* size, crc) per member, the
    same claims in the local and the central headers; ``count``: what the end record claims."""
    out = io.BytesIO()
    parts = []
    for name, method, data, claimed, crc in members:
        off = out.tell()
        n = name.encode()
        out.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc, len(data),
                              claimed, len(n), 0) + n + data)
        parts.append(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 0x031E, 20, 0, method, 0, 0x21, crc,
                               len(data), claimed, len(n), 0, 0, 0, 0, 0o100644 << 16, off) + n)
    cd_off = out.tell()
    central = b"".join(parts)
    out.write(central)
    n_claimed = len(members) if count is None else count
    out.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, n_claimed, n_claimed,
                          len(central), cd_off, 0))
    return out.getvalue()


def _manifest(*files: tuple[str, int | None]) -> bytes:
    items = [{"file": f, "image_index": str(i)} for i, (f, _) in enumerate(files)]
    for item, (_, size) in zip(items, files, strict=True):
        if size is not None:
            item["size"] = size
    return json.dumps({"format-version": 0, "files": items}).encode()


def _stored(name: str, data: bytes) -> tuple[str, int, bytes, int, int]:
    return (name, zipfile.ZIP_STORED, data, len(data), zlib.crc32(data))


def deflate_bomb(inflated_mib: int = 1024, claimed: int = 100 * 1024) -> bytes:
    """``app.bin``: ~1 MiB of deflate that inflates to ``inflated_mib`` MiB, while both headers
    claim ``claimed`` bytes (and a CRC of nothing)."""
    return _zip([_stored("manifest.json", _manifest(("app.bin", None))),
                 ("app.bin", zipfile.ZIP_DEFLATED, _zeros_deflate(inflated_mib), claimed, 0)])


def method_zip(method: int, payload: bytes) -> bytes:
    """An honest zip (sizes and CRCs right) whose image member uses ``method``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("manifest.json", _manifest(("app.bin", len(payload))))
        zf.writestr("app.bin", payload, compress_type=method)
    return buf.getvalue()


def mender_with_data(data_member: bytes, name: str = "data/0000.tar.gz") -> bytes:
    """A real Mender/RDFM artifact (``build_zephyr_artifact``) whose data tar is replaced."""
    good = build_zephyr_artifact(b"\0" * 64, device_types=["d"], version="1.0.0", compress=True)
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(good)) as src, tarfile.open(fileobj=out, mode="w:") as dst:
        for m in src:
            f = src.extractfile(m)
            assert f is not None
            content = f.read()
            if m.name.startswith("data/"):
                m, content = tarfile.TarInfo(name), data_member
                m.size = len(content)
            dst.addfile(m, io.BytesIO(content))
    return out.getvalue()


def tar_gz_bomb(inflated_mib: int = 1024, claimed: int | None = None) -> bytes:
    """A data tar.gz whose one member (``zephyr.signed.bin``) is ``inflated_mib`` MiB of zeros
    from ~1 MiB of gzip (``claimed``: the size its tar header states, default the truth)."""
    ti = tarfile.TarInfo("zephyr.signed.bin")
    ti.size = claimed if claimed is not None else inflated_mib << 20
    hdr = ti.tobuf(format=tarfile.GNU_FORMAT)
    gz_head = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    return gz_head + _zeros_deflate(inflated_mib, head=hdr) + struct.pack("<2L", 0, 0)


# -- memory: the parser in a subprocess under an address-space limit ------------------------
_RUNNER = r"""
import json, resource, sys, traceback
from pathlib import Path
kind, path, cap = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
cap = None if cap == "none" else int(cap)
from gateway.artifacts.bundle import read_bundle
from gateway.artifacts.mender import unpack_zephyr_artifact
data = path.read_bytes() if kind == "zip" else None
vm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize:"))
limit = (vm << 10) + (384 << 20)  # what the parser may add before MemoryError
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
res = {}
try:
    if kind == "zip":
        kw = {"max_image_size": cap} if cap is not None else {}  # (7508f07 had no such cap)
        read_bundle(data, **kw)
    else:
        unpack_zephyr_artifact(path, path.parent / "out", device_type="d", max_image_size=cap)
    res["error_type"] = None
except BaseException as exc:
    res["error_type"] = type(exc).__name__
    res["error"] = str(exc)
res["peak_growth_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(res))
"""


def run_bounded(kind: str, artifact: bytes, tmp_path: Path, cap: int | None) -> dict[str, Any]:
    path = tmp_path / f"artifact.{kind}"
    path.write_bytes(artifact)
    r = subprocess.run([sys.executable, "-c", _RUNNER, kind, str(path), str(cap or "none")],
                       capture_output=True, text=True, timeout=90, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    res: dict[str, Any] = json.loads(r.stdout.strip().splitlines()[-1])
    print(kind, res)
    return res


PEAK_MIB = 48  # what refusing a bomb may add to the parser's peak memory


def test_deflate_bomb_whose_headers_lie_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    bomb = deflate_bomb(1024)  # 1 GiB of zeros, the headers claim 100 KiB
    assert len(bomb) < 1_100_000
    res = run_bounded("zip", bomb, tmp_path, cap=None)
    assert res["error_type"] == "BundleError", res
    assert "app.bin" in res["error"], res
    assert res["peak_growth_kib"] < PEAK_MIB * 1024, res
    res = run_bounded("zip", bomb, tmp_path, cap=256 * 1024)
    assert res["error_type"] == "BundleError" and "app.bin" in res["error"], res
    assert res["peak_growth_kib"] < PEAK_MIB * 1024, res
    # no cap known for the device: the headers may claim up to MAX_TOTAL, still bounded
    res = run_bounded("zip", deflate_bomb(1024, claimed=60 << 20), tmp_path, cap=None)
    assert res["error_type"] == "BundleError", res
    assert res["peak_growth_kib"] < 2 * (60 << 10) + PEAK_MIB * 1024, res


def test_a_member_inflating_past_the_image_cap_is_refused_whatever_the_headers_say() -> None:
    with pytest.raises(BundleError, match=r"app.bin.*(inflates to more than|more than the)"):
        read_bundle(deflate_bomb(4, claimed=4 << 20), max_image_size=256 * 1024)


@pytest.mark.parametrize(("method", "label"), [(zipfile.ZIP_BZIP2, "bzip2"),
                                               (zipfile.ZIP_LZMA, "LZMA")])
def test_bzip2_and_lzma_members_are_refused(tmp_path: Path, method: int, label: str) -> None:
    # honest archives (sizes and CRCs right): only the compression method is refused
    with pytest.raises(BundleError, match=f"compressed with {label}; only stored or deflate"):
        read_bundle(method_zip(method, b"\0" * 4096))
    # and a bomb of that method costs nothing to refuse
    res = run_bounded("zip", method_zip(method, b"\0" * (64 << 20)), tmp_path, cap=None)
    assert res["error_type"] == "BundleError" and label in res["error"], res
    assert res["peak_growth_kib"] < PEAK_MIB * 1024, res


def test_too_many_members_are_counted_before_the_central_directory_is_parsed() -> None:
    files = [_stored(f"f{i}.bin", b"x") for i in range(40)]
    with pytest.raises(BundleError, match="41 members, at most 17"):
        read_bundle(_zip([_stored("manifest.json", _manifest(("f0.bin", 1))), *files]))
    # the end record claims 2 entries; zipfile would build a ZipInfo for each of the 100k
    # entries its central directory holds: refused from the directory's size alone
    many = [_stored(f"{i:06d}", b"") for i in range(100_000)]
    lying = _zip(many, count=2)
    t0 = time.monotonic()
    with pytest.raises(BundleError, match=r"central directory of [0-9]+ bytes"):
        read_bundle(lying)
    assert time.monotonic() - t0 < 0.5


def test_tar_gz_bombs_in_a_mender_artifact_are_refused_in_bounded_memory(tmp_path: Path) -> None:
    # a data tar.gz whose one member is 1 GiB of zeros (its tar header tells the truth)
    res = run_bounded("tar", mender_with_data(tar_gz_bomb(1024)), tmp_path, cap=None)
    assert res["error_type"] == "ArtifactError", res
    assert "data/0000.tar.gz holds more than" in res["error"], res
    assert res["peak_growth_kib"] < PEAK_MIB * 1024, res
    # the header claims a small member: the stream is read only that far
    res = run_bounded("tar", mender_with_data(tar_gz_bomb(1024, claimed=1000)), tmp_path,
                      cap=256 * 1024)
    assert res["error_type"] in ("ArtifactError", "ArtifactIntegrityError"), res
    assert res["peak_growth_kib"] < PEAK_MIB * 1024, res
    # gzip of zeros without any tar structure
    c = zlib.compressobj(9, zlib.DEFLATED, 31)
    gz = c.compress(b"\0" * (64 << 20)) + c.flush()
    res = run_bounded("tar", mender_with_data(gz), tmp_path, cap=None)
    assert res["error_type"] in ("ArtifactError", "ArtifactIntegrityError"), res
    assert res["peak_growth_kib"] < PEAK_MIB * 1024, res


# -- the event loop keeps running while an artifact is verified -----------------------------
async def _max_lag_while(coro: Any) -> tuple[float, Any]:
    loop = asyncio.get_running_loop()
    lag = [0.0]
    done = asyncio.Event()

    async def tick() -> None:
        while not done.is_set():
            t = loop.time()
            await asyncio.sleep(0.005)
            lag[0] = max(lag[0], loop.time() - t - 0.005)

    ticker = asyncio.create_task(tick())
    try:
        result: Any = await coro
    except Exception as exc:
        result = exc
    done.set()
    await ticker
    return lag[0], result


async def test_artifact_verification_does_not_block_the_event_loop(tmp_path: Path) -> None:
    store = ImageStore(tmp_path / "images", [])
    path = tmp_path / "bomb.zip"
    # 60 MiB claimed and inflated (then a bad CRC), plus a bzip2 bomb: real work for the store
    path.write_bytes(deflate_bomb(60, claimed=60 << 20))
    t0 = time.monotonic()
    lag, res = await _max_lag_while(store.add_file_async(path, hardware=None))
    took = time.monotonic() - t0
    assert isinstance(res, ImageRefused) and "app.bin" in str(res), res
    print(f"verification took {took:.2f}s, max loop lag {lag * 1000:.1f} ms")
    assert lag < max(0.1, took / 4), (lag, took)
    # an artifact larger than any image set for the device is refused before it is read
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * (3 << 20))
    with pytest.raises(ImageRefused, match="more than the"):
        await store.add_file_async(big, hardware=None, max_image_size=64 * 1024)


# -- uploads against a device that answers without progress ---------------------------------
def _hostile(tap: Tap, mode: str, first_len: list[int], delay_s: float = 0.05) -> None:
    """Continuation chunks never reach the device: the test answers them (``enomem``: ENOMEM;
    ``same``: the chunk's own offset; ``rewind``: acknowledges the chunk right after the first,
    and answers any later one with the first chunk's end; ``trickle``: one byte of progress per
    answer, after ``delay_s``)."""
    dev = tap.dev
    loop = asyncio.get_running_loop()
    held = [0]

    def hook(req: Request, frame: bytes, reply: Any) -> bool:
        if not req.is_upload:
            return True
        off, data = req.body.get("off", 0), req.body.get("data", b"")
        if off == 0:
            first_len[0] = len(data)
            return True  # the real device takes the first chunk (and erases the slot)
        hdr = (req.op, (frame[0] >> 3) & 3, req.group, req.seq, req.cmd)
        base = first_len[0]
        if mode == "enomem":
            body: dict[str, Any] = {"rc": 2}
        elif mode == "same":
            body = {"off": off}
        elif mode == "rewind":
            body = {"off": off + len(data) if off == base else base}
        else:  # the device "holds" one byte more per answer, whichever chunk it answers
            held[0] = max(held[0], base) + 1
            loop.call_later(delay_s, reply, dev.server._pack(hdr, {"off": held[0]}))
            return False
        reply(dev.server._pack(hdr, body))
        return False

    tap.hook = hook


def _released(gw: Gateway) -> None:
    assert gw.sessions_active == 0 and not gw.in_session
    assert all(not lock.locked() for lock in gw._port_locks.values())
    assert not gw._sem.locked()


@pytest.mark.parametrize("mode", ["enomem", "same", "rewind"])
async def test_upload_without_progress_fails_fast_and_releases_the_device(
        bench_factory: Any, mode: str) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=24 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        first_len = [0]
        _hostile(tap, mode, first_len)
        gw = Gateway(bench.gateway_config(sim, health_check_s=0.3,
                                          timeouts={"request_s": 1.0, "reset_s": 10}))
        try:
            t0 = time.monotonic()
            res = await asyncio.wait_for(gw.run_once(), 60)
            took = time.monotonic() - t0
            out = res.outcomes[dev.id]
            uploads = tap.requests(lambda r: r.is_upload)
            print(f"{mode}: {out.status} in {took:.1f}s, {len(uploads)} upload requests: "
                  f"{out.detail}")
            assert out.status == Status.FAILED, out
            assert "no progress" in out.detail and "stalls" in out.detail, out.detail
            assert len(uploads) < 300, len(uploads)
            assert took < 30, took
            _released(gw)
            # the lock and the slot are free: the next attempt runs, and completes once the
            # device behaves (it resumes from the offset the device really holds)
            tap.hook = None
            res = await asyncio.wait_for(gw.run_once(), 60)
            assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes[dev.id]
            _released(gw)
        finally:
            gw.close()


@pytest.mark.parametrize("bound", ["upload", "attempt", "bytes"])
async def test_a_trickling_upload_ends_at_its_deadline(bench_factory: Any, bound: str) -> None:
    """One byte of progress per answer never counts as a stall: the upload's deadline (image
    size at the floor rate), the attempt's deadline or the bytes bound ends it."""
    bench = bench_factory(udp=1, serial=0, image_size=24 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        _hostile(tap, "trickle", [0], delay_s=0.02 if bound == "bytes" else 0.1)
        timeouts: dict[str, Any] = {"request_s": 1.0, "reset_s": 10, "upload_first_chunk_s": 1.0}
        if bound == "upload":  # 1 + 10 + ~26 KB at 8 KiB/s: ~14 s
            timeouts["upload_min_rate_bps"] = 8192
            limit = 14.0
        elif bound == "attempt":
            timeouts["attempt_s"] = 3.0
            limit = 3.0
        else:  # the default deadline is ~113 s: the bytes bound comes first
            limit = 0.0
        gw = Gateway(bench.gateway_config(sim, health_check_s=0.3, timeouts=timeouts))
        try:
            t0 = time.monotonic()
            res = await asyncio.wait_for(gw.run_once(), 60)
            took = time.monotonic() - t0
            out = res.outcomes[dev.id]
            print(f"{bound}: {out.status} in {took:.1f}s: {out.detail}")
            assert out.status == Status.FAILED, out
            want = {"upload": r"upload not finished within 14s",
                    "attempt": r"attempt not finished within 3s",
                    "bytes": r"sent [0-9]+ bytes for a [0-9]+-byte image"}[bound]
            assert re.search(want, out.detail), out.detail
            assert limit <= took < (limit or 22) + 8, took
            _released(gw)
        finally:
            gw.close()
