"""The contract between a simulated device and its transport endpoints (UDP, PTY, BLE).

Owns the two protocols that keep ``device.py`` and the transport modules (``ble.py``)
independent: a transport module types the device it serves as :class:`DeviceSide` and never
imports ``device.py``; the device holds its transport as an :class:`Endpoint`.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, Protocol

from gateway.sim.link import Pipe


class DeviceSide(Protocol):
    """What a transport endpoint uses of its device."""

    id: str
    counters: Counter[str]
    req_pipe: Pipe
    rsp_pipe: Pipe

    @property
    def log(self) -> logging.LoggerAdapter[logging.Logger]: ...

    def frame_arrived(self, frame: bytes, reply: Callable[[bytes], None], *,
                      limit_in_flight: bool, netbuf_overhead: int = 0, reserved: int = 0) -> None: ...

    def send_response(self, rsp: bytes, deliver: Callable[[bytes], None]) -> None: ...


class Endpoint(Protocol):
    """What a device uses of its transport endpoint."""

    kind: str

    @property
    def address(self) -> str: ...

    def describe(self) -> dict[str, Any]: ...

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def link_up(self) -> None: ...

    async def link_down(self) -> None: ...

    def smp_idle(self) -> None: ...
