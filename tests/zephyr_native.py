"""Real Zephyr 3.4 ``smp_svr`` host builds as SMP servers (``<shared>/zephyr-native``).

A thin driver around the kit's own scripts (``start-udp.sh``, ``start-serial.sh``,
``start-ble.sh``, ``stop.sh``; everything about them is in the kit's README): one :class:`Kit`
per transport and run directory, started with a seeded slot 0 and stopped by ``stop.sh``,
which signals only the PIDs that run directory recorded.

Where the kit is found: ``$SMPGW_SHARED/zephyr-native`` or ``<repo>/../shared/zephyr-native``
(the same folder the Renode tests use). Absent, or a transport's prerequisite missing (UDP:
root, ``/dev/net/tun``, ``ip``; BLE: an interpreter with the kit's pinned Bumble in
``$SMPGW_ZN_BLE_PY``, default ``<repo>/.venv-zn-ble/bin/python``): the test is skipped with the
reason; in CI (``CI`` set) it fails instead, never a silent skip.

What these builds are (README "Observed behaviour"): ``CONFIG_BOOTLOADER_MCUBOOT=n``, so
nothing swaps: an upload lands in slot 1, a test mark makes it ``pending``, ``os reset`` ends
the process (status 1) and ``RESTART=1`` relaunches it on the same flash file, where slot 0 is
still the old image and slot 1 still pending. The gateway can verify the upload (the device
reports the image's SHA-256 TLV), the mark and the reset; the verdict after the reset must be
that the new image is not running.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gateway import devkit
from gateway.renode import REPO_ROOT, shared_candidate

KIT_NAME = "zephyr-native"
BLE_PY_ENV = "SMPGW_ZN_BLE_PY"
SLOT_SIZE = 0x69000  # image-0 / image-1 in every build's devicetree
START = {"udp": "start-udp.sh", "serial": "start-serial.sh", "ble": "start-ble.sh"}


def _unavailable(msg: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(msg + " (CI must provide it)")
    pytest.skip(msg)


def kit_dir() -> Path:
    """The kit folder, or skip (fail in CI) naming where it was looked for."""
    shared, why = shared_candidate()
    path = shared / KIT_NAME
    if not (path / "start-udp.sh").is_file():
        _unavailable(f"real Zephyr builds not found: {path / 'start-udp.sh'} is missing ({why})")
    return path


def ble_python() -> str:
    py = os.environ.get(BLE_PY_ENV) or str(REPO_ROOT / ".venv-zn-ble" / "bin" / "python")
    if not Path(py).is_file():
        _unavailable(f"BLE kit needs Python with the kit's pinned Bumble (requirements-ble.txt): "
                     f"{py} not found; set {BLE_PY_ENV}")
    return py


def udp_possible() -> None:
    if os.geteuid() != 0 or not Path("/dev/net/tun").exists() or shutil.which("ip") is None:
        _unavailable("UDP kit needs root, /dev/net/tun and ip (iproute2): a netns + TAP")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Kit:
    """One started transport of the kit in ``run`` (its ``<transport>.env`` in ``env``)."""

    root: Path
    run: Path
    transport: str
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def start(cls, run: Path, transport: str, *, variant: str | None = None,
              slot0: Path | None = None, restart: bool = True, **extra: str) -> Kit:
        root = kit_dir()
        env = {**os.environ, "RESTART": "1" if restart else "0", "FLASH_ERASE": "1", **extra}
        if variant:
            env["VARIANT"] = variant
        if slot0 is not None:
            env["SLOT0_IMAGE"] = str(slot0)
        if transport == "udp":
            udp_possible()
            # a loopback address and namespace of its own: kits of parallel runs never meet
            env.setdefault("UDP_HOST", f"127.{uuid.uuid4().int % 200 + 20}."
                                       f"{uuid.uuid4().int % 250 + 1}.{uuid.uuid4().int % 250 + 1}")
        if transport == "ble":
            env["PY"] = ble_python()
            for k in ("BLE_ZEPHYR_PORT", "BLE_GATEWAY_PORT", "BLE_TOOLS_PORT"):
                env.setdefault(k, str(free_port()))
        run.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run(["bash", str(root / START[transport]), str(run)], env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=90)
        kit = cls(root, run, transport)
        if proc.returncode != 0:
            kit.stop()
            raise RuntimeError(f"{START[transport]} failed ({proc.returncode}):\n"
                               f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        kit.env = kit.read_env()
        return kit

    def read_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for line in (self.run / f"{self.transport}.env").read_text().splitlines():
            k, sep, v = line.partition("=")
            if sep:
                out[k.strip()] = v.strip().strip("'\"")
        return out

    def stop(self) -> None:
        subprocess.run(["bash", str(self.root / "stop.sh"), str(self.run)],
                       stdin=subprocess.DEVNULL, capture_output=True, timeout=60, check=False)

    def pid(self, name: str) -> int:
        """A PID the run directory recorded: ``zephyr-udp``, ``ble_link``..."""
        return int((self.run / f"{name}.pid").read_text().split()[0])

    def zephyr_pid(self) -> int:
        return self.pid(f"zephyr-{self.transport}")

    def kill_zephyr(self) -> None:
        """The device dies (the wrapper relaunches it on the same flash file)."""
        os.kill(self.zephyr_pid(), signal.SIGKILL)

    def drop_ble_links(self) -> None:
        """ble_link.py drops every LE link at once (both ends reason 0x08, devices keep running)."""
        os.kill(self.pid("ble_link"), signal.SIGUSR1)

    def log(self) -> str:
        return (self.run / f"zephyr-{self.transport}.log").read_text(errors="replace")

    def launches(self) -> int:
        """zephyr.exe processes started so far (each launch is logged)."""
        return self.log().count(" launching ")

    # gateway transport settings for this kit
    def transport_config(self) -> dict[str, object]:
        if self.transport == "udp":
            return {"kind": "udp", "host": self.env["ZN_UDP_HOST"], "port": int(self.env["ZN_UDP_PORT"])}
        if self.transport == "serial":
            # the symlink follows the PTY across relaunches
            return {"kind": "serial", "port": self.env["ZN_SERIAL_LINK"], "shell": True}
        return {"kind": "ble", "address": self.env["ZN_BLE_ADDR"], "backend": "bumble",
                "hci": self.env["ZN_BLE_GATEWAY_HCI"], "scan_timeout_s": 20.0}


@dataclass
class Images:
    key: Path
    v1: Path
    v2: Path


def make_images(root: Path, size: int = 48 * 1024) -> Images:
    """A key and two images signed as the kit's README says (header 0x200, slot 0x69000)."""
    root.mkdir(parents=True, exist_ok=True)
    key = devkit.make_key(root / "key.pem")
    v1 = devkit.sign_image(root / "app-1.0.0.bin", version="1.0.0", key=key, size=size,
                           slot_size=SLOT_SIZE)
    v2 = devkit.sign_image(root / "app-2.0.0.bin", version="2.0.0", key=key, size=size + 1024,
                           slot_size=SLOT_SIZE)
    return Images(key, Path(v1), Path(v2))
