"""Finding 2: only the verified bytes of an image reach a device, and they fit with the trailer.

An MCUboot image's hash and signature cover header + body + protected TLVs, and the image ends
with the unprotected TLVs (``total_size``). Whatever a file carries after that - slot padding,
or the MCUboot trailer ``imgtool sign --pad --confirm`` writes (magic + image_ok = 1: "install
permanently at the next boot") - is covered by nothing. The gateway must send exactly
``total_size`` bytes (the upload ``sha`` is theirs), refuse a file whose tail is not erased
flash (0xFF) before a byte is sent, and refuse an image that does not leave MCUboot room for its
trailer at the end of the slot.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
from safety_support import Request, Tap, active_state, slot1_flags

from gateway import devkit
from gateway.daemon import Gateway
from gateway.engine import Status
from gateway.images import Refusal
from gateway.mcuboot import parse_image, trailer_size
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(120)


def uploaded(tap: Tap) -> tuple[int | None, bytes | None, bytes]:
    """(len, sha) of the first chunk and the bytes the device was sent, by offset."""
    ups = tap.requests(lambda r: r.is_upload)
    first = next((r for r in ups if r.body.get("off") == 0 and "len" in r.body), None)
    buf = bytearray()
    for r in ups:
        off, data = r.body.get("off"), r.body.get("data") or b""
        if off is None:
            continue
        end = off + len(data)
        if len(buf) < end:
            buf += b"\xff" * (end - len(buf))
        buf[off:end] = data
    return ((first.body.get("len") if first else None), (first.body.get("sha") if first else None),
            bytes(buf))


async def one_pass(bench: Any, sim: Simulator, **kw: Any) -> Any:
    gw = Gateway(bench.gateway_config(sim, health_check_s=0.3, **kw))
    try:
        return await gw.run_once()
    finally:
        gw.close()


def use_file(bench: Any, path: Path) -> None:
    bench.images["2.0.0"] = path
    bench.publish("2.0.0")


async def test_only_the_verified_image_is_uploaded(bench_factory: Any) -> None:
    """A file padded with erased flash (0xFF): the padding is not sent."""
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    plain = bench.images["2.0.0"].read_bytes()
    info = parse_image(plain)
    assert info.total_size == len(plain)
    padded = bench.root / "images" / "app-2.0.0-ffpad.bin"
    padded.write_bytes(plain + b"\xff" * 4096)
    use_file(bench, padded)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        tap = Tap(dev).install()
        marked_pending: list[dict[str, bool]] = []

        def hook(req: Request, frame: bytes, reply: Any) -> bool:
            if req.is_test:
                marked_pending.append(slot1_flags(dev))  # what the upload alone did to slot 1
            return True

        tap.hook = hook
        res = await one_pass(bench, sim)
        assert res.outcomes[dev.id].status == Status.UPDATED, res.outcomes[dev.id]
        length, sha, data = uploaded(tap)
        assert length == info.total_size
        assert sha == hashlib.sha256(plain).digest()
        assert data == plain  # exactly the verified bytes, nothing after them
        assert marked_pending and not marked_pending[0].get("pending"), marked_pending
        assert active_state(dev) == ("2.0.0", True)


async def test_imgtool_pad_confirm_file_is_refused_before_a_byte(bench_factory: Any) -> None:
    """``imgtool sign --pad --confirm`` writes MCUboot's trailer with image_ok set into the file:
    uploaded, it would make the image permanent without a test. Refused, zero bytes sent."""
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    path = devkit.sign_image(bench.root / "images" / "app-2.0.0-confirmed.bin", version="2.0.0",
                             key=bench.key, size=8 * 1024, slot_size=bench.sim_cfg.devices[0].slot_size,
                             extra=("--pad", "--confirm"))
    use_file(bench, path)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await one_pass(bench, sim)
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert Refusal.TRAILING_DATA.value in out.detail, out.detail
        assert "--pad" in out.detail and "image_ok" in out.detail, out.detail
        assert dev.counters["requests.1.1"] == 0  # no upload request at all
        assert not slot1_flags(dev), slot1_flags(dev)
        await dev.power_cycle(wait=True)
        assert active_state(dev) == ("1.0.0", True)


async def test_bytes_after_the_image_are_refused(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    plain = bench.images["2.0.0"].read_bytes()
    tail = bench.root / "images" / "app-2.0.0-tail.bin"
    tail.write_bytes(plain + b"\xff" * 100 + b"appended by a build script\n")
    use_file(bench, tail)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await one_pass(bench, sim)
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert f"offset {len(plain) + 100}" in out.detail, out.detail
        assert dev.counters["requests.1.1"] == 0


async def test_image_without_room_for_the_trailer_is_refused(bench_factory: Any) -> None:
    """The image alone fits the slot, image + MCUboot trailer does not: MCUboot could not
    keep its swap state, so the gateway refuses it (LwM2M 2, not enough flash)."""
    slot = 0x20000
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024, slot_size=slot)
    t = trailer_size(write_align=8, max_sectors=128)
    assert t == 128 * 3 * 8 + 8 * 4 + 16  # imgtool Image._trailer_size / MCUboot boot_trailer_sz
    # signed for a bigger slot so that imgtool's own check lets it through
    path = devkit.sign_image(bench.root / "images" / "app-2.0.0-big.bin", version="2.0.0",
                             key=bench.key, size=slot - 0x200 - 1500, slot_size=2 * slot)
    total = parse_image(path.read_bytes()).total_size
    assert total <= slot < total + t
    use_file(bench, path)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        res = await one_pass(bench, sim)
        out = res.outcomes[dev.id]
        assert out.status == Status.REFUSED, out
        assert Refusal.TOO_LARGE.value in out.detail and "trailer" in out.detail, out.detail
        assert dev.counters["requests.1.1"] == 0
        # a device configured with a smaller write alignment has room for it (a fresh gateway
        # state: the refusal blocked this artifact for the device)
        shutil.rmtree(bench.root / "gateway-state")
        res = await one_pass(bench, sim, flash_write_align=1, max_img_sectors=32)
        assert res.outcomes[dev.id].status != Status.REFUSED, res.outcomes[dev.id]
