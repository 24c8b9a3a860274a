"""RDFM backend against the loopback RDFM server; Mender artifact unpacking."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import stat
import tarfile
import time
from pathlib import Path

import pytest
from fleet_servers.common import serve
from fleet_servers.rdfm import RdfmServer

from gateway.artifacts.mender import (
    ArtifactError,
    ArtifactIntegrityError,
    build_zephyr_artifact,
    unpack_zephyr_artifact,
)
from gateway.devkit import make_key, sign_image
from gateway.mcuboot import Version, parse_image
from gateway.sources.base import (
    DeviceView,
    FetchError,
    NotYetAccepted,
    Report,
    UpdateResult,
    UpdateState,
)
from gateway.sources.rdfm import RdfmSource
from gateway.sources.settings import RdfmSourceConfig


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    d = tmp_path_factory.mktemp("img")
    key = make_key(d / "k.pem")
    return sign_image(d / "app.bin", version="1.2.3", key=key, size=20_000).read_bytes()


@pytest.fixture
async def rdfm():
    srv = RdfmServer()
    async with serve(srv.app()) as base:
        srv.base = base  # type: ignore[attr-defined]
        yield srv


def source(srv: RdfmServer, tmp_path: Path, **kw: object) -> RdfmSource:
    cfg = RdfmSourceConfig(url=srv.base, key_bits=2048, **kw)  # type: ignore[arg-type, attr-defined]
    return RdfmSource(cfg, tmp_path / "state")


DEV = DeviceView(id="mcu-1", hardware="nrf52840dk", running_version=Version(1, 0, 0))


async def test_pending_then_accepted_then_update(
    rdfm: RdfmServer, tmp_path: Path, image: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    src = source(rdfm, tmp_path)
    try:
        caplog.set_level(logging.INFO)
        with pytest.raises(NotYetAccepted, match="not accepted by the server"):
            await src.check(DEV)  # not "nothing to do": nobody has looked at it yet
        assert "device mcu-1 waiting for acceptance on the RDFM server" in caplog.text
        keyfile = src.key_path("mcu-1")
        assert stat.S_IMODE(keyfile.stat().st_mode) == 0o600
        assert ("mcu-1", src.public_pem(await src.device_key("mcu-1"))) in rdfm.registrations
        req = rdfm.auth_requests[0]
        assert req["metadata"] == {
            "rdfm.hardware.devtype": "nrf52840dk",
            "rdfm.software.version": "1.0.0",
            "rdfm.hardware.macaddr": "mcu-1",
        }
        with pytest.raises(NotYetAccepted):
            await src.check(DEV)  # still pending, no restart needed

        rdfm.accept("mcu-1")
        assert await src.check(DEV) is None  # accepted, nothing assigned: 204
        assert rdfm.checks[-1][0] == 204

        art = build_zephyr_artifact(image, device_types=["nrf52840dk"], version="1.2.3")
        pkg = rdfm.assign("mcu-1", art, "1.2.3", "nrf52840dk")
        offer = await src.check(DEV)
        assert offer is not None and offer.sha256 == pkg.sha256
        path = await src.fetch(offer, max_size=0x40000)
        assert path.read_bytes() == image
        assert parse_image(path.read_bytes()).version == Version(1, 2, 3)

        await src.report(offer, Report(UpdateState.UPDATING, progress=0.5))
        await src.report(offer, Report(UpdateState.IDLE, UpdateResult.SUCCESS, detail="confirmed"))
        entries = [json.loads(e["entry"]) for e in rdfm.logs]
        assert entries[-1]["result"] == 1 and entries[-1]["result_name"] == "SUCCESS"
        assert all(e["device_id"] == "mcu-1" for e in rdfm.logs)
        # the next check reports the version now running: the server sees the update landed
        assert await src.check(DeviceView("mcu-1", "nrf52840dk", Version(1, 2, 3))) is None
        assert rdfm.checks[-1] == (204, {**rdfm.checks[-1][1], "rdfm.software.version": "1.2.3"})
    finally:
        await src.close()


async def test_key_survives_restart(rdfm: RdfmServer, tmp_path: Path) -> None:
    src = source(rdfm, tmp_path)
    with pytest.raises(NotYetAccepted):  # registers: pending
        await src.check(DEV)
    rdfm.accept("mcu-1")
    await src.close()
    src2 = source(rdfm, tmp_path)
    try:
        assert await src2.check(DEV) is None
        assert rdfm.checks[-1][0] == 204  # same key: accepted without a new registration
    finally:
        await src2.close()


async def test_expired_token_renewed_on_401(rdfm: RdfmServer, tmp_path: Path) -> None:
    src = source(rdfm, tmp_path)
    try:
        with pytest.raises(NotYetAccepted):  # registers: pending
            await src.check(DEV)
        rdfm.accept("mcu-1")
        await src.check(DEV)
        n_auth = len(rdfm.auth_requests)
        rdfm.expire_tokens()
        assert await src.check(DEV) is None
        assert [c[0] for c in rdfm.checks[-2:]] == [401, 204]
        assert len(rdfm.auth_requests) == n_auth + 1
    finally:
        await src.close()


async def test_token_renewed_before_expiry(rdfm: RdfmServer, tmp_path: Path) -> None:
    rdfm.token_expiry = 1
    src = source(rdfm, tmp_path, token_margin_s=0.5)
    try:
        with pytest.raises(NotYetAccepted):  # registers: pending
            await src.check(DEV)
        rdfm.accept("mcu-1")
        await src.check(DEV)
        n_auth = len(rdfm.auth_requests)
        start = time.monotonic()
        src.clock = lambda: start + 0.6  # the token's lifetime has passed: the condition under test
        await src.check(DEV)
        assert len(rdfm.auth_requests) == n_auth + 1
        assert 401 not in [c[0] for c in rdfm.checks]
    finally:
        await src.close()


async def test_tampered_artifact_refused(rdfm: RdfmServer, tmp_path: Path, image: bytes) -> None:
    src = source(rdfm, tmp_path)
    try:
        with pytest.raises(NotYetAccepted):  # registers: pending
            await src.check(DEV)
        rdfm.accept("mcu-1")
        art = build_zephyr_artifact(image, device_types=["nrf52840dk"], version="1.2.3")
        pkg = rdfm.assign("mcu-1", art, "1.2.3", "nrf52840dk")
        rdfm.files.corrupt.add(pkg.uuid)
        offer = await src.check(DEV)
        assert offer is not None
        with pytest.raises(FetchError) as ei:
            await src.fetch(offer, max_size=None)
        assert ei.value.result == UpdateResult.INTEGRITY_FAILURE
    finally:
        await src.close()


# -- Mender artifact unit tests ----------------------------------------------------------


def _write(tmp_path: Path, data: bytes) -> Path:
    p = tmp_path / "a.mender"
    p.write_bytes(data)
    return p


@pytest.mark.parametrize("compress", [False, True])
def test_unpack_roundtrip(tmp_path: Path, image: bytes, compress: bool) -> None:
    art = build_zephyr_artifact(image, device_types=["a", "b"], version="1.2.3", compress=compress)
    res = unpack_zephyr_artifact(_write(tmp_path, art), tmp_path / "out", device_type="b")
    assert res.image.read_bytes() == image
    assert res.version == "1.2.3"
    assert stat.S_IMODE(res.image.stat().st_mode) == 0o600


def test_wrong_device_type(tmp_path: Path, image: bytes) -> None:
    art = build_zephyr_artifact(image, device_types=["a"], version="1")
    with pytest.raises(ArtifactError, match="device types"):
        unpack_zephyr_artifact(_write(tmp_path, art), tmp_path / "out", device_type="z")


def _retar(art: bytes, edit) -> bytes:  # type: ignore[no-untyped-def]
    members = []
    with tarfile.open(fileobj=io.BytesIO(art)) as tf:
        for m in tf:
            f = tf.extractfile(m)
            members.append((m, f.read() if f else b""))
    members = edit(members)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:") as tf:
        for m, data in members:
            m.size = len(data)
            tf.addfile(m, io.BytesIO(data) if m.isreg() else None)
    return buf.getvalue()


def test_tampered_image_refused(tmp_path: Path, image: bytes) -> None:
    art = build_zephyr_artifact(image, device_types=["a"], version="1")

    def flip(members):  # type: ignore[no-untyped-def]
        out = []
        for m, data in members:
            if m.name == "data/0000.tar":
                i = data.index(image[:64]) + 600
                data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
            out.append((m, data))
        return out

    with pytest.raises(ArtifactIntegrityError, match="checksum mismatch"):
        unpack_zephyr_artifact(_write(tmp_path, _retar(art, flip)), tmp_path / "out", device_type="a")


def test_path_traversal_and_links_refused(tmp_path: Path, image: bytes) -> None:
    art = build_zephyr_artifact(image, device_types=["a"], version="1")

    def evil(members):  # type: ignore[no-untyped-def]
        ti = tarfile.TarInfo("../../etc/passwd")
        return [*members, (ti, b"x")]

    with pytest.raises(ArtifactError, match="escapes"):
        unpack_zephyr_artifact(_write(tmp_path, _retar(art, evil)), tmp_path / "out", device_type="a")

    def link(members):  # type: ignore[no-untyped-def]
        ti = tarfile.TarInfo("data/0000.tar")
        ti.type = tarfile.SYMTYPE
        ti.linkname = "/etc/passwd"
        return [(m, d) for m, d in members if not m.name.startswith("data/")] + [(ti, b"")]

    with pytest.raises(ArtifactError, match="link"):
        unpack_zephyr_artifact(_write(tmp_path, _retar(art, link)), tmp_path / "out", device_type="a")


def test_oversized_image_refused(tmp_path: Path, image: bytes) -> None:
    art = build_zephyr_artifact(image, device_types=["a"], version="1")
    with pytest.raises(ArtifactError, match="limit"):
        unpack_zephyr_artifact(
            _write(tmp_path, art), tmp_path / "out", device_type="a", max_image_size=len(image) - 1
        )


def test_checksum_provide_mismatch(tmp_path: Path, image: bytes) -> None:
    other = build_zephyr_artifact(image + b"\0", device_types=["a"], version="1")
    art = build_zephyr_artifact(image, device_types=["a"], version="1")

    def swap_header(members):  # type: ignore[no-untyped-def]
        # a self-consistent manifest is not enough: zephyr-image.checksum must match too
        hdr = dict((m.name, d) for m, d in _members(other))["header.tar"]
        out = []
        for m, data in members:
            if m.name == "header.tar":
                data = hdr
            if m.name == "manifest":
                lines = [ln for ln in data.decode().splitlines() if not ln.endswith("header.tar")]
                lines.append(f"{hashlib.sha256(hdr).hexdigest()}  header.tar")
                data = ("\n".join(lines) + "\n").encode()
            out.append((m, data))
        return out

    with pytest.raises(ArtifactIntegrityError, match=r"zephyr-image\.checksum"):
        unpack_zephyr_artifact(_write(tmp_path, _retar(art, swap_header)), tmp_path / "out", device_type="a")


def _members(art: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(art)) as tf:
        for m in tf:
            f = tf.extractfile(m)
            out.append((m, f.read() if f else b""))
    return out
