"""Operator mistakes through the installed CLI, as an operator runs it (a subprocess): no
traceback, no false success, the documented exit code, one line per problem, nothing lost."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from fleet_servers.common import serve
from fleet_servers.rdfm import RdfmServer

from gateway import devkit
from gateway.demo import Bench
from gateway.sim.simulator import Simulator

pytestmark = pytest.mark.timeout(120)

CLI = [sys.executable, "-m", "gateway.cli"]


def run_cli(*args: str, timeout: float = 90, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, check=False, env=env)


async def arun_cli(*args: str, limit_s: float = 90) -> subprocess.CompletedProcess[str]:
    """The CLI as a subprocess while this test's event loop serves simulated devices/servers."""
    proc = await asyncio.create_subprocess_exec(*CLI, *args, stdin=subprocess.DEVNULL,
                                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(args, proc.returncode, out.decode(), err.decode())


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr


def one_line_error(r: subprocess.CompletedProcess[str], code: int = 2) -> str:
    assert r.returncode == code, (r.returncode, r.stderr)
    no_traceback(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    return lines[0]


def write_cfg(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bare_cfg(tmp: Path, state_dir: Path | None = None, **top: Any) -> dict[str, Any]:
    """A config whose one device is not there (UDP port 9 on loopback)."""
    key = devkit.make_key(tmp / "key.pem")
    fw = tmp / "fw"
    fw.mkdir(exist_ok=True)
    (fw / "manifest.yaml").write_text("images: []\n")
    return {"state_dir": str(state_dir or tmp / "state"), "trusted_keys": [str(key)],
            "source": {"kind": "local", "path": str(fw), "poll_interval_s": 0.5},
            "devices": [{"id": "d1", "hardware": "hw", "slot_size": 0x8000,
                         "timeouts": {"request_s": 0.3, "connect_s": 0.5},
                         "transport": {"kind": "udp", "host": "127.0.0.1", "port": 9}}],
            **top}


def sim_cfg(bench: Bench, sim: Simulator, path: Path, **top: Any) -> Path:
    data = bench.gateway_dict(sim)
    data.update(top)
    data.pop("config_path", None)
    return write_cfg(path, json.loads(json.dumps(data, default=str)))


def reports(bench: Bench) -> list[dict[str, Any]]:
    p = bench.updates_dir / "reports.jsonl"
    return [json.loads(ln) for ln in p.read_text().splitlines()] if p.is_file() else []


def plain(r: subprocess.CompletedProcess[str], dev: str) -> str:
    (line,) = [ln for ln in r.stdout.splitlines() if ln.startswith(f"device={dev} ")]
    return line


# -- 2. a broken release is a reported failure, never "up-to-date" ---------------------------
@pytest.mark.parametrize("kind", ["missing", "not-mcuboot"])
async def test_once_broken_release_fails_and_is_reported(bench_factory: Any, tmp_path: Path,
                                                         kind: str) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    if kind == "not-mcuboot":
        (bench.updates_dir / "app.bin").write_bytes(b"\x7fELF" + os.urandom(4000))
    (bench.updates_dir / "manifest.yaml").write_text(
        "images:\n  - file: app.bin\n    hardware: sim_board\n")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml")
        r = await arun_cli("run", "--once", "-c", str(cfg))
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        no_traceback(r)
        line = plain(r, "udp-1")
        assert "result=refused" in line and "up-to-date" not in line, line
        assert "app.bin" in line
        assert ("does not exist" if kind == "missing" else "not a usable MCUboot image") in line
        (rep,) = reports(bench)  # reported to the source (reports.jsonl)
        assert rep["device"] == "udp-1" and rep["file"] == "app.bin"
        assert rep["result_name"] in ("INVALID_URI", "UNSUPPORTED_PACKAGE")
        # again: still a failure (blocked until the entry changes), reported once
        r2 = await arun_cli("run", "--once", "-c", str(cfg))
        assert r2.returncode == 1, r2.stderr
        assert "result=refused" in plain(r2, "udp-1")
        assert len(reports(bench)) == 1
        # fixed: the real image goes
        bench.publish("2.0.0")
        r3 = await arun_cli("run", "--once", "-c", str(cfg))
        assert r3.returncode == 0, (r3.stdout, r3.stderr)
        assert "result=updated" in plain(r3, "udp-1")


async def test_once_rdfm_device_not_accepted_is_not_success(bench_factory: Any,
                                                             tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    srv = RdfmServer()
    async with serve(srv.app()) as base, Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml",
                      source={"kind": "rdfm", "url": base, "key_bits": 2048})
        r = await arun_cli("run", "--once", "-c", str(cfg))
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        no_traceback(r)
        line = plain(r, "udp-1")
        assert "result=held" in line and "not accepted" in line, line
        assert "polling continues" not in r.stderr
        assert srv.registrations  # it did register: pending on the server


# -- 3. one line, exit 2 -------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["file", "unwritable", "proc"])
def test_status_offline_unusable_state_dir_is_one_line(tmp_path: Path, kind: str) -> None:
    if kind == "file":
        state = tmp_path / "afile"
        state.write_text("x")
    elif kind == "unwritable":
        if os.geteuid() == 0:
            state = Path("/proc/version/state")  # root writes anywhere else
        else:
            ro = tmp_path / "ro"
            ro.mkdir(mode=0o500)
            state = ro / "state"
    else:
        state = Path("/proc/smp-gateway-state")
    cfg = write_cfg(tmp_path / "gw.yaml", bare_cfg(tmp_path, state))
    for args in (["status", "--offline"], ["status", "--offline", "--json"]):
        line = one_line_error(run_cli(*args, "-c", str(cfg)))
        assert "state_dir" in line and str(state) in line, line


def test_status_offline_does_not_create_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "not-yet"
    cfg = write_cfg(tmp_path / "gw.yaml", bare_cfg(tmp_path, state))
    r = run_cli("status", "--offline", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    no_traceback(r)
    assert "d1" in r.stdout
    assert not state.exists()
    r = run_cli("status", "--offline", "--json", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert not state.exists()
    (rec,) = json.loads(r.stdout)["devices"]
    assert rec["reachable"] is None and rec["error"] is None  # not asked


def test_status_json_reachable_is_a_bool_with_an_error(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "gw.yaml", bare_cfg(tmp_path))
    r = run_cli("status", "--json", "-c", str(cfg))
    assert r.returncode == 1, r.stderr
    no_traceback(r)
    (rec,) = json.loads(r.stdout)["devices"]
    assert rec["reachable"] is False
    assert isinstance(rec["error"], str) and rec["error"].startswith("unreachable"), rec


def test_metrics_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_cfg(tmp_path / "gw.yaml",
                        bare_cfg(tmp_path, metrics={"host": "127.0.0.1", "port": port}))
        line = one_line_error(run_cli("run", "-c", str(cfg)))
    assert f"127.0.0.1:{port}" in line and "in use" in line and "metrics" in line, line


def test_sim_without_its_keys_is_one_line(tmp_path: Path) -> None:
    cfg = write_cfg(tmp_path / "sim.yaml", {"state_dir": "st", "devices": [
        {"id": "u1", "udp": {"host": "127.0.0.1", "port": 0}, "key": "keys/signing.pem",
         "initial_image": "images/app.bin"}]})
    line = one_line_error(run_cli("sim", "-c", str(cfg)))
    assert "key" in line and str(tmp_path / "keys" / "signing.pem") in line, line


def test_second_sim_on_used_ports_is_one_line_and_keeps_the_first(tmp_path: Path) -> None:
    key = devkit.make_key(tmp_path / "k.pem")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = write_cfg(tmp_path / "sim.yaml", {"state_dir": "st", "devices": [
        {"id": "u1", "udp": {"host": "127.0.0.1", "port": port}, "key": str(key)}]})
    first = subprocess.Popen([*CLI, "sim", "-c", str(cfg)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        assert first.stdout is not None
        for line in first.stdout:  # announced once every device is up
            if line.startswith("endpoints: "):
                break
        else:
            raise AssertionError(first.communicate())
        endpoints = tmp_path / "st" / "endpoints.json"
        assert endpoints.is_file()
        line = one_line_error(run_cli("sim", "-c", str(cfg)))
        assert str(port) in line and "in use" in line, line
        assert endpoints.is_file(), "the failed second simulator deleted the first's endpoints"
        assert first.poll() is None
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=30)


# -- 7. local source problems, reports, log noise, config errors -------------------------------
async def test_local_manifest_problems_name_the_file_and_line(bench_factory: Any,
                                                              tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    manifest = bench.updates_dir / "manifest.yaml"
    manifest.write_text("images:\n  - file: a.bin\n    hardware: sim_board\n"
                        "  - file: b.bin\n    hardwre: sim_board\n")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml")
        r = await arun_cli("run", "--once", "-c", str(cfg))
        assert r.returncode == 1, r.stderr
        no_traceback(r)
        line = plain(r, "udp-1")
        assert f"{manifest}:4" in line and "images.1.hardware" in line, line
        assert "url" not in line and "lwm2m_result=10" not in line, line  # not CONNECTION_LOST
        cfg2 = sim_cfg(bench, sim, tmp_path / "gw2.yaml",
                       source={"kind": "local", "path": str(tmp_path / "nowhere")})
        r = await arun_cli("run", "--once", "-c", str(cfg2))
        assert r.returncode == 1, r.stderr
        line = plain(r, "udp-1")
        assert f"{tmp_path / 'nowhere'} does not exist" in line and "url" not in line, line


async def test_unwritable_reports_file_is_not_delivered_and_kept(bench_factory: Any,
                                                                 tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    (bench.updates_dir / "reports.jsonl").mkdir()  # cannot be appended to, not even by root
    async with Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml")
        r = await arun_cli("run", "--once", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        assert "result=updated" in plain(r, "udp-1")
        db = sqlite3.connect(bench.root / "gateway-state" / "journal.sqlite")
        states = [s for (s,) in db.execute("SELECT state FROM reports WHERE device_id='udp-1'")]
        db.close()
        assert states == ["pending"], states  # kept, not counted as delivered
        (bench.updates_dir / "reports.jsonl").rmdir()
        r = await arun_cli("run", "--once", "-c", str(cfg))
        assert r.returncode == 0, r.stderr
        (rep,) = reports(bench)  # sent at the next pass
        assert rep["result_name"] == "SUCCESS" and rep["device"] == "udp-1"


async def test_missing_mcumgr_parameters_logged_once_per_device(bench_factory: Any,
                                                                tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024,
                          device_kw={"mcumgr_params_supported": False})
    bench.publish("1.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml")
        data = yaml.safe_load(cfg.read_text())
        data["source"]["poll_interval_s"] = 0.1
        write_cfg(cfg, data)
        proc = await asyncio.create_subprocess_exec(*CLI, "run", "-c", str(cfg),
                                                    stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            while sum("up-to-date" in ln for ln in lines) < 4:
                raw = await asyncio.wait_for(proc.stderr.readline(), 60)
                assert raw, "".join(lines)
                lines.append(raw.decode())
        finally:
            proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(proc.communicate(), 40)
        text = "".join(lines) + rest[1].decode()
        assert text.count("MCUmgr parameters unavailable") == 1, text


def test_config_errors_show_every_problem(tmp_path: Path) -> None:
    data = bare_cfg(tmp_path)
    data["max_concurent"] = 3
    data["devices"][0]["transport"]["hots"] = "x"
    data["source"]["paths"] = "/srv"
    r = run_cli("run", "--once", "-c", str(write_cfg(tmp_path / "gw.yaml", data)))
    assert r.returncode == 2, r.stderr
    no_traceback(r)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 3, r.stderr
    assert all(ln.startswith("smp-gateway: configuration error: ") for ln in lines), lines
    text = "\n".join(lines)
    assert "max_concurent" in text and "did you mean 'max_concurrent'" in text
    # suggestions from the keys valid at that level (not 'hosts'/'paths' from elsewhere)
    assert re.search(r"devices\[0\]\.transport\.hots: .*did you mean 'host'\?", text), text
    assert re.search(r"source\.paths: .*did you mean 'path'\?", text), text


def test_bumble_backend_without_the_extra_is_a_config_error(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    (shadow / "bumble").mkdir(parents=True)
    (shadow / "bumble" / "__init__.py").write_text("raise ImportError('no bumble here')\n")
    data = bare_cfg(tmp_path)
    data["devices"][0]["transport"] = {"kind": "ble", "name": "x", "backend": "bumble",
                                       "hci": "usb:0"}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(shadow), *filter(None, [os.environ.get("PYTHONPATH")])])}
    line = one_line_error(run_cli("run", "--once", "-c",
                                  str(write_cfg(tmp_path / "gw.yaml", data)), env=env))
    assert "devices[0].transport.backend" in line and "smp-gateway[ble]" in line, line


# -- 9. RDFM: ca_file on plain http ---------------------------------------------------------------
def test_ca_file_with_http_url_is_one_line(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    data = bare_cfg(tmp_path, source={"kind": "rdfm", "url": "http://rdfm.example",
                                      "ca_file": str(ca)})
    line = one_line_error(run_cli("run", "--once", "-c", str(write_cfg(tmp_path / "g.yaml", data))))
    assert "ca_file" in line and "http://" in line, line


# -- 10. nits ---------------------------------------------------------------------------------------
async def test_once_json_summary_and_options_after_the_subcommand(bench_factory: Any,
                                                                  tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    bench.publish("2.0.0")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml")
        r = await arun_cli("run", "--once", "--json", "-c", str(cfg), "-v", "--log-format", "json")
        assert r.returncode == 0, r.stderr
        no_traceback(r)
        doc = json.loads(r.stdout)
        (d,) = doc["devices"]
        assert doc["ok"] is True and d["device"] == "udp-1" and d["status"] == "updated"
        assert d["result"] == 1 and d["to_version"] == "2.0.0" and d["from_version"] == "1.0.0"
        size = bench.images["2.0.0"].stat().st_size
        assert d["image_bytes"] == size and d["wire_bytes"] >= size and d["upload_seconds"] > 0
        logs = [json.loads(ln) for ln in r.stderr.splitlines() if ln.strip()]
        assert any(rec["level"] == "debug" for rec in logs)  # -v after the subcommand
        done = [rec for rec in logs if rec.get("msg") == "upload done"]
        assert done and done[0]["device"] == "udp-1" and done[0]["image_bytes"] == size
        assert all("device=" not in rec["msg"] for rec in logs), logs  # fields are JSON keys
        # plain summary: wire and image bytes named apart
        bench.publish("1.0.0")
        r = await arun_cli("run", "-c", str(cfg), "--once")
        line = plain(r, "udp-1")
        assert "wire_bytes=" in line and "image_bytes=" in line and " bytes=" not in line


async def test_ctl_output_for_people(bench_factory: Any, tmp_path: Path) -> None:
    bench = bench_factory(udp=1, serial=0, image_size=8 * 1024)
    (bench.updates_dir / "manifest.yaml").write_text(
        "images:\n  - file: gone.bin\n    hardware: sim_board\n")
    async with Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml")
        state = bench.root / "gateway-state"
        proc = await asyncio.create_subprocess_exec(*CLI, "run", "-c", str(cfg),
                                                    stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.DEVNULL,
                                                    stderr=subprocess.PIPE)
        assert proc.stderr is not None
        try:
            while True:  # the broken release is refused and blocked
                raw = await asyncio.wait_for(proc.stderr.readline(), 60)
                assert raw, "daemon exited"
                if b"refused artifact=unusable-" in raw:
                    break
            assert (state / "control.sock").exists()
            r = await arun_cli("ctl", "-c", str(cfg), "rollout")
            assert r.returncode == 0 and r.stdout.strip().startswith("no rollout"), r.stdout
            r = await arun_cli("ctl", "-c", str(cfg), "unblock", "udp-1")
            assert r.returncode == 0, r.stderr
            assert re.match(r"udp-1: blocked: \S+", r.stdout), r.stdout
            assert "unusable-" in r.stdout, r.stdout
            r = await arun_cli("ctl", "-c", str(cfg), "audit")
            assert r.returncode == 0, r.stderr
            today = time.strftime("%Y-%m-%d")
            assert today in r.stdout and "unblock" in r.stdout and "udp-1" in r.stdout, r.stdout
            assert not r.stdout.lstrip().startswith("["), r.stdout  # a table, not raw JSON
            r = await arun_cli("ctl", "-c", str(cfg), "audit", "--json")
            assert isinstance(json.loads(r.stdout), list)
        finally:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.communicate(), 40)


# -- the terminal an operator watches: `run --once` in a real terminal (tmux) ---------------------
async def test_once_in_a_terminal_shows_progress_and_summary(bench_factory: Any,
                                                             tmp_path: Path) -> None:
    from fleet_servers.common import require_tool

    tmux = require_tool("tmux", "tmux")
    bench = bench_factory(udp=2, serial=1, image_size=24 * 1024)
    bench.publish("2.0.0")
    sock = str(tmp_path / "tmux.sock")  # a private server: this environment (PYTHONPATH) in it

    async def tmux_cmd(*args: str, limit_s: float = 60) -> str:
        p = await asyncio.create_subprocess_exec(tmux, "-S", sock, *args, stdout=subprocess.PIPE,
                                                 stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(p.communicate(), limit_s)
        assert p.returncode == 0, (args, err.decode())
        return out.decode()

    async with Simulator(bench.sim_cfg) as sim:
        cfg = sim_cfg(bench, sim, tmp_path / "gw.yaml")
        await tmux_cmd("new-session", "-d", "-x", "120", "-y", "40", "-s", "op",
                       "env -u TMUX bash --norc --noprofile")
        try:
            cmd = (f"{' '.join(CLI)} run --once -c {cfg}; echo \"exit=$?\"; "
                   f"{tmux} -S {sock} wait-for -S once-done")
            await tmux_cmd("send-keys", "-t", "op", cmd, "Enter")
            await tmux_cmd("wait-for", "once-done", limit_s=90)  # the pass ended (an event)
            screen = await tmux_cmd("capture-pane", "-p", "-t", "op", "-S", "-200")
        finally:
            await tmux_cmd("kill-server")
    assert "Traceback" not in screen, screen
    assert "exit=0" in screen, screen
    for dev in ("udp-1", "udp-2", "serial-1"):  # a progress line and a table row each
        assert screen.count(dev) >= 2, screen
    assert "updated" in screen and "1.0.0" in screen and "2.0.0" in screen, screen
    assert "KiB" in screen, screen  # the progress bars' transfer column / the table's upload
    # log lines go above the bars, never into them
    assert not any("B/s" in ln and "level=" in ln for ln in screen.splitlines()), screen
