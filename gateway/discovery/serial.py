"""Serial discovery: which serial ports exist, what USB says about them, and hot-plug.

Owns turning ``discovery.serial.paths`` (globs; symlinks such as ``/dev/serial/by-id/*`` are
followed) into candidates, one per tty (by real path), each with the USB attributes of the
port: vendor/product id, serial number, manufacturer/product, the by-id name. Attributes come
from udev (``pyudev``: ``ID_VENDOR_ID``, ``ID_MODEL_ID``, ``ID_SERIAL_SHORT``) where it is
installed, else from sysfs through pyserial's ``list_ports_linux.SysFS`` (the same reader
``serial.tools.list_ports`` uses). pyserial's ``comports()`` is not used to *find* ports: it
lists only ttys with a driver in sysfs, so pseudo-terminals and symlink farms would be missed.

The transport path given to a device is the most stable name of its tty: the by-id link when
one points to it, else the path the glob found. A device is *identified* by what it reports
(USB serial number, node name...), never by its tty name, so a board re-enumerated as
``ttyACM1`` is the same device.

Hot-plug: a ``pyudev.Monitor`` on the ``tty`` subsystem where udev events are available
(``hotplug: auto|udev``), plus a cheap poll of the globs every ``poll_s`` (the only mechanism
for PTYs and with ``hotplug: poll``). Either signals ``changed``; the discovery service then
rescans.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gateway.config import SerialDiscovery
from gateway.discovery.candidates import Candidate

log = logging.getLogger(__name__)

BY_ID_DIR = Path("/dev/serial/by-id")


def _udev_attrs(real: str) -> dict[str, str] | None:
    try:
        import pyudev
    except ImportError:
        return None
    try:
        dev = pyudev.Devices.from_device_file(pyudev.Context(), real)
    except Exception:
        return None
    props = dict(dev.properties)
    out = {"usb_vid": props.get("ID_VENDOR_ID", ""), "usb_pid": props.get("ID_MODEL_ID", ""),
           "usb_serial": props.get("ID_SERIAL_SHORT", ""),
           "usb_manufacturer": props.get("ID_VENDOR", ""), "usb_product": props.get("ID_MODEL", ""),
           "usb_interface": props.get("ID_USB_INTERFACE_NUM", "")}
    return {k: v for k, v in out.items() if v}


def _sysfs_attrs(real: str) -> dict[str, str]:
    try:
        from serial.tools.list_ports_linux import SysFS
    except ImportError:  # pragma: no cover - pyserial is a dependency
        return {}
    try:
        info = SysFS(real)
    except Exception:
        return {}
    out = {"usb_vid": f"{info.vid:04x}" if info.vid is not None else "",
           "usb_pid": f"{info.pid:04x}" if info.pid is not None else "",
           "usb_serial": info.serial_number or "", "usb_manufacturer": info.manufacturer or "",
           "usb_product": info.product or "", "usb_location": info.location or ""}
    return {k: v for k, v in out.items() if v}


def usb_attrs(real: str) -> dict[str, str]:
    """USB attributes of a tty (empty for PTYs and on-board UARTs)."""
    got = _udev_attrs(real)
    return got if got else _sysfs_attrs(real)


def _by_id_links() -> dict[str, str]:
    """real tty path -> its /dev/serial/by-id link."""
    out: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for p in BY_ID_DIR.iterdir():
            with contextlib.suppress(OSError):
                out[os.path.realpath(p)] = str(p)
    return out


def stamp(real: str) -> tuple[int, int, int] | None:
    """Changes when the tty is a new one at the same path (a re-created PTY, a replug)."""
    try:
        st = os.stat(real)
    except OSError:
        return None
    return (st.st_rdev, st.st_ino, st.st_ctime_ns)


def snapshot(paths: list[str]) -> dict[str, str]:
    """glob match -> real path, for every path that exists now."""
    out: dict[str, str] = {}
    for pattern in paths:
        for p in sorted(glob.glob(pattern)):
            real = os.path.realpath(p)
            if os.path.exists(real) and not os.path.isdir(real):
                out[p] = real
    return out


def scan(cfg: SerialDiscovery) -> list[Candidate]:
    """One candidate per tty matched by the globs."""
    snap = snapshot(cfg.paths)
    by_id = _by_id_links()
    by_real: dict[str, list[str]] = {}
    for p, real in snap.items():
        by_real.setdefault(real, []).append(p)
    out = []
    for real, found in sorted(by_real.items()):
        link = by_id.get(real) or next((p for p in found if p.startswith(str(BY_ID_DIR) + "/")), None)
        address = link or found[0]
        attrs: dict[str, str] = {"path": address, "tty": real, "port": os.path.basename(address)}
        if link:
            attrs["by_id"] = os.path.basename(link)
        attrs.update(usb_attrs(real))
        out.append(Candidate("serial", address, {"kind": "serial", "port": address}, attrs,
                             key=f"serial:{real}"))
    return out


class SerialWatcher:
    """Signals ``changed`` when the set of serial ports may have changed."""

    def __init__(self, cfg: SerialDiscovery, on_change: Callable[[str], None]) -> None:
        self.cfg = cfg
        self.on_change = on_change
        self._monitor: Any = None
        self.mode = "poll"

    def _start_udev(self) -> bool:
        try:
            import pyudev
        except ImportError:
            if self.cfg.hotplug == "udev":
                raise RuntimeError("discovery.serial.hotplug: udev needs the pyudev package "
                                   "(pip install pyudev)") from None
            return False
        try:
            mon = pyudev.Monitor.from_netlink(pyudev.Context())
            mon.filter_by("tty")
            mon.start()
        except Exception as exc:
            if self.cfg.hotplug == "udev":
                raise RuntimeError(f"discovery.serial.hotplug: udev events unavailable: {exc}") from exc
            log.info("udev events unavailable (%s): polling serial ports every %gs", exc,
                     self.cfg.poll_s)
            return False
        self._monitor = mon

        def readable() -> None:
            while True:
                try:
                    ev = mon.poll(timeout=0)
                except Exception:
                    return
                if ev is None:
                    return
                log.debug("udev %s %s", ev.action, ev.device_node)
                self.on_change(f"udev {ev.action} {ev.device_node}")

        asyncio.get_running_loop().add_reader(mon.fileno(), readable)
        self.mode = "udev+poll"
        return True

    async def run(self) -> None:
        if self.cfg.hotplug in ("auto", "udev"):
            self._start_udev()
        last = {p: stamp(r) for p, r in snapshot(self.cfg.paths).items()}
        try:
            while True:
                await asyncio.sleep(self.cfg.poll_s)
                now = {p: stamp(r) for p, r in snapshot(self.cfg.paths).items()}
                if now != last:
                    gone = sorted(set(last) - set(now))
                    new = sorted(set(now) - set(last))
                    self.on_change(f"ports changed: +{new} -{gone}")
                    last = now
        finally:
            if self._monitor is not None:
                with contextlib.suppress(Exception):
                    asyncio.get_running_loop().remove_reader(self._monitor.fileno())
                self._monitor = None
