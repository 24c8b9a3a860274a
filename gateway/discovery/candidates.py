"""What a scan finds before anyone talks SMP to it: a *candidate* device.

Owns the one record the scanners (serial ports, UDP probes and DNS-SD, BLE advertisements) hand
to identification: how to reach the device (``transport``, a ``devices:`` transport entry
without options) and what the scan itself learnt (``attrs``: USB ids, by-id name, host, BLE
name/address...). ``key`` names the physical attachment point, so one port or address is
probed once per scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Kind = Literal["serial", "udp", "ble"]


@dataclass(frozen=True)
class Candidate:
    kind: Kind
    address: str  # serial: the path to open; udp: host:port; ble: BD_ADDR
    transport: dict[str, Any]  # e.g. {"kind": "serial", "port": "/dev/serial/by-id/..."}
    attrs: dict[str, str] = field(default_factory=dict)
    key: str = ""  # the physical attachment point (serial: the tty's real path)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", f"{self.kind}:{self.address}")
