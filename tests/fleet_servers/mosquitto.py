"""A real mosquitto broker on a free loopback port, for the MQTT jobs tests."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fleet_servers.common import require_tool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mosquitto:
    """One mosquitto that can be stopped (or killed) and started again on the same port with
    the same configuration: a broker restart. ``config``: the mosquitto.conf text (written to
    ``tmp/conf_name``); it must open a plain listener on 127.0.0.1:``port``, where ``start``
    waits until it accepts connections. By default just that: anonymous, no persistence."""

    def __init__(self, tmp: Path, port: int = 0, config: str = "",
                 conf_name: str = "mosquitto.conf") -> None:
        self.exe = require_tool("mosquitto", "mosquitto")
        self.port = port or free_port()
        self.conf = tmp / conf_name
        self.conf.write_text(config or (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
            "log_dest stderr\nlog_type error\nlog_type warning\n"))
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            self.exe, "-c", str(self.conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for _ in range(300):  # wait until it accepts connections
            if self.proc.returncode is not None:
                err = await self.proc.stderr.read() if self.proc.stderr else b""
                raise RuntimeError(f"mosquitto exited: {err.decode()}")
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                await w.wait_closed()
                return
            except OSError:
                await asyncio.sleep(0.02)
        raise RuntimeError("mosquitto did not start")

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            await self.proc.wait()

    async def kill(self) -> None:
        """SIGKILL: no clean shutdown, no persistence flush."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def restart(self) -> None:
        await self.stop()
        self.restarts += 1
        await self.start()


@asynccontextmanager
async def mosquitto(tmp: Path) -> AsyncIterator[int]:
    broker = Mosquitto(tmp)
    try:
        await broker.start()
        yield broker.port
    finally:
        await broker.stop()
