"""Hosting many simulated devices in one asyncio process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from gateway.sim.config import SimConfig
from gateway.sim.device import SimDevice

ENDPOINTS_FILE = "endpoints.json"


class Simulator:
    """``async with Simulator(cfg) as sim: sim.devices["id"] ...``"""

    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.devices: dict[str, SimDevice] = {}
        self._wrote_endpoints = False

    async def start(self) -> None:
        self.cfg.state_dir.mkdir(parents=True, exist_ok=True)
        try:
            for dcfg in self.cfg.devices:
                dev = SimDevice(dcfg, self.cfg.state_dir)
                self.devices[dcfg.id] = dev
                try:
                    await dev.start()
                except OSError as exc:  # name the device and its address (e.g. a port in use)
                    where = (f" udp {dcfg.udp.host}:{dcfg.udp.port}" if dcfg.udp is not None
                             else "")
                    raise OSError(exc.errno, f"device {dcfg.id}{where}: "
                                  f"{exc.strerror or exc}") from exc
        except BaseException:
            await self.stop()
            raise
        self.write_endpoints()

    async def stop(self) -> None:
        for dev in self.devices.values():
            await dev.stop()
        with_file = self.cfg.state_dir / ENDPOINTS_FILE
        # only the file this simulator wrote: one that failed to start (its ports in use by
        # another simulator) must not delete the running one's endpoints
        if self._wrote_endpoints and with_file.exists():
            with_file.unlink()
            self._wrote_endpoints = False

    def endpoints(self) -> dict[str, dict[str, Any]]:
        return {i: d.endpoint() for i, d in self.devices.items()}

    def write_endpoints(self) -> Path:
        """``state_dir/endpoints.json``: device id -> {transport, address, ...} (atomic)."""
        path = self.cfg.state_dir / ENDPOINTS_FILE
        tmp = path.with_suffix(".json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.endpoints(), f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        self._wrote_endpoints = True
        return path

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def run_simulator(
    cfg: SimConfig,
    stop: asyncio.Event | None = None,
    announce: Callable[[str], None] | None = print,
) -> None:
    """Run the devices until ``stop`` is set (or forever), announcing each address."""
    stop = stop or asyncio.Event()
    async with Simulator(cfg) as sim:
        if announce is not None:
            for dev in sim.devices.values():
                announce(f"{dev.id} {dev.transport.kind} {dev.address}")
            announce(f"endpoints: {cfg.state_dir / ENDPOINTS_FILE}")
        await stop.wait()


async def run_until_signalled(cfg: SimConfig) -> None:
    """``run_simulator`` until SIGINT/SIGTERM, announcing addresses on stdout (the CLI entry)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await run_simulator(cfg, stop, announce=lambda s: print(s, flush=True))
