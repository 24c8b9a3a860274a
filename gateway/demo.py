"""A self-contained bench: signing key, signed v1/v2 images, simulated devices, gateway config.

Owns ``smp-gateway demo`` and the same bench for tests and benchmarks: everything is made
with the real tools (imgtool keys and images, the device simulator on real UDP sockets and
PTYs), written as ordinary YAML files a user can open, edit and re-run by hand.

``demo --workdir D`` keeps them in D and fits them together: ``sim.yaml`` names fixed UDP
ports and stable PTY links (``D/serial-N.pty``) and ``gateway.yaml`` those same addresses, so
``smp-gateway sim -c D/sim.yaml`` and ``smp-gateway run -c D/gateway.yaml --once`` work by
hand. Run again in D, the demo starts fresh consistently: it keeps D's signing key (and signs
the images with it again), and starts the devices' flash and the gateway's state anew - the
devices boot v1.0.0 signed by that key. It only ever clears a directory it made (marked with
``.smp-gateway-demo``). What it prints about the devices is what they report, and success
only when every device reports 2.0.0 confirmed. A temporary directory (no ``--workdir``,
no ``--keep``) is removed also on Ctrl-C / SIGTERM: the private key never stays behind.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from gateway import devkit
from gateway.config import GatewayConfig, parse_config
from gateway.sim.config import SimConfig, SimDeviceConfig
from gateway.sim.simulator import Simulator
from gateway.ui import run_once_shown

HARDWARE = "sim_board"


@dataclass
class Bench:
    root: Path
    key: Path
    images: dict[str, Path]
    updates_dir: Path
    sim_cfg: SimConfig
    device_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def publish(self, version: str, hardware: str = HARDWARE, **entry: Any) -> None:
        """Put ``version`` into the local update directory's manifest (replacing the list)."""
        img = self.images[version]
        dest = self.updates_dir / img.name
        if not dest.exists():
            shutil.copy(img, dest)
        manifest = {"images": [{"file": img.name, "hardware": hardware, **entry}]}
        (self.updates_dir / "manifest.yaml").write_text(yaml.safe_dump(manifest))

    def gateway_dict(self, sim: Simulator, **device_kw: Any) -> dict[str, Any]:
        devices = []
        for dev_id, dev in sim.devices.items():
            ep = dev.endpoint()
            if ep["transport"] == "udp":
                transport: dict[str, Any] = {"kind": "udp", "host": ep["host"], "port": ep["port"]}
            elif ep["transport"] == "ble":
                transport = {"kind": "ble", "name": ep["name"], "backend": "bumble",
                             "hci": ep["hci"]}
            else:
                transport = {"kind": "serial", "port": ep["address"]}
                if ep.get("baud"):
                    transport["baud"] = ep["baud"]
            d: dict[str, Any] = {"id": dev_id, "transport": transport, "hardware": dev.cfg.hardware,
                                 "slot_size": dev.cfg.slot_size, "health_check_s": 1.0,
                                 "timeouts": {"reset_s": 20, "request_s": 2.0}}
            d.update(device_kw)
            d.update(self.device_overrides.get(dev_id, {}))
            devices.append(d)
        return {
            "gateway_id": "demo-gateway",
            "state_dir": str(self.root / "gateway-state"),
            "trusted_keys": [str(self.key)],
            "source": {"kind": "local", "path": str(self.updates_dir), "poll_interval_s": 2},
            "devices": devices,
        }

    def gateway_config(self, sim: Simulator, **device_kw: Any) -> GatewayConfig:
        data = self.gateway_dict(sim, **device_kw)
        path = self.root / "gateway.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return parse_config(data, path)


def make_bench(
    root: Path,
    *,
    udp: int = 2,
    serial: int = 1,
    versions: tuple[str, ...] = ("1.0.0", "2.0.0"),
    image_size: int = 96 * 1024,
    slot_size: int = 0x40000,
    key_type: str = "ecdsa-p256",
    device_kw: dict[str, Any] | None = None,
    realistic_links: bool = False,
    reuse_key: bool = False,
    fixed_endpoints: bool = False,
) -> Bench:
    """Key + signed images (imgtool) + a simulator config of ``udp`` + ``serial`` devices on v1.

    ``reuse_key``: keep ``root/keys/signing.pem`` when it exists. ``fixed_endpoints``: free UDP
    ports chosen now and PTY links ``root/serial-N.pty`` in ``sim.yaml`` (instead of ephemeral
    ports), so the files can be used by hand."""
    root.mkdir(parents=True, exist_ok=True)
    key_path = root / "keys" / "signing.pem"
    key = key_path if reuse_key and key_path.is_file() else devkit.make_key(key_path, key_type)
    images = {
        v: devkit.sign_image(root / "images" / f"app-{v}.bin", version=v, key=key,
                             size=image_size + i * 1024, slot_size=slot_size)
        for i, v in enumerate(versions)
    }
    updates = root / "updates"
    updates.mkdir(exist_ok=True)
    devs = []
    for i in range(udp + serial):
        kind = "udp" if i < udp else "serial"
        d: dict[str, Any] = {
            "id": f"{kind}-{i + 1 if kind == 'udp' else i - udp + 1}",
            "key": str(key), "initial_image": str(images[versions[0]]), "slot_size": slot_size,
            "hardware": HARDWARE, "boot_time_s": 0.3,
            # a fast, fully featured smp_svr build (the simulator's defaults model the stock
            # sample and real flash timings; see gateway/sim/presets.py for those)
            "mcumgr_params_supported": True, "bootloader_info_supported": True,
            "os_info_supported": True, "image_check": True, "buf_size": 2475,
            "request_processing_s": 0.0, "flash_write_bps": None, "flash_erase_sector_s": 0.0,
            "flash_stalls_cpu": False, "swap_time_s": 0.0,
        }
        d[kind] = {"host": "127.0.0.1", "port": 0} if kind == "udp" else {}
        if fixed_endpoints:
            if kind == "udp":
                d[kind]["port"] = _free_udp_port()
            else:
                d[kind]["link"] = str(root / f"{d['id']}.pty")
        if realistic_links:  # what a person watching the demo would meet on real hardware
            if kind == "udp":
                d["link"] = {"latency_s": 0.01, "bandwidth_bps": 250_000}
            else:
                d["serial"] = {**d["serial"], "baud": 115200}
        d.update(device_kw or {})
        devs.append(SimDeviceConfig.model_validate(d))
    sim_cfg = SimConfig(state_dir=root / "sim-state", devices=devs)
    (root / "sim.yaml").write_text(yaml.safe_dump(sim_cfg.model_dump(mode="json"), sort_keys=False))
    return Bench(root, key, images, updates, sim_cfg)


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


