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


@asynccontextmanager
async def mosquitto(tmp: Path) -> AsyncIterator[int]:
    exe = require_tool("mosquitto", "mosquitto")
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "log_dest stderr\nlog_type error\nlog_type warning\n"
    )
    proc = await asyncio.create_subprocess_exec(
        exe, "-c", str(conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        for _ in range(200):  # wait until it accepts connections
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise RuntimeError(f"mosquitto exited: {err.decode()}")
            try:
                _r, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                await w.wait_closed()
                break
            except OSError:
                await asyncio.sleep(0.02)
        yield port
    finally:
        if proc.returncode is None:
            proc.terminate()
            await proc.wait()
