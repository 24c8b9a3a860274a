"""Command line: ``smp-gateway run|status|sim|demo``.

Owns argument parsing, exit codes (0 every device on its target - or, for the daemon, a clean
stop; 1 something failed, or a device's supervisor died so the daemon stopped; 2 configuration
or usage error) and choosing between terminal UI and plain logs.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import functools
import importlib.metadata
import json
import logging
import os
import signal
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from smp.image_management import ImageState

from gateway import cli_tools, inventory
from gateway import log as glog
from gateway.config import ConfigError, DeviceConfig, GatewayConfig, load_config
from gateway.control import ControlError, request
from gateway.ctl import main_ctl
from gateway.daemon import Gateway, SupervisorDied, make_transport
from gateway.demo import main_demo
from gateway.journal import Journal
from gateway.opstate import OpState, retry_label, source_label
from gateway.probe import main_probe, target
from gateway.sim.config import check_files, load_sim_config
from gateway.sim.simulator import run_until_signalled
from gateway.smp.session import SMPSession
from gateway.ui import run_once_shown

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _version() -> str:
    try:
        return importlib.metadata.version("smp-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smp-gateway", description=(
        "Keep MCUboot/Zephyr devices up to date over MCUmgr SMP (UDP, serial, BLE)."))
    p.add_argument("--version", action="version", version=f"smp-gateway {_version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--trace-ble", action="store_true",
                   help="also Bumble's per-packet debug log (HCI/ATT; slows the link)")
    p.add_argument("--log-format", choices=["text", "json"], help="log format (default: config)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="poll the update source and update devices")
    r.add_argument("--config", "-c", required=True, type=Path)
    r.add_argument("--once", action="store_true",
                   help="one pass; exit 0 if every device ended on its target, 1 otherwise")
    r.add_argument("--json", action="store_true",
                   help="--once: the summary (with --dry-run: the plan) as JSON on stdout")
    s = sub.add_parser("status", help="show each device's slots and the journal")
    s.add_argument("--config", "-c", required=True, type=Path)
    s.add_argument("--offline", action="store_true", help="journal only; do not contact devices")
    s.add_argument("--json", action="store_true", help="the inventory of every device, as JSON")
    pr = sub.add_parser("probe", help="read one device (never writes) and print its config stanza")
    where = pr.add_mutually_exclusive_group(required=True)
    where.add_argument("--serial", metavar="PATH", help="serial port, e.g. /dev/ttyACM0")
    where.add_argument("--udp", metavar="HOST[:PORT]", help="SMP UDP server (port 1337 by default)")
    where.add_argument("--ble", metavar="NAME|ADDR", help="advertised name or BD_ADDR")
    pr.add_argument("--baud", type=int, default=115200)
    pr.add_argument("--adapter", help="BLE adapter (bleak: the BlueZ adapter, default hci0; "
                    "bumble: a label, default the --hci transport)")
    pr.add_argument("--backend", choices=["bleak", "bumble"], default="bleak")
    pr.add_argument("--hci", help="bumble HCI transport")
    pr.add_argument("--timeout", type=float, default=3.0, help="per SMP request, seconds")
    pr.add_argument("--hwid-format", help="os info format letter(s) answering a hardware id")
    pr.add_argument("--json", action="store_true")
    c = sub.add_parser("ctl", help="operator control of a running daemon (local socket)")
    c.add_argument("--config", "-c", required=True, type=Path)
    c.add_argument("action", choices=["list", "update", "pause", "resume", "cancel", "unblock",
                                      "rescan", "rollout", "rollout-resume", "audit"])
    c.add_argument("target", nargs="?", help="device id (pause/resume: or --all); rollout-resume: "
                   "the artifact")
    c.add_argument("--all", action="store_true", help="pause/resume: every device")
    c.add_argument("--reason", help="pause: why (journaled)")
    c.add_argument("--ignore-window", action="store_true",
                   help="update: also outside the maintenance window")
    c.add_argument("--json", action="store_true")
    m = sub.add_parser("sim", help="run simulated devices (Zephyr smp_svr + MCUboot)")
    m.add_argument("--config", "-c", required=True, type=Path)
    d = sub.add_parser("demo", help="simulated devices + signed images + one --once pass")
    d.add_argument("--workdir", help="keep the demo's files here (default: a temporary dir)")
    d.add_argument("--keep", action="store_true", help="do not delete the temporary directory")
    cli_tools.register(sub)  # device, check-config, verify, history, run --dry-run
    for sp in sub.choices.values():  # also after the subcommand: `smp-gateway run -c X -v`
        sp.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
        sp.add_argument("--log-format", choices=["text", "json"], default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
        sp.add_argument("--trace-ble", action="store_true", default=argparse.SUPPRESS,
                        help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    level = logging.DEBUG if args.verbose else logging.INFO
    setup = functools.partial(glog.setup, trace_ble=args.trace_ble)  # Bumble's log: opt-in
    try:
        if args.cmd == "demo":
            setup(args.log_format or "text", logging.WARNING if sys.stderr.isatty() else level)

            return main_demo(args.workdir, args.keep)
        if args.cmd == "probe":
            setup(args.log_format or "text", level)

            return main_probe(target(args.serial, args.udp, args.ble, baud=args.baud,
                                     adapter=args.adapter, backend=args.backend, hci=args.hci),
                              timeout_s=args.timeout, hwid_format=args.hwid_format,
                              as_json=args.json)
        if args.cmd == "sim":
            setup(args.log_format or "text", level)
            return _sim(args.config)
        if cli_tools.handles(args):  # the operator's tools (gateway/cli_tools.py)
            setup(args.log_format or "text", level if args.verbose else logging.WARNING)
            return cli_tools.main(args)
        cfg = load_config(args.config)
        setup(args.log_format or cfg.log_format, level)
        if args.cmd == "run":
            if args.json and not args.once:
                print("smp-gateway: run --json needs --once (the daemon logs; see --log-format)",
                      file=sys.stderr)
                return EXIT_USAGE
            return asyncio.run(_run(cfg, args.once, args.json))
        if args.cmd == "status":
            return _status_of(cfg, args.offline, args.json)
        if args.cmd == "ctl":
            return main_ctl(cfg, args)
    except ConfigError as exc:
        for line in exc.lines():  # every problem, one line each
            print(f"smp-gateway: configuration error: {line}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _sim(path: Path) -> int:

    try:
        cfg = load_sim_config(path)
        check_files(cfg)
    except ValidationError as exc:
        for e in exc.errors():  # one line each, with the key path
            loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
            msg = str(e["msg"]).removeprefix("Value error, ")
            print(f"smp-gateway: simulator configuration error in {path}: {loc}: {msg}",
                  file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, yaml.YAMLError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        print(f"smp-gateway: simulator configuration error in {path}: {why}", file=sys.stderr)
        return EXIT_USAGE
    try:
        asyncio.run(run_until_signalled(cfg))
    except OSError as exc:  # e.g. its ports are in use (another simulator runs this config)
        hint = (" (another simulator or program uses it: stop it or change the ports)"
                if exc.errno == errno.EADDRINUSE else "")
        print(f"smp-gateway: simulator cannot start ({path}): {exc.strerror or exc}{hint}",
              file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # e.g. a key file that is not a key (the simulator did not start)
        print(f"smp-gateway: simulator cannot start ({path}): {exc}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def _state_dir_problem(state_dir: Path) -> str | None:
    """Why ``state_dir`` cannot be used, without creating anything (None: it can be)."""
    p = state_dir
    if p.exists():
        if not p.is_dir():
            return f"{p} is not a directory"
        if not os.access(p, os.R_OK | os.X_OK):
            return f"{p}: permission denied"
        return None
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{p} cannot be created: {parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK) or str(p.resolve()).startswith(("/proc/", "/sys/")):
        return f"{p} cannot be created: {parent} is not writable"
    return None


def _status_of(cfg: GatewayConfig, offline: bool, as_json: bool) -> int:
    """``status``: read-only towards the state directory - an unusable one is one line (exit
    2), a missing one is not created (nothing is journaled yet: the devices are shown bare)."""
    where = cfg.config_path or "<config>"
    problem = _state_dir_problem(cfg.state_dir)
    if problem is not None:
        raise ConfigError(where, "state_dir", f"{problem}; give a directory the gateway user "
                          "can create and write")
    try:
        if not cfg.state_dir.exists():
            with tempfile.TemporaryDirectory(prefix="smp-gateway-status-") as empty:
                return asyncio.run(_status(cfg.model_copy(update={"state_dir": Path(empty)}),
                                           offline, as_json))
        return asyncio.run(_status(cfg, offline, as_json))
    except (OSError, sqlite3.Error) as exc:
        raise ConfigError(where, "state_dir", f"{cfg.state_dir}: cannot read the journal: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None


async def _run(cfg: GatewayConfig, once: bool, as_json: bool = False) -> int:

    if once:
        result = await run_once_shown(cfg, as_json=as_json)
        return EXIT_OK if result.ok else EXIT_FAILED
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if stop.is_set():
            return
        logging.getLogger("gateway").info("signal=%s stopping timeout=%gs", sig.name,
                                          cfg.stop_timeout_s)
        stop.set()
        # last resort if shutdown wedges: leave before systemd's SIGKILL (the journal is
        # already durable: every step was committed before it ran)
        t = threading.Timer(cfg.stop_timeout_s, os._exit, args=(EXIT_FAILED,))
        t.daemon = True
        t.start()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    gw = Gateway(cfg)
    try:
        await gw.run_forever(stop)
    except SupervisorDied as exc:  # logged with its traceback by run_forever
        print(f"smp-gateway: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        gw.close()
    return EXIT_OK


async def _daemon_status(cfg: GatewayConfig) -> dict[str, dict[str, Any]] | None:
    """The running daemon's view of every device (``status`` on its control socket), or None
    when no daemon answers there. A daemon holds its devices' links (a serial port is locked
    by it, a device it is resetting does not answer): asking the devices beside it would show
    "in use" and "unreachable" for devices that are fine."""
    if not cfg.control.enabled or not cfg.control_socket.exists():
        return None
    try:
        got = await request(cfg.control_socket, {"cmd": "status"}, timeout_s=10.0)
    except ControlError as exc:
        logging.getLogger("gateway").debug("no daemon on %s: %s", cfg.control_socket, exc)
        return None
    except (OSError, ValueError) as exc:  # a broken answer: read the devices instead
        logging.getLogger("gateway").debug("control socket %s: %s", cfg.control_socket, exc)
        return None
    if not isinstance(got, dict):  # the socket's other end is outside input: typed here
        return None
    return {k: v for k, v in got.items() if isinstance(k, str) and isinstance(v, dict)}


def _daemon_slots(d: dict[str, Any]) -> list[dict[str, Any]]:
    """The slot records of a daemon's device view that have the expected shape (others: left
    out, never a traceback)."""
    slots = d.get("slots")
    return [s for s in slots if isinstance(s, dict)] if isinstance(slots, list) else []


def _flags_of(s: dict[str, Any]) -> list[str]:
    f = s.get("flags")
    return [x for x in f if isinstance(x, str)] if isinstance(f, list) else []


async def _status(cfg: GatewayConfig, offline: bool, as_json: bool = False) -> int:
    """Every device: both slots, its target, the journal's step and progress (``--json``: the
    inventory records the fleet servers get, ``gateway.inventory``). With a daemon running
    (its control socket answers) the slots and sessions are the daemon's; the devices are read
    live only when no daemon runs."""


    def flags(st: ImageState) -> str:
        return ",".join(f for f in ("active", "confirmed", "pending", "permanent") if getattr(st, f))

    live: dict[str, list[ImageState] | Exception] = {}
    sem = asyncio.Semaphore(32)

    async def query(dev: DeviceConfig) -> None:
        async with sem:
            try:
                async with SMPSession(make_transport(dev), device_id=dev.id,
                                      timeout_s=dev.timeouts.request_s) as s:
                    states = await s.image_state(retries=1)
                live[dev.id] = [st for st in states if (st.image or 0) == dev.image]
            except Exception as exc:
                live[dev.id] = exc

    devices = inventory.all_devices(cfg)
    daemon = None if offline else await _daemon_status(cfg)
    if not offline and daemon is None:
        async with asyncio.TaskGroup() as tg:
            for dev in devices:
                tg.create_task(query(dev))

    journal = Journal(cfg.state_dir / "journal.sqlite")
    versions = inventory.image_versions(cfg.state_dir)
    quarantined = inventory.quarantined(cfg.state_dir)
    retry, sources = _scheduling_state(cfg)
    if as_json:
        return _status_json(cfg, devices, live, journal, versions, quarantined, retry, sources,
                            daemon)
    title = f"{cfg.gateway_id}: devices" + (" (journal only)" if offline else "") + (
        " (from the running daemon)" if daemon is not None else "")
    table = Table(title=title)
    for col in ("device", "group", "running", "hash", "flags", "slot 1", "target", "step",
                "progress", "last error"):
        table.add_column(col, overflow="fold")
    rc = EXIT_OK
    for dev in devices:
        e = journal.get(dev.id)
        prog = f"{100 * e.upload_offset // e.upload_total}%" if e.upload_total else "-"
        # this attempt's target: an offer refused or not downloaded has no image hash yet
        target = (f"{e.target_version or ''} {(e.target_hash or '')[:12]}".strip()
                  or e.artifact_id or "-")
        blocked = inventory.blocked_label(e, versions)
        if blocked:  # name the blocked image: it need not be the current target
            target = f"{target} ({blocked})" if target != "-" else blocked
        step = e.step + (f" ({e.outcome})" if e.outcome and e.outcome != e.step else "")
        step += "".join(f"; intent: {i.describe()}" for i in journal.open_intents(dev.id))
        held = retry_label(retry.get(dev.id))
        if held:
            step = f"{step}; {held}"
        why = quarantined.get(dev.id)
        if why is not None:  # no update may touch it now (gateway.discovery.guard)
            step, rc = f"QUARANTINED: {why}", EXIT_FAILED
        row = [e.running_version or "-", (e.running_hash or "-")[:16], "(journal)", "-"]
        if daemon is not None:
            row, step = _daemon_row(daemon.get(dev.id), row, step)
        got = live.get(dev.id)
        if isinstance(got, Exception):
            row[2] = f"unreachable: {got}"
            rc = EXIT_FAILED
        elif got is not None:
            act = next((st for st in got if st.active), None)
            other = next((st for st in got if st is not act), None)
            if act is not None:
                row[:3] = [act.version, bytes(act.hash).hex()[:16] if act.hash else "-", flags(act)]
            row[3] = f"{other.version} {flags(other)}".strip() if other is not None else "empty"
        table.add_row(dev.id, dev.group or "", *row, target, step, prog, e.last_error or "")
    journal.close()
    console = Console(width=220 if not sys.stdout.isatty() else None)
    console.print(table)
    for line in (source_label(v) for v in sources.values()):
        console.print(line, markup=False, highlight=False)
    return rc


def _daemon_row(d: dict[str, Any] | None, row: list[str], step: str) -> tuple[list[str], str]:
    """The running/hash/flags/slot-1 cells and the step from the daemon's view of a device."""
    if d is None:
        return row, step
    slots = _daemon_slots(d)
    act = next((s for s in slots if "active" in _flags_of(s)), None)
    other = next((s for s in slots if s is not act), None)
    if act is not None:
        row = [str(act.get("version"))[:64], str(act.get("hash") or "-")[:16],
               ",".join(f for f in _flags_of(act) if f != "bootable")[:80], row[3]]
    if slots:
        row[3] = (f"{str(other.get('version'))[:64]} "
                  f"{','.join(f for f in _flags_of(other) if f != 'bootable')[:80]}".strip()
                  if other is not None else "empty")
    at = d.get("slots_at")
    if slots and isinstance(at, int | float) and not isinstance(at, bool) and 0 < at < 2**32:
        row[2] = f"{row[2]} (read {time.strftime('%H:%M:%S', time.localtime(at))})".strip()
    if d.get("in_session"):
        step = f"{step}; in session"
    return row, step


