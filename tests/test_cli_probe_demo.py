"""Operator mistakes end in one line and the documented exit code, never a traceback or a false
success: ``probe`` (the first command for a new board), ``demo`` (run twice, interrupted) and
``status`` beside a running daemon. Every command runs as a real subprocess (the CLI as an
operator types it) against simulated devices on real sockets and PTYs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.demo import Bench
from gateway.sim.config import SimConfig, SimDeviceConfig
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(240)


async def _cli(*args: str, env: dict[str, str] | None = None, within: float = 120
               ) -> tuple[int, str, str]:
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, **(env or {})})
    out, err = await asyncio.wait_for(p.communicate(), within)
    return p.returncode if p.returncode is not None else -1, out.decode(), err.decode()


def _one_line(err: str) -> str:
    """stderr is exactly one line of smp-gateway's (no traceback, no log noise)."""
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and lines[0].startswith("smp-gateway: "), err
    return lines[0]


def _sim_dev(bench: Bench, dev_id: str, preset: str, **kw: Any) -> SimDeviceConfig:
    base: dict[str, Any] = {"id": dev_id, "preset": preset, "key": str(bench.key),
                            "initial_image": str(bench.images["1.0.0"]), "slot_size": 0x40000,
                            "boot_time_s": 0.05}
    base.update(kw)
    return SimDeviceConfig.model_validate(base)


