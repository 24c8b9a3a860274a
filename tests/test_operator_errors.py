"""The ten most likely operator mistakes: each message says what happened, where, and what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import serial

from gateway import devkit
from gateway.config import ConfigError, parse_config
from gateway.daemon import Gateway
from gateway.engine import Outcome, Status
from gateway.sim.simulator import Simulator
from gateway.smp.transport import SerialTransport, TransportError

pytestmark = pytest.mark.timeout(60)


async def one_pass(bench: Any, sim: Simulator, *, cfg_update: dict[str, Any] | None = None,
                   **device_kw: Any) -> Outcome:
    cfg = bench.gateway_config(sim, **device_kw)
    if cfg_update:
        cfg = cfg.model_copy(update=cfg_update)
    gw = Gateway(cfg)
    try:
        res = await gw.run_once()
    finally:
        gw.close()
    (out,) = res.outcomes.values()
    return out


# 1. wrong serial port
async def test_wrong_serial_port(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    async with Simulator(bench.sim_cfg) as sim:
        out = await one_pass(bench, sim, transport={"kind": "serial", "port": "/dev/ttyACM9"})
    assert out.status == Status.FAILED
    assert "/dev/ttyACM9 does not exist" in out.detail
    assert "is the device plugged in" in out.detail


# 2. permission denied on the port (a real EACCES: an unprivileged child opens a 0600 root PTY)
def test_serial_permission_denied(tmp_path: Path) -> None:
    master, slave = os.openpty()
    path = os.ttyname(slave)
    os.chmod(path, 0o600)
    code = (
        "import asyncio, os, serial\n"
        "from gateway.smp.transport import SerialTransport, TransportError\n"
        "os.setgid(65534); os.setuid(65534)  # as an unprivileged user from here on\n"
        f"t = SerialTransport({path!r})\n"
        "try:\n    asyncio.run(t.open())\nexcept TransportError as e:\n    print(e)\n"
    )
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                           cwd=Path(__file__).resolve().parents[1], check=False)
    finally:
        os.close(master)
        os.close(slave)
    assert f"permission denied on {path}" in r.stdout, r.stdout + r.stderr
    assert "dialout" in r.stdout


# 3. port in use (exclusive lock held by another program)
async def test_serial_port_in_use(bench_factory: Any) -> None:
    bench = bench_factory(udp=0, serial=1)
    async with Simulator(bench.sim_cfg) as sim:
        (dev,) = sim.devices.values()
        other = serial.Serial()
        other.port = dev.address
        other.exclusive = True
        other.open()
        try:
            out = await one_pass(bench, sim)
        finally:
            other.close()
    assert out.status == Status.FAILED
    assert f"serial port {dev.address} is in use by another process" in out.detail
    assert "fuser -v" in out.detail


# 4. UDP: nobody answers
async def test_udp_no_answer(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    async with Simulator(bench.sim_cfg) as sim:
        out = await one_pass(bench, sim, transport={"kind": "udp", "host": "127.0.0.1", "port": port},
                             timeouts={"request_s": 0.3})
    assert out.status == Status.FAILED
    assert f"127.0.0.1:{port} (UDP)" in out.detail
    assert "check that the device is powered" in out.detail and "firewall" in out.detail


# 5. the device's MCUboot does not trust the signing key
async def test_key_mismatch(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    other = devkit.make_key(bench.root / "keys" / "other.pem")
    img = devkit.sign_image(bench.updates_dir / "other-2.0.0.bin", version="2.0.0", key=other,
                            size=40_000)
    (bench.updates_dir / "manifest.yaml").write_text(
        f"images:\n  - {{file: {img.name}, hardware: sim_board}}\n")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        out = await one_pass(bench, sim, cfg_update={"trusted_keys": [bench.key, other]})
        del cfg
    assert out.status == Status.ROLLED_BACK
    assert "MCUboot refused 2.0.0" in out.detail
    assert "signed with the key the device's MCUboot was built with" in out.detail


# 6. wrong device type
async def test_wrong_device_type(bench_factory: Any) -> None:
    bench2 = bench_factory(udp=1, serial=0)
    from test_update_flow import StaticSource

    async with Simulator(bench2.sim_cfg) as sim:
        cfg = bench2.gateway_config(sim)
        gw = Gateway(cfg, source=StaticSource(bench2.images["2.0.0"], hardware="stm32f4_disco"))
        try:
            res = await gw.run_once()
        finally:
            gw.close()
    (o,) = res.outcomes.values()
    assert o.status == Status.REFUSED
    assert "built for hardware 'stm32f4_disco'" in o.detail and "'sim_board'" in o.detail
    assert "fix the image's hardware in the update source" in o.detail


# 7. slot too small
async def test_slot_too_small(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        out = await one_pass(bench, sim, slot_size=64 * 1024)
    assert out.status in (Status.REFUSED, Status.FAILED)
    assert "slot" in out.detail and "65536" in out.detail
    assert "build a smaller image or check slot_size" in out.detail or "more than the 65536" in out.detail


# 8. device built without image management
async def test_device_without_image_management(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0, device_kw={"img_mgmt_supported": False})
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        out = await one_pass(bench, sim)
    assert out.status == Status.FAILED
    assert "has no image management" in out.detail and "CONFIG_MCUMGR_GRP_IMG=y" in out.detail


# 9. unreachable fleet server
async def test_unreachable_fleet_server(bench_factory: Any) -> None:
    bench = bench_factory(udp=1, serial=0)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        data["source"] = {"kind": "latest_release", "url": f"http://127.0.0.1:{port}",
                          "project_key": "k", "request_timeout_s": 2}
        cfg = parse_config(data, bench.root / "gw.yaml")
        gw = Gateway(cfg)
        try:
            res = await gw.run_once()
        finally:
            gw.close()
        (dev,) = sim.devices.values()
        assert dev.counters["upload_bytes_received"] == 0
    (out,) = res.outcomes.values()
    assert out.status == Status.FAILED
    assert f"127.0.0.1:{port}" in out.detail
    assert "check the source's url" in out.detail


# 10. a misspelt config key
def test_invalid_config_key(tmp_path: Path) -> None:
    key = devkit.make_key(tmp_path / "k.pem")
    data = {"state_dir": str(tmp_path / "s"), "trusted_keys": [str(key)],
            "source": {"kind": "local", "path": str(tmp_path)},
            "devices": [{"id": "d", "hardware": "h", "transport": {"kind": "udp", "host": "h"},
                         "allow_unsinged": True}]}
    with pytest.raises(ConfigError) as ei:
        parse_config(data, tmp_path / "gw.yaml")
    msg = str(ei.value)
    assert str(tmp_path / "gw.yaml") in msg and "devices[0].allow_unsinged" in msg
    assert "did you mean 'allow_unsigned'" in msg


# 11. the trusted key file is not a key
@pytest.mark.parametrize("content", [b"not a key\n", b"-----BEGIN PUBLIC KEY-----\nAAAA\n"
                                     b"-----END PUBLIC KEY-----\n", b""])
def test_trusted_key_not_a_key(tmp_path: Path, content: bytes) -> None:
    bad = tmp_path / "trusted.pem"
    bad.write_bytes(content)
    data = {"state_dir": str(tmp_path / "s"), "trusted_keys": [str(bad)],
            "source": {"kind": "local", "path": str(tmp_path)},
            "devices": [{"id": "d", "hardware": "h", "transport": {"kind": "udp", "host": "h"}}]}
    cfg = parse_config(data, tmp_path / "gw.yaml")
    with pytest.raises(ConfigError) as ei:
        Gateway(cfg)
    msg = str(ei.value)
    assert "trusted_keys[0]" in msg and str(bad) in msg and "PEM public or private key" in msg


def test_trusted_key_missing(tmp_path: Path) -> None:
    data = {"state_dir": str(tmp_path / "s"), "trusted_keys": [str(tmp_path / "nope.pem")],
            "source": {"kind": "local", "path": str(tmp_path)},
            "devices": [{"id": "d", "hardware": "h", "transport": {"kind": "udp", "host": "h"}}]}
    with pytest.raises(ConfigError, match=r"trusted_keys\[0\]: no such key file"):
        parse_config(data, tmp_path / "gw.yaml")


def test_cli_reports_a_bad_key_without_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "trusted.pem"
    bad.write_text("garbage")
    (tmp_path / "gw.yaml").write_text(
        f"state_dir: {tmp_path / 's'}\ntrusted_keys: [{bad}]\n"
        f"source: {{kind: local, path: {tmp_path}}}\n"
        "devices: [{id: d, hardware: h, transport: {kind: udp, host: 127.0.0.1}}]\n")
    r = subprocess.run([sys.executable, "-m", "gateway.cli", "run", "--once", "-c",
                        str(tmp_path / "gw.yaml")], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert "trusted_keys[0]" in r.stderr


def test_transport_error_messages_are_transport_errors() -> None:
    with pytest.raises(TransportError, match="does not exist"):
        import asyncio

        asyncio.run(SerialTransport("/dev/ttyNOPE0").open())
