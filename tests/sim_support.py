"""Helpers shared by the simulator mode tests (tests/test_sim_*.py): fast device configs, an
smpclient connected to a simulated device, uploads, state reads keyed by (image, slot)."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from smpclient import SMPClient
from smpclient.generics import success
from smpclient.requests.image_management import ImageStatesRead, ImageStatesWrite
from smpclient.requests.os_management import ResetWrite
from smpclient.transport.serial import SMPSerialTransport
from smpclient.transport.udp import SMPUDPTransport

from gateway.mcuboot import parse_image
from gateway.sim import SimConfig, SimDevice, SimDeviceConfig, Simulator

# a fully featured build with instant flash (the defaults model the stock sample's timings)
FAST: dict[str, Any] = dict(
    mcumgr_params_supported=True, bootloader_info_supported=True, os_info_supported=True,
    image_check=True, buf_size=2475, request_processing_s=0.0, flash_write_bps=None,
    flash_erase_sector_s=0.0, flash_stalls_cpu=False, swap_time_s=0.0, boot_time_s=0.05,
    reset_delay_s=0.05, swap_sector_size=0x1000, flash_sector_size=0x1000,
)


def loopback_ip() -> str:
    """A random 127/8 address: smpclient's UDP transport always uses port 1337."""
    r = random.SystemRandom()
    return f"127.{r.randint(1, 254)}.{r.randint(1, 254)}.{r.randint(2, 254)}"


def cfg(dev_id: str = "d1", transport: str = "udp", **kw: Any) -> SimDeviceConfig:
    base: dict[str, Any] = {"id": dev_id, **FAST}
    if transport == "udp":
        base["udp"] = {"host": loopback_ip(), "port": 1337}
    else:
        base["serial"] = {}
    base.update(kw)
    return SimDeviceConfig.model_validate(base)


@pytest.fixture
async def sim_factory(tmp_path: Path) -> AsyncIterator[Any]:
    sims: list[Simulator] = []

    async def make(*devices: SimDeviceConfig) -> Simulator:
        sim = Simulator(SimConfig(state_dir=tmp_path / f"state{len(sims)}",
                                  devices=list(devices)))
        await sim.start()
        sims.append(sim)
        return sim

    yield make
    for s in sims:
        await s.stop()


async def client_for(dev: SimDevice, *, serial_buf_size: int | None = None) -> SMPClient:
    """smpclient on the device's transport; ``serial_buf_size`` caps the serial frames (MCUboot
    serial recovery drops frames above CONFIG_BOOT_SERIAL_MAX_RECEIVE_SIZE, 1024)."""
    if dev.transport.kind == "udp":
        c = SMPClient(SMPUDPTransport(), dev.address.rsplit(":", 1)[0], 3.0)
    else:
        from smpclient.transport.serial.encoded import BufferSize

        strategy = None if serial_buf_size is None else BufferSize(serial_buf_size)
        c = SMPClient(SMPSerialTransport(fragmentation_strategy=strategy), dev.address, 3.0)
    await c.connect()
    return c


async def upload(c: SMPClient, image: bytes | Path, image_no: int = 0) -> None:
    data = image.read_bytes() if isinstance(image, Path) else image
    async for _ in c.upload(data, slot=image_no, subsequent_timeout_s=3.0):
        pass


def slots(dev: SimDevice) -> dict[tuple[int, int], dict[str, Any]]:
    """What an image state read answers now, keyed by (image, slot)."""
    return {(s.get("image", 0), s["slot"]): s for s in dev.image_states()}


async def read_state(c: SMPClient) -> dict[tuple[int, int], Any]:
    r = await c.request(ImageStatesRead())
    assert success(r), r
    return {(s.image or 0, s.slot): s for s in r.images}


async def mark(c: SMPClient, image: bytes | Path | None, confirm: bool = False) -> Any:
    h = None
    if image is not None:
        h = parse_image(image.read_bytes() if isinstance(image, Path) else image).hash
    return await c.request(ImageStatesWrite(hash=h, confirm=confirm))


async def reset(c: SMPClient, dev: SimDevice, **kw: Any) -> None:
    """os reset and wait for the next boot (any outcome)."""
    boots = dev.boots
    r = await c.request(ResetWrite(**kw))
    assert success(r), r
    await dev.wait_booted(boots + 1)


def err_rc(r: Any) -> int | None:
    """The group rc of an SMP v2 error answer (None for a success)."""
    err = getattr(r, "err", None)
    return None if err is None else int(err.rc)


async def raw_udp(dev: SimDevice, op: int, group: int, cmd: int, body: dict[str, Any],
                  timeout_s: float = 3.0) -> dict[str, Any]:
    """One SMP v2 request over UDP, the answer's CBOR body (for answers smpclient's models do
    not parse, e.g. bootloader info ``{"mode": N}``)."""
    import asyncio
    import struct

    import cbor2

    host, port = dev.address.rsplit(":", 1)
    payload = cbor2.dumps(body)
    pkt = struct.pack("!BBHHBB", op | (1 << 3), 0, len(payload), group, 7, cmd) + payload
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: Any) -> None:
            if not got.done():
                got.set_result(data)

    tr, _ = await loop.create_datagram_endpoint(Proto, remote_addr=(host, int(port)))
    try:
        tr.sendto(pkt)
        rsp = await asyncio.wait_for(got, timeout_s)
    finally:
        tr.close()
    out = cbor2.loads(rsp[8:])
    assert isinstance(out, dict)
    return out