# --- probe: failures ---------------------------------------------------------------------------
async def test_probe_failures_are_one_line_with_the_documented_exit_code(tmp_path: Path) -> None:
    # a UDP address where nothing answers (a bound socket that never replies): the device (1)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    try:
        rc, _, err = await _cli("probe", "--udp", f"127.0.0.1:{port}", "--timeout", "0.3")
    finally:
        silent.close()
    line = _one_line(err)
    assert rc == 1 and "no answer" in line and "CONFIG_MCUMGR_TRANSPORT_UDP" in line
    assert "UART" not in line
    # a PTY nobody answers on: the hint names both serial transports (UART and shell)
    master, slave = os.openpty()
    try:
        rc, _, err = await _cli("probe", "--serial", os.ttyname(slave), "--timeout", "0.3")
    finally:
        os.close(master)
        os.close(slave)
    line = _one_line(err)
    assert rc == 1 and "no answer" in line
    assert "CONFIG_MCUMGR_TRANSPORT_UART" in line and "CONFIG_MCUMGR_TRANSPORT_SHELL" in line
    # what the operator typed or the machine lacks: 2
    rc, _, err = await _cli("probe", "--serial", str(tmp_path / "ttyACM9"))
    assert rc == 2 and "does not exist" in _one_line(err)
    rc, _, err = await _cli("probe", "--udp", "127.0.0.1:abc")
    assert rc == 2 and "port must be a number" in _one_line(err)
    rc, _, err = await _cli("probe", "--udp", "no-such-host.invalid:1337")
    assert rc == 2 and "no-such-host.invalid" in _one_line(err)
    # BLE through BlueZ without a D-Bus system bus: one line, and the way around it
    rc, _, err = await _cli("probe", "--ble", "my-board",
                            env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/no-bus"})
    line = _one_line(err)
    assert rc == 2 and line.startswith("smp-gateway: probe: BlueZ not reachable over D-Bus: ")
    assert "--backend bumble --hci" in line
    rc, _, err = await _cli("probe", "--ble", "my-board", "--backend", "bumble")
    assert rc == 2 and "hci" in _one_line(err)


# --- probe: what it says -----------------------------------------------------------------------
async def test_probe_shell_transport_plans_within_the_shell_mtu(bench_factory) -> None:
    """Zephyr's smp_shell drops frames above CONFIG_MCUMGR_TRANSPORT_SHELL_MTU (256): probe
    finds that out read-only and plans (and writes the stanza) within it; a UART device keeps
    the full netbuf."""
    bench = bench_factory(udp=0, serial=0)
    cfg = SimConfig(state_dir=bench.root / "sim-state", devices=[
        _sim_dev(bench, "shell-1", "zephyr-shell"), _sim_dev(bench, "uart-1", "zephyr-uart")])
    async with Simulator(cfg) as sim:
        shell, uart = sim.devices["shell-1"], sim.devices["uart-1"]
        rc, out, err = await _cli("probe", "--serial", shell.address, "--timeout", "0.5", "--json")
        assert rc == 0, err
        data = json.loads(out)
        assert data["upload_start"]["packet_limit"] <= 256
        assert data["upload_start"]["chunk_data"] < 256
        assert data["devices_entry"]["transport"]["mtu"] == 256
        assert "smp_shell" in data["shell"]
        rc, out, err = await _cli("probe", "--serial", shell.address, "--timeout", "0.5")
        assert rc == 0, err
        stanza = out[out.index("# devices: entry"):out.index("# or a device_templates")]
        assert yaml.safe_load(stanza)["devices"][0]["transport"]["mtu"] == 256
        rc, out, err = await _cli("probe", "--serial", uart.address, "--timeout", "0.5", "--json")
        assert rc == 0, err
        data = json.loads(out)
        assert data["upload_start"]["packet_limit"] == 380 and data["shell"] is None
        assert "mtu" not in data["devices_entry"]["transport"]
        # probing never wrote anything
        assert shell.image_info(1) is None and uart.image_info(1) is None
        assert shell.counters["resets"] == 0 and uart.counters["resets"] == 0


async def test_probe_stock_udp_netbuf_and_stanza_keys(bench_factory) -> None:
    """The stock UDP sample (no MCUmgr params): the netbuf probe shows is the one the upload
    assumes (2048), and the stanza carries mcuboot_mode/slot_size: reported or commented out
    with the reason."""
    bench = bench_factory(udp=1, serial=0)
    cfg = SimConfig(state_dir=bench.root / "sim-state2", devices=[
        _sim_dev(bench, "stock-1", "zephyr-udp", udp={"host": "127.0.0.1", "port": 0})])
    async with Simulator(cfg) as sim:
        ep = sim.devices["stock-1"].endpoint()
        rc, out, err = await _cli("probe", "--udp", f"{ep['host']}:{ep['port']}")
        assert rc == 0, err
        mcumgr = next(x for x in out.splitlines() if "MCUmgr" in x)
        assert "2048" in mcumgr and "384" not in mcumgr
        assert "Kconfig default netbuf 2048" in out
        stanza = out[out.index("# devices: entry"):out.index("# or a device_templates")]
        assert "# slot_size: " in stanza and "not reported by the device" in stanza
        assert "# mcuboot_mode: swap-using-scratch  # GUESS" in stanza
        entry = yaml.safe_load(stanza)["devices"][0]
        assert "mcuboot_mode" not in entry and "slot_size" not in entry  # guesses stay comments
        rc, out, err = await _cli("probe", "--udp", f"{ep['host']}:{ep['port']}", "--json")
        data = json.loads(out)
        assert data["upload_start"]["assumed_netbuf"] == 2048
        assert set(data["not_read"]) == {"slot_size", "mcuboot_mode"}
    # a device that reports its mode: written as reported
    async with Simulator(bench.sim_cfg) as sim:
        ep = sim.devices["udp-1"].endpoint()
        rc, out, err = await _cli("probe", "--udp", f"{ep['host']}:{ep['port']}")
        assert rc == 0, err
        stanza = out[out.index("# devices: entry"):out.index("# or a device_templates")]
        assert "mcuboot_mode: swap-using-scratch  # reported by the device" in stanza
        assert yaml.safe_load(stanza)["devices"][0]["mcuboot_mode"] == "swap-using-scratch"


async def test_probe_empty_image_list_says_what_run_will_do(bench_factory) -> None:
    """MCUboot serial recovery with no application: nothing listed. probe says run refuses it
    and which config enables it."""
    bench = bench_factory(udp=0, serial=0)
    dev = SimDeviceConfig.model_validate({
        "id": "rec-1", "key": str(bench.key), "slot_size": 0x40000, "serial": {},
        "serial_recovery": {}, "boot_time_s": 0.05})
    async with Simulator(SimConfig(state_dir=bench.root / "sim-state3", devices=[dev])) as sim:
        rc, out, err = await _cli("probe", "--serial", sim.devices["rec-1"].address,
                                  "--timeout", "0.5")
        assert rc == 0, err
        assert "(none listed)" in out
        note = next(x for x in out.splitlines() if "run does not update" in x)
        assert "serial recovery" in note and "recovery: {enabled: true" in note
        assert "# mcuboot_mode: single-app" in out


# --- status beside a running daemon ------------------------------------------------------------
async def test_status_beside_a_running_daemon_asks_the_daemon(bench_factory) -> None:
    """The README's advice: `status` while the daemon runs. The daemon holds the serial port
    (exclusive lock) mid-upload; status asks the daemon over its control socket instead of
    opening the port: exit 0, the device's state from the daemon, no "in use". With the
    daemon gone it reads the device itself again."""
    from daemon_support import GatewayProcess, watch_journal

    bench = bench_factory(udp=0, serial=1, realistic_links=True)  # 115200 baud: ~9 s upload
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = bench.gateway_config(sim)
        assert cfg.config_path is not None
        gw = GatewayProcess(cfg.config_path, bench.root / "gateway.log")
        await gw.start()
        try:
            rows = await watch_journal(
                cfg.state_dir, lambda rs: any(r["step"] == "upload" and r["upload_offset"] > 0
                                              for r in rs), within=60)
            assert rows is not None, (bench.root / "gateway.log").read_text()[-3000:]
            rc, out, err = await _cli("status", "-c", str(cfg.config_path))
            assert rc == 0, out + err
            assert "in use" not in out + err and "unreachable" not in out + err
            assert "from the running daemon" in out
            row = next(x for x in out.splitlines() if "serial-1" in x)
            assert "1.0.0" in row and "upload" in row and "in session" in row
            rc, out, err = await _cli("status", "-c", str(cfg.config_path), "--json")
            assert rc == 0, err
            (rec,) = json.loads(out)["devices"]
            assert rec["daemon"]["in_session"] is True and rec["daemon"]["step"] == "upload"
            active = next(s for s in rec["slots"] if "active" in s["flags"])
            assert active["version"] == "1.0.0"  # as the daemon read it from the device
        finally:
            assert await gw.terminate(30) == 0
        # no daemon: the device is read live again
        rc, out, err = await _cli("status", "-c", str(cfg.config_path))
        assert "from the running daemon" not in out
        row = next(x for x in out.splitlines() if "serial-1" in x)
        assert "in use" not in row and "unreachable" not in row, out


# --- demo ------------------------------------------------------------------------------------
async def test_demo_twice_in_one_workdir_then_by_hand(tmp_path: Path) -> None:
    """`demo --workdir D` twice: the second run starts fresh with D's key (no KEYHASH halt),
    prints what the devices report, and only then success; the kept sim.yaml and gateway.yaml
    fit together by hand."""
    work = tmp_path / "demo"
    rc, _, err = await _cli("demo", "--workdir", str(work), within=180)
    assert rc == 0 and "all devices updated and confirmed" in err, err[-3000:]
    key = (work / "keys" / "signing.pem").read_bytes()
    rc, _, err = await _cli("demo", "--workdir", str(work), within=180)
    assert rc == 0 and "all devices updated and confirmed" in err, err[-3000:]
    assert (work / "keys" / "signing.pem").read_bytes() == key  # the same key, reused
    shown = [x for x in err.splitlines() if "simulated device" in x]
    assert len(shown) == 3 and all(x.rstrip().endswith("running 1.0.0") for x in shown), err
    # by hand: the simulator from sim.yaml, the gateway from gateway.yaml
    sim = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "sim", "-c", str(work / "sim.yaml"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        assert sim.stdout is not None
        while True:
            line = (await asyncio.wait_for(sim.stdout.readline(), 60)).decode()
            assert line, "the simulator exited"
            if line.startswith("endpoints: "):
                break
        rc, out, err = await _cli("run", "-c", str(work / "gateway.yaml"), "--once")
        assert rc == 0, out + err[-3000:]
        rc, out, err = await _cli("status", "-c", str(work / "gateway.yaml"))
        assert rc == 0 and out.count("2.0.0") >= 3, out + err
    finally:
        sim.terminate()
        await sim.wait()
    # a directory the demo did not make is never cleared
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    rc, _, err = await _cli("demo", "--workdir", str(other))
    assert rc == 2 and "not made by smp-gateway demo" in _one_line(err)
    assert (other / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_demo_interrupted_removes_its_temporary_key(tmp_path: Path, sig: signal.Signals) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    p = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "demo", stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp)})
    assert p.stderr is not None
    seen = []
    while True:  # the key and images exist once the links line is printed
        line = (await asyncio.wait_for(p.stderr.readline(), 60)).decode()
        assert line, "".join(seen)
        seen.append(line)
        if line.startswith("links:"):
            break
    (made,) = list(tmp.glob("smp-gateway-demo-*"))
    assert (made / "keys" / "signing.pem").is_file()
    p.send_signal(sig)
    rest = (await asyncio.wait_for(p.stderr.read(), 60)).decode()
    assert await p.wait() == 128 + int(sig), rest
    assert "Traceback" not in rest
    assert not list(tmp.glob("smp-gateway-demo-*"))  # no private key left behind