MARKER = ".smp-gateway-demo"
STATE = ("sim-state", "gateway-state", "updates")  # what a fresh run starts anew


class DemoError(Exception):
    """A workdir the demo must not use (exit 2)."""


def prepare_workdir(root: Path) -> None:
    """A workdir made by an earlier demo is started fresh (its devices' flash, the gateway's
    state and update directory; the key stays); any other non-empty directory is refused."""
    if root.exists() and not root.is_dir():
        raise DemoError(f"--workdir {root}: not a directory")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
        raise DemoError(f"--workdir {root} is not empty and was not made by smp-gateway demo: "
                        "give a new or empty directory")
    root.mkdir(parents=True, exist_ok=True)
    for name in STATE:
        shutil.rmtree(root / name, ignore_errors=True)
    (root / MARKER).write_text("made by smp-gateway demo; a re-run starts sim-state, "
                               "gateway-state and updates anew\n")


def running(dev: Any) -> str:
    """What the device itself reports running (never assumed)."""
    if dev.state != "running":
        return f"not running ({dev.state}: {dev.boot_outcomes[-1] if dev.boot_outcomes else '?'})"
    active = next((s for s in dev.server.state_images() if s.active), None)
    return f"running {active.version}" if active is not None else "no active image"


async def run_demo(workdir: Path | None = None, keep: bool = False) -> int:
    temp = workdir is None
    root = workdir or Path(tempfile.mkdtemp(prefix="smp-gateway-demo-"))
    console = Console(stderr=True, soft_wrap=True)  # a long PTY path stays on its line
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    stopped_by: list[signal.Signals] = []

    def on_signal(sig: signal.Signals) -> None:
        stopped_by.append(sig)
        if task is not None:
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    ok = False
    try:
        if not temp:
            prepare_workdir(root)
        console.print(f"[bold]smp-gateway demo[/bold] in {root}")
        console.print("making a signing key and signed images v1.0.0 / v2.0.0 with imgtool ...")
        bench = make_bench(root, realistic_links=True, reuse_key=True, fixed_endpoints=not temp)
        bench.publish("2.0.0")
        console.print("links: UDP with 10 ms latency each way at 250 kB/s; the serial device at "
                      "115200 baud")
        async with Simulator(bench.sim_cfg) as sim:
            ok = True
            for dev in sim.devices.values():
                now = running(dev)
                ok = ok and now == "running 1.0.0"
                console.print(f"  simulated device {dev.id:<9} {dev.endpoint()['transport']:<6} "
                              f"{dev.address}  {now}")
            if not ok:
                console.print("[red]demo failed: a simulated device does not run 1.0.0[/red]")
                return 1
            cfg = bench.gateway_config(sim)
            console.print(f"gateway config: {cfg.config_path}; update source: {bench.updates_dir}")
            if not temp:
                console.print(f"by hand: smp-gateway sim -c {root / 'sim.yaml'}  and  "
                              f"smp-gateway run -c {cfg.config_path} --once")
            result = await run_once_shown(cfg, console, "demo: one pass in {seconds:.1f}s")
            # what the devices themselves say: every one must run 2.0.0, confirmed
            ok = result.ok
            for dev in sim.devices.values():
                st = dev.server.state_images() if dev.state == "running" else []
                active = next((s for s in st if s.active), None)
                good = active is not None and active.version == "2.0.0" and bool(active.confirmed)
                ok = ok and good
                console.print(f"  {dev.id:<9} device reports active={active.version if active else None} "
                              f"confirmed={bool(active and active.confirmed)}")
    except (asyncio.CancelledError, Exception):
        if not stopped_by:
            raise
        # Ctrl-C / SIGTERM (an imgtool run it interrupted fails instead of being cancelled)
        print(f"smp-gateway: demo stopped ({stopped_by[0].name})", file=sys.stderr)
        return 128 + int(stopped_by[0])
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        if temp and not keep:  # also on Ctrl-C / SIGTERM: no private key left in /tmp
            shutil.rmtree(root, ignore_errors=True)
    console.print("[green]all devices updated and confirmed[/green]" if ok
                  else "[red]demo failed[/red]")
    return 0 if ok else 1


def main_demo(workdir: str | None, keep: bool) -> int:
    try:
        return asyncio.run(run_demo(Path(workdir).resolve() if workdir else None, keep))
    except DemoError as exc:
        print(f"smp-gateway: demo: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # an unwritable workdir, a port taken meanwhile
        print(f"smp-gateway: demo: {exc}", file=sys.stderr)
        return 2