def _scheduling_state(cfg: GatewayConfig) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """The daemon's parked/backoff devices and its source's backoff (``fleet.sqlite``)."""
    if not (cfg.state_dir / "fleet.sqlite").exists():
        return {}, {}
    ops = OpState(cfg.state_dir / "fleet.sqlite")
    try:
        return ops.retry_states(), ops.sources()
    finally:
        ops.close()


def _status_json(cfg: GatewayConfig, devices: list[DeviceConfig], live: dict[str, Any],
                 journal: Any, versions: dict[str, str], quarantined: dict[str, str],
                 retry: dict[str, dict[str, Any]] | None = None,
                 sources: dict[str, dict[str, Any]] | None = None,
                 daemon: dict[str, dict[str, Any]] | None = None) -> int:
    last: dict[str, dict[str, Any]] = {}
    if (cfg.state_dir / "fleet.sqlite").exists():
        ops = OpState(cfg.state_dir / "fleet.sqlite")
        last = ops.inventory()
        ops.close()
    rc = EXIT_OK
    out = []
    for dev in devices:
        got = live.get(dev.id)
        prev = last.get(dev.id) or {}
        # reachable: true / false (then "error" says why) / null: not asked (--offline)
        reachable: bool | None = None if got is None else True
        error = None
        slots = prev.get("slots")
        d = (daemon or {}).get(dev.id)
        if daemon is not None:
            reachable, error = None, "not asked: the running daemon holds the device"
            slots = _daemon_slots(d or {}) or slots
        if isinstance(got, Exception):
            reachable, error, rc = False, f"unreachable: {got}", EXIT_FAILED
        elif got is not None:
            slots = inventory.slots_of(got)
        rec = inventory.record(
            dev, slots=slots, params=prev.get("mcumgr_params"), bootloader_mode=prev.get("mcuboot_mode"),
            facts=prev, entry=journal.get(dev.id), versions=versions, reachable=bool(reachable),
            quarantine=quarantined.get(dev.id))
        rec["reachable"], rec["error"] = reachable, error
        if dev.id in quarantined:
            rc = EXIT_FAILED
        r = (retry or {}).get(dev.id)
        rec["parked"] = ({"until": r.get("until"), "failures": r.get("failures"),
                          "reason": r.get("reason")} if r and r.get("parked") else None)
        rec["retry"] = r
        if daemon is not None:
            rec["daemon"] = d
        out.append(rec)
    journal.close()
    print(json.dumps({"gateway": cfg.gateway_id, "devices": out,
                      "sources": list((sources or {}).values())}, indent=2, default=str))
    return rc


if __name__ == "__main__":
    sys.exit(main())
