"""The daemon as systemd runs it: unit file, sd_notify, watchdog, metrics, SIGTERM, status."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from daemon_support import GatewayProcess, NotifySocket, gateway_bin, journal_rows, watch_journal
from fleet_servers.common import require_tool

from gateway.sim.config import LinkConfig
from gateway.sim.simulator import Simulator

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "smp-gateway.service"


def _readme_install_steps() -> tuple[str, str]:
    """The README's venv path (step 1) and its unit install command (step 2)."""
    text = (ROOT / "README.md").read_text()
    venv = re.search(r"python3 -m venv (/\S+?)\s*&&", text)
    install = re.search(r"`(install -Dm644 systemd/smp-gateway\.service (/\S+))`", text)
    assert venv and install, "README: 'Running as a systemd service' install steps not found"
    return venv.group(1), install.group(1)


def test_unit_file_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` on the unit exactly as the README installs it: the venv of
    step 1 (here a link to this environment's entry point, in a private mount namespace) and
    step 2's ``install`` command, run as written; the unit is not edited."""
    analyze = require_tool("systemd-analyze", "systemd")
    unshare = require_tool("unshare", "util-linux")
    venv, install = _readme_install_steps()
    text = UNIT.read_text()
    exec_start = re.search(r"^ExecStart=(\S+) ", text, re.M)
    assert exec_start and exec_start.group(1) == f"{venv}/bin/smp-gateway", (
        "ExecStart must be the README's venv", exec_start and exec_start.group(1))
    unit_path = install.split()[-1]
    exe = gateway_bin()[0]
    assert os.path.isabs(exe) and os.access(exe, os.X_OK), exe
    top = "/" + venv.strip("/").split("/")[0]  # e.g. /opt: a private tmpfs over it
    script = (f"set -e; mount -t tmpfs none {top}; mount -t tmpfs none {os.path.dirname(unit_path)}; "
              f"mkdir -p {venv}/bin; ln -s {exe} {venv}/bin/smp-gateway; "
              f"cd {ROOT}; {install}; {analyze} verify --man=no {unit_path}")
    r = subprocess.run([unshare, "--mount", "--propagation", "private", "sh", "-c", script],
                       capture_output=True, text=True, timeout=120)
    out = (r.stdout + r.stderr).strip()
    if r.returncode != 0 and "unshare" in out and ("Operation not permitted" in out
                                                   or "Permission denied" in out):
        pytest.skip(f"no private mount namespace here (needs root): {out}")
    assert r.returncode == 0, out
    assert "smp-gateway.service" not in out, out  # no warning about our unit
    for must in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "DynamicUser=yes",
                 "RestartPreventExitStatus=2",  # a config error (exit 2) never restarts
                 "SupplementaryGroups=dialout", "StateDirectory=smp-gateway", "ProtectSystem=strict",
                 "EnvironmentFile=-/etc/smp-gateway/env", "SystemCallFilter=@system-service",
                 "CapabilityBoundingSet=\n", "AF_BLUETOOTH", "DeviceAllow=char-ttyACM rw",
                 "DeviceAllow=char-ttyUSB rw", "DeviceAllow=char-ttyS rw", "DeviceAllow=char-ttyAMA rw",
                 "MemoryMax="):
        assert must in text, must
    # Documentation= only where pip puts something (it installs no docs): none
    assert "Documentation=" not in text


async def _http_get(port: int, path: str = "/metrics") -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data.decode()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_daemon_notifies_systemd_serves_metrics_and_stops_gracefully(
        bench_factory: Any) -> None:
    bench = bench_factory(udp=2, serial=0, image_size=40 * 1024)
    for d in bench.sim_cfg.devices:
        d.link = LinkConfig(latency_s=0.01, bandwidth_bps=4000)  # ~10 s uploads
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        port = _free_port()
        data.update(metrics={"host": "127.0.0.1", "port": port}, stop_timeout_s=5)
        cfg_path = bench.root / "gateway.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        state_dir = Path(data["state_dir"])
        notify = NotifySocket(bench.root / "notify.sock")
        gw = GatewayProcess(cfg_path, bench.root / "gateway.log", notify=notify,
                            env={"WATCHDOG_USEC": "600000"})  # WatchdogSec=0.6 s: ping every 0.3 s
        await gw.start()
        try:
            ready = await notify.wait_for("READY=1", 30)
            assert "STATUS=devices=2" in ready
            for _ in range(2):
                ping = await notify.wait_for("WATCHDOG=1", 5)
                assert "STATUS=" in ping

            # both devices uploading (seen from the devices), then ask for metrics
            devs = list(sim.devices.values())
            for dev in devs:
                await dev.wait_for(lambda d: d.counters["upload_bytes_received"] > 4000, 30)
            text = await _http_get(port)
            assert text.startswith("HTTP/1.1 200 OK")
            assert "text/plain; version=0.0.4" in text
            assert 'smpgw_devices{step="upload"} 2' in text, text
            assert "smpgw_sessions_active 2" in text
            assert "# TYPE smpgw_updates_started_total counter" in text
            assert (await _http_get(port, "/nope")).startswith("HTTP/1.1 404")

            # SIGTERM mid-upload: STOPPING=1, exit 0 well within stop_timeout_s
            t0 = time.monotonic()
            assert gw.proc is not None
            gw.proc.terminate()
            await notify.wait_for("STOPPING=1", 5)
            rc = await asyncio.wait_for(gw.proc.wait(), 10)
            took = time.monotonic() - t0
            assert rc == 0 and took < 5.0, (rc, took)
            rows = journal_rows(state_dir)
            assert all(r["step"] == "upload" and r["outcome"] is None for r in rows), rows
            assert all(0 < r["upload_offset"] < r["upload_total"] for r in rows), rows
            received = {d.id: d.counters["upload_bytes_received"] for d in devs}

            # the next start resumes both uploads where the devices are (sha resume)
            gw2 = GatewayProcess(cfg_path, bench.root / "gateway.log")
            await gw2.start()
            done = await watch_journal(
                state_dir, lambda rs: len(rs) == 2 and all(r["outcome"] == "updated" for r in rs),
                within=60, every=0.1)
            assert done is not None, journal_rows(state_dir)
            assert await gw2.terminate(within=10) == 0
            for dev in devs:
                kinds = [e.kind for e in dev.events]
                assert kinds.count("upload-start") == 1 and "upload-resume" in kinds, kinds
                resumed = [e.detail["off"] for e in dev.events if e.kind == "upload-resume"]
                assert resumed[0] > 0
                # bytes sent after the restart: about the rest of the image, not all of it
                after = dev.counters["upload_bytes_received"] - received[dev.id]
                assert after < 40 * 1024 + 1024 - resumed[0] + 8 * 1500, (after, resumed)
        finally:
            if gw.proc is not None and gw.proc.returncode is None:
                await gw.kill()
            notify.close()

    # `smp-gateway status --offline`: the journal only
    proc = await asyncio.create_subprocess_exec(
        *gateway_bin(), "status", "--config", str(cfg_path), "--offline",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
    out = out_b.decode()
    assert proc.returncode == 0, err_b.decode()
    for dev_id in ("udp-1", "udp-2"):
        assert dev_id in out
    assert "2.0.0" in out and "done" in out, out


def test_sd_notify_abstract_and_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.systemd import Notifier, watchdog_interval

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled and Notifier().ready() is False
    assert Notifier("@smp-gw-test").address == b"\0smp-gw-test"
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() == 10.0
    assert sys.platform.startswith("linux")
