"""Helpers for the daemon tests: the simulator and the gateway as real processes, or the
daemon loop in this process (``serving``)."""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import socket
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml

from gateway.daemon import Gateway
from gateway.demo import Bench
from gateway.smp.session import SMPSession
from gateway.smp.transport import UdpTransport


@asynccontextmanager
async def serving(gw: Gateway, tolerant: bool = False) -> AsyncIterator[Gateway]:
    """``gw.run_forever`` in a task for the block; then stopped (within 30 s) and closed.
    ``tolerant``: an error (or a timeout) of the stopping daemon is not raised."""
    stop = asyncio.Event()
    task = asyncio.create_task(gw.run_forever(stop))
    try:
        yield gw
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        except Exception:
            if not tolerant:
                raise
        finally:
            gw.close()


def gateway_bin() -> list[str]:
    exe = shutil.which("smp-gateway", path=os.path.dirname(sys.executable)) or shutil.which(
        "smp-gateway")
    return [exe] if exe else [sys.executable, "-m", "gateway.cli"]


class SimProcess:
    """``python -m gateway.sim --config sim.yaml`` in its own process (survives gateway kills)."""

    def __init__(self, bench: Bench) -> None:
        self.bench = bench
        self.cfg_path = bench.root / "sim.yaml"
        self.log_path = bench.root / "sim.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.endpoints: dict[str, dict[str, Any]] = {}

    async def start(self) -> None:
        self.cfg_path.write_text(yaml.safe_dump(self.bench.sim_cfg.model_dump(mode="json"),
                                                sort_keys=False))
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.sim", "--config", str(self.cfg_path), "--log-level", "INFO",
            stdout=asyncio.subprocess.PIPE, stderr=open(self.log_path, "wb"))
        assert self.proc.stdout is not None
        while True:  # the simulator announces its endpoints file once every device is up
            line = (await asyncio.wait_for(self.proc.stdout.readline(), 60)).decode()
            assert line, f"simulator exited: {self.log_path.read_text()[-2000:]}"
            if line.startswith("endpoints: "):
                self.endpoints = json.loads(Path(line.split(": ", 1)[1].strip()).read_text())
                break

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await asyncio.wait_for(self.proc.wait(), 20)

    def events(self) -> list[tuple[str, str, dict[str, Any]]]:
        """(device, kind, detail) from the simulator's log, in order."""
        out = []
        pat = re.compile(r"\[([A-Za-z0-9_.:-]+)\] ([a-z-]+) (\{.*\})\s*$")
        for line in self.log_path.read_text().splitlines():
            m = pat.search(line)
            if m:
                out.append((m.group(1), m.group(2), ast.literal_eval(m.group(3))))
        return out


def gateway_yaml(bench: Bench, endpoints: dict[str, dict[str, Any]], path: Path,
                 **top: Any) -> Path:
    devices = []
    for dev_id, ep in endpoints.items():
        if ep["transport"] == "udp":
            transport: dict[str, Any] = {"kind": "udp", "host": ep["host"], "port": ep["port"]}
        else:
            transport = {"kind": "serial", "port": ep["address"]}
        d: dict[str, Any] = {"id": dev_id, "transport": transport, "hardware": "sim_board",
                             "slot_size": 0x40000, "health_check_s": 1.0,
                             "timeouts": {"reset_s": 20, "request_s": 2.0}}
        d.update(bench.device_overrides.get(dev_id, {}))
        devices.append(d)
    data: dict[str, Any] = {
        "gateway_id": "test-gateway",
        "state_dir": str(bench.root / "gateway-state"),
        "trusted_keys": [str(bench.key)],
        "source": {"kind": "local", "path": str(bench.updates_dir), "poll_interval_s": 2},
        "devices": devices,
        **top,
    }
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class NotifySocket:
    """A real ``$NOTIFY_SOCKET``: a unix datagram socket the test binds, as systemd does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.exists():
            path.unlink()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[str] = []

    async def recv(self, within: float) -> str:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), within)
        msg = data.decode()
        self.messages.append(msg)
        return msg

    async def wait_for(self, key: str, within: float) -> str:
        """The next datagram containing the line ``key`` (e.g. ``READY=1``)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while True:
            msg = await self.recv(max(0.01, end - loop.time()))
            if key in msg.splitlines():
                return msg

    def close(self) -> None:
        self.sock.close()


class GatewayProcess:
    def __init__(self, cfg_path: Path, log_path: Path, env: dict[str, str] | None = None,
                 notify: NotifySocket | None = None) -> None:
        self.cfg_path, self.log_path = cfg_path, log_path
        self.env = {**os.environ, **(env or {})}
        if notify is not None:
            self.env["NOTIFY_SOCKET"] = str(notify.path)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *gateway_bin(), "run", "--config", str(self.cfg_path),
                stdout=log, stderr=log, env=self.env)

    async def kill(self) -> None:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()

    async def terminate(self, within: float) -> int:
        assert self.proc is not None
        self.proc.terminate()
        return await asyncio.wait_for(self.proc.wait(), within)


def journal_rows(state_dir: Path) -> list[dict[str, Any]]:
    """The daemon's journal, read-only, as another process would (``smp-gateway status``)."""
    db = state_dir / "journal.sqlite"
    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        con.row_factory = sqlite3.Row
        return [dict(r) for r in con.execute("SELECT * FROM devices ORDER BY device_id")]
    except sqlite3.OperationalError:
        return []
    finally:
        con.close()


async def watch_journal(state_dir: Path, pred: Callable[[list[dict[str, Any]]], bool],
                        within: float, every: float = 0.02) -> list[dict[str, Any]] | None:
    """Poll the journal until ``pred(rows)``; the rows, or None after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while loop.time() < end:
        rows = journal_rows(state_dir)
        if rows and pred(rows):
            return rows
        await asyncio.sleep(every)
    return None


async def udp_image_states(host: str, port: int) -> list[Any]:
    async with SMPSession(UdpTransport(host, port), timeout_s=2.0) as s:
        return await s.image_state(retries=3)
