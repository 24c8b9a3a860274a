"""Review r4-ops: operator tooling (device commands, dry-run, control socket) repros."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import cli_tools, devcmd
from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def _slots(dev: Any) -> dict[int, Any]:
    return {s.slot: s for s in dev.server.state_images() if (s.image or 0) == 0}


async def _wait_file(p: Path, within: float = 60) -> None:
    for _ in range(int(within / 0.05)):
        if p.exists():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{p} never appeared")


async def test_operator_confirm_of_gateway_test_image_before_health_check(
        bench_factory, tmp_path: Path) -> None:
    """The daemon stops while its test boot's health check runs (journal: update open, step
    confirm, tested_hash set; the device test-runs 2.0.0 unconfirmed). `smp-gateway device udp-1
    image confirm` (no hash = "the running image") is accepted and confirms the gateway's test
    image without its health check; the next pass then reports UPDATED (success, to the
    server too) although the health check - which fails - never ran."""
    started = tmp_path / "hook-started"
    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    bench.device_overrides = {"udp-1": {"health_check": {"command": _py(
        f"import time; open({str(started)!r}, 'w').write('x'); time.sleep(600)"),
        "timeout_s": 300}}}
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        data = bench.gateway_dict(sim)
        cfg = parse_config(data, bench.root / "gateway.yaml")
        gw = Gateway(cfg)
        try:
            run = asyncio.create_task(gw.run_once())
            await _wait_file(started)
            run.cancel()  # the daemon is stopped mid-health-check (crash, systemctl stop)
            with pytest.raises(asyncio.CancelledError):
                await run
        finally:
            gw.close()
        s = _slots(dev)
        assert s[0].version == "2.0.0" and s[0].active and not s[0].confirmed, s
        # the operator, no daemon running: "confirm the running image"
        refused = None
        try:
            await cli_tools._device_async(cfg, "udp-1", devcmd.DeviceCommand("image-confirm"))
        except devcmd.DeviceCommandRefused as exc:
            refused = str(exc)
        after = None
        if refused is None:
            # the gateway comes back; the health check would now fail
            data["devices"][0]["health_check"] = {"command": _py("import sys; sys.exit(3)"),
                                                  "timeout_s": 20}
            gw = Gateway(parse_config(data, bench.root / "gateway.yaml"))
            try:
                after = (await gw.run_once()).outcomes["udp-1"]
            finally:
                gw.close()
        assert refused is not None, (
            "operator confirm of the gateway's un-health-checked test image accepted; the next "
            f"pass reported {after.status if after else None}: {after.detail if after else ''} "
            f"(slot 0 confirmed={_slots(dev)[0].confirmed})")


async def test_dry_run_against_mqtt_jobs_changes_server_state(bench_factory, tmp_path: Path) -> None:
    """`run --once --dry-run` "never reports to the server": against an AWS IoT Jobs source its
    check sends StartNextPendingJobExecution (the job goes QUEUED -> IN_PROGRESS, with the
    gateway in its statusDetails) and, for a job document it does not understand, a FAILED
    final status - server-visible outcomes of a pass that was only supposed to look."""
    from aiohttp import web
    from fleet_servers.common import FileStore, serve
    from fleet_servers.jobs_service import JobsService
    from fleet_servers.mosquitto import mosquitto

    from gateway import preflight

    bench = bench_factory(udp=2, serial=0, image_size=16 * 1024)
    fs = FileStore()
    app = web.Application()
    fs.routes(app)
    img = bench.images["2.0.0"].read_bytes()
    async with (mosquitto(tmp_path) as port, serve(app) as base, JobsService(port) as svc,
                Simulator(bench.sim_cfg) as sim):
        good = await svc.add_job("udp-1", "j1", {"files": [{
            "url": base + fs.add("fw.bin", img), "sha256": hashlib.sha256(img).hexdigest(),
            "size": len(img), "version": "2.0.0"}]})
        bad = await svc.add_job("udp-2", "j2", {"files": "not a list"})
        data = bench.gateway_dict(sim)
        data["source"] = {"kind": "mqtt_jobs", "host": "127.0.0.1", "port": port, "tls": False,
                          "poll_interval_s": 1}
        cfg = parse_config(data, bench.root / "gateway.yaml")
        rows = await asyncio.wait_for(preflight.dry_run(cfg), 120)
        got = {r["device"]: r.get("action") for r in rows}
        assert (good.status, good.updates, bad.status, bad.updates) == ("QUEUED", [], "QUEUED", []), (
            f"dry run {got} changed the jobs service: j1 {good.status} details "
            f"{good.status_details}, j2 {bad.status} updates {bad.updates}; start-next requests "
            f"{len(svc.start_next_requests)}")


async def test_device_command_behind_a_long_session_traceback_then_runs_later(
        bench_factory, monkeypatch) -> None:
    """`smp-gateway device udp-1 reset --ignore-window` while the daemon holds the device (an
    update's session: minutes). The CLI's answer wait (120 s, shortened here to 1 s) ends in an
    uncaught TimeoutError (a Python traceback, exit 1 without a line of reason) - and the daemon
    still holds the request: when the session ends it resets the device, long after the
    operator was told the command failed."""
    import argparse

    from gateway import control

    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    async with Simulator(bench.sim_cfg) as sim:
        dev = sim.devices["udp-1"]
        data = bench.gateway_dict(sim)
        cfg = parse_config(data, bench.root / "gateway.yaml")
        gw = Gateway(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(gw.run_forever(stop))
        real = control.request
        monkeypatch.setattr(cli_tools, "request",
                            lambda path, req, timeout_s: real(path, req, timeout_s=1.0))
        try:
            for _ in range(200):
                if cfg.control_socket.exists():
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # the first pass is done
            lock = gw._port_lock(cfg.devices[0])
            await lock.acquire()  # the daemon's update session holds the device
            args = argparse.Namespace(cmd="device", config=None, device_id="udp-1",
                                      words=["reset"], slot=None, force=False,
                                      ignore_window=True, json=False)
            loop = asyncio.get_running_loop()
            raised = rc = None
            try:
                rc = await loop.run_in_executor(None, cli_tools._device, cfg, args)
            except BaseException as exc:
                raised = exc
            resets = dev.counters["resets"]
            lock.release()
            await asyncio.sleep(3.0)
            late = dev.counters["resets"] - resets
        finally:
            stop.set()
            await asyncio.wait_for(task, 30)
            gw.close()
        assert raised is None and rc == 1 and late == 0, (
            f"CLI: rc={rc} raised={type(raised).__name__ if raised else None}; the device was "
            f"reset {late} time(s) after the operator's command had failed")


async def _fake_daemon(path: Path, answer: bytes) -> asyncio.AbstractServer:
    async def client(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readline()
        w.write(answer)
        await w.drain()
        w.close()
    return await asyncio.start_unix_server(client, path=str(path))


@pytest.mark.parametrize("answer", [
    b"[1]\n",
    b'{"ok": true, "result": {"udp-1": "x"}}\n',
    b'{"ok": true, "result": {"udp-1": {"slots": [{"flags": ["active"]}], "slots_at": 1e300}}}\n',
    b"[" * 100000 + b"\n",
    b"not json\n",
])
async def test_status_with_a_hostile_daemon_answer(bench_factory, answer: bytes) -> None:
    """`smp-gateway status` (and `device`) beside something answering on the control socket
    with a non-object / non-dict device / absurd timestamp / deep nesting: a traceback."""
    import yaml

    from gateway import cli

    bench = bench_factory(udp=1, serial=0, image_size=16 * 1024)
    async with Simulator(bench.sim_cfg) as sim:
        data = bench.gateway_dict(sim)
        path = bench.root / "gateway.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        cfg = parse_config(data, path)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        srv = await _fake_daemon(cfg.control_socket, answer)
        loop = asyncio.get_running_loop()
        results = []
        try:
            for argv in (["status", "-c", str(path)],
                         ["device", "-c", str(path), "udp-1", "echo"]):
                try:
                    rc = await loop.run_in_executor(None, cli.main, argv)
                    results.append((argv[0], rc, None))
                except BaseException as exc:
                    results.append((argv[0], None, f"{type(exc).__name__}: {str(exc)[:80]}"))
        finally:
            srv.close()
        assert all(r[2] is None for r in results), results


async def test_control_socket_deeply_nested_request(tmp_path: Path) -> None:
    """A request line of 60k '[' (under the 64 KiB line limit): json.loads raises RecursionError
    (not a ValueError) - the connection is dropped without an answer."""
    from gateway.control import ControlServer

    async def handler(req: dict[str, Any], actor: str) -> Any:
        return "ok"

    srv = ControlServer(tmp_path / "c.sock", handler)
    await srv.start()
    try:
        r, w = await asyncio.open_unix_connection(str(tmp_path / "c.sock"))
        w.write(b"[" * 60000 + b"\n")
        await w.drain()
        line = await asyncio.wait_for(r.readline(), 10)
        w.close()
    finally:
        await srv.close()
    assert line and json.loads(line)["ok"] is False, line


def test_history_limit_does_not_bound_memory(tmp_path: Path) -> None:
    """`smp-gateway history --limit 5` on a journal whose events table grew (every journal
    write adds an event row and nothing prunes it; a daemon that polls writes one per pass):
    history.collect loads every event row of every device into memory before slicing."""
    import tracemalloc

    from gateway import history
    from gateway.journal import Entry, Journal

    j = Journal(tmp_path / "journal.sqlite")
    big = "x" * 20_000
    j._db.execute("BEGIN")
    for i in range(2000):
        j._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)", (float(i), "udp-1", "read", big))
    j._db.execute("COMMIT")
    j.put(Entry("udp-1", step="done", outcome="updated"), "operator pause by uid=0")
    j.close()
    tracemalloc.start()
    try:
        data = history.collect(tmp_path / "journal.sqlite", None, 5)
        _cur, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(data["operator"]) == 1
    assert peak < 8 * 1024 * 1024, f"history --limit 5 peaked at {peak // 2**20} MiB"
