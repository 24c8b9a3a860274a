"""The operator's tools on the command line: ``device``, ``check-config``, ``verify``,
``history`` and ``run --dry-run`` (registered by ``gateway.cli``).

Owns their arguments, routing and exit codes: 0 done / accepted / no problem, 1 refused or
failed (the reason is printed), 2 configuration or usage error. ``--json`` everywhere prints
one JSON document on stdout. The work is in ``gateway.devcmd``, ``gateway.preflight`` and
``gateway.history``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from gateway import devcmd, history, preflight
from gateway.config import ConfigError, GatewayConfig, load_config
from gateway.control import ControlError, _alive, request
from gateway.daemon import make_transport
from gateway.journal import Journal
from gateway.maintenance import MaintenancePolicy
from gateway.opstate import OpState
from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import TransportError
from gateway.statelock import StateDirLock

COMMANDS = ("device", "check-config", "verify", "history")
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEVICE_HELP = ("echo [TEXT] | reset | image list | image erase [--slot N] | image test HASH | "
               "image confirm [HASH] | stat [NAME] | os info [FORMAT]")


def register(sub: Any) -> None:
    """Add the subcommands to ``smp-gateway``'s subparsers (and ``--dry-run`` to ``run``)."""
    run = sub.choices.get("run")
    if run is not None:
        run.add_argument("--dry-run", action="store_true",
                         help="with --once: say what would be updated, with which image, and what "
                              "would be refused; writes to no device, reports nothing")
        # ``--json`` (run's own: the --once summary, or the --dry-run plan, as JSON)
    d = sub.add_parser("device", help="one-off command to one device (through the daemon when "
                                      "it runs): " + DEVICE_HELP)
    d.add_argument("--config", "-c", required=True, type=Path)
    d.add_argument("device_id")
    d.add_argument("words", nargs="+", metavar="COMMAND", help=DEVICE_HELP)
    d.add_argument("--slot", type=int, help="image erase: the slot (default: the other slot)")
    d.add_argument("--force", action="store_true",
                   help="image confirm HASH: also when it is not the running image")
    d.add_argument("--ignore-window", action="store_true",
                   help="reset: also outside the maintenance windows")
    d.add_argument("--json", action="store_true")
    c = sub.add_parser("check-config", help="every problem of a configuration (exit 2 if any)")
    c.add_argument("--config", "-c", required=True, type=Path)
    c.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="every pre-flight check for one device: verdict and plan "
                                      "(exit 0 accepted, 1 refused)")
    v.add_argument("image", type=Path)
    v.add_argument("--device", required=True)
    v.add_argument("--config", "-c", required=True, type=Path)
    v.add_argument("--json", action="store_true")
    h = sub.add_parser("history", help="each update attempt (and operator act) from the journal")
    h.add_argument("--config", "-c", required=True, type=Path)
    h.add_argument("device_id", nargs="?")
    h.add_argument("--limit", type=int, default=200)
    h.add_argument("--json", action="store_true")


def handles(args: argparse.Namespace) -> bool:
    return args.cmd in COMMANDS or (args.cmd == "run" and getattr(args, "dry_run", False))


def main(args: argparse.Namespace) -> int:
    if args.cmd == "check-config":
        problems = preflight.check_config(args.config)
        if args.json:
            print(json.dumps({"config": str(args.config), "problems": problems}, indent=2))
        else:
            for p in problems:
                print(p)
            print(f"{args.config}: {len(problems)} problem(s)" if problems else f"{args.config}: ok")
        return EXIT_USAGE if problems else EXIT_OK
    cfg = load_config(args.config)
    if args.cmd == "history":
        data = history.collect(cfg.state_dir / "journal.sqlite", args.device_id, args.limit)
        print(history.render(data, args.json))
        return EXIT_OK
    if args.cmd == "verify":
        v = asyncio.run(preflight.verify(cfg, args.image, args.device))
        _print_verdict(v.to_dict(), args.json)
        return EXIT_OK if v.accepted else EXIT_FAILED
    if args.cmd == "run":
        return _dry_run(cfg, args)
    return _device(cfg, args)


def _print_verdict(d: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(d, indent=2, default=str))
        return
    print(f"{d['device']}: {d['image']}: {d['verdict'].upper()}"
          + (f" - {d['refusal']} (LwM2M {d['lwm2m_result']})" if d["refusal"] else ""))
    print(f"  device: {d['device_state']}")
    for c in d["checks"]:
        print(f"  [{'ok' if c['ok'] else 'NO'}] {c['check']}: {c['detail']}")
    if d.get("plan"):
        p = d["plan"]
        print(f"  plan: {p['bytes']} bytes of {p['version']} ({p['mode']}): "
              + " -> ".join(p["steps"]) + f"; {p['maintenance_window']}")


def _dry_run(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    lock = StateDirLock(cfg.state_dir, cfg.config_path or "<config>")
    lock.acquire()  # like run --once: never beside a daemon on the same devices
    try:
        rows = asyncio.run(preflight.dry_run(cfg))
    finally:
        lock.release()
    if getattr(args, "json", False):
        print(json.dumps({"gateway": cfg.gateway_id, "dry_run": True, "devices": rows},
                         indent=2, default=str))
    else:
        for r in rows:
            line = f"{r['device']}: {r['action'].upper()}"
            if r.get("plan"):
                line += f" to {r['plan']['version']} ({r['plan']['hash'][:16]})"
            line += f" - {r.get('refusal') or r.get('why') or ''} (running {r.get('running')})"
            print(line)
    return EXIT_FAILED if any(r["action"] in ("refuse", "fail") for r in rows) else EXIT_OK


def _command(args: argparse.Namespace) -> devcmd.DeviceCommand:
    w = [x.lower() for x in args.words[:2]]
    rest = args.words[1:]
    if w[0] in ("image", "os") and len(w) > 1:
        op, rest = f"{w[0]}-{w[1]}", args.words[2:]
    else:
        op = w[0]
    if op not in devcmd.OPS:
        raise devcmd.DeviceCommandRefused(f"unknown device command {' '.join(args.words)!r} "
                                          f"({DEVICE_HELP})")
    if len(rest) > 1 or (rest and op in ("reset", "image-list", "image-erase")):
        raise devcmd.DeviceCommandRefused(f"too many arguments for {op}: {rest}")
    return devcmd.DeviceCommand(op, rest[0] if rest else None, args.slot, args.force,
                                args.ignore_window)


def _device(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    try:
        cmd = _command(args)
    except devcmd.DeviceCommandRefused as exc:
        print(f"smp-gateway device: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result, via = asyncio.run(_device_async(cfg, args.device_id, cmd))
    except (devcmd.DeviceCommandRefused, ControlError) as exc:
        print(f"smp-gateway device: {args.device_id}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (SMPError, SMPTimeout, TransportError) as exc:
        print(f"smp-gateway device: {args.device_id}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if args.json:
        print(json.dumps({"device": args.device_id, "command": cmd.op, "via": via,
                          "result": result}, indent=2, default=str))
    else:
        _print_result(args.device_id, cmd, result)
    return EXIT_OK


def _print_result(dev_id: str, cmd: devcmd.DeviceCommand, result: dict[str, Any]) -> None:
    if isinstance(result.get("images"), list):
        for i in result["images"]:
            if not isinstance(i, dict):
                continue
            flags = ",".join(f for f in ("active", "confirmed", "pending", "permanent")
                             if i.get(f) is True)
            print(f"{dev_id} image {i.get('image')} slot {i.get('slot')}: {i.get('version')} "
                  f"{str(i.get('hash') or '-')[:16]} {flags}")
    elif "echo" in result:
        print(result["echo"])
    elif "os_info" in result:
        print(result["os_info"])
    else:
        print(f"{dev_id}: {cmd.op}: {json.dumps(result, default=str)}")


async def _device_async(cfg: GatewayConfig, dev_id: str,
                        cmd: devcmd.DeviceCommand) -> tuple[dict[str, Any], str]:
    """Through the daemon's control socket when it answers; else directly, holding the state
    directory's lock (a daemon holding it without a reachable socket: refused, not raced)."""
    if cfg.control.enabled and await _alive(cfg.control_socket):
        res = await request(cfg.control_socket, cmd.to_request(dev_id), timeout_s=120)
        if not isinstance(res, dict):  # the socket's other end is outside input
            raise ControlError(f"unusable answer from the daemon: a {type(res).__name__}, not "
                               "an object")
        return res, "daemon"
    dev = next((d for d in cfg.devices if d.id == dev_id), None)
    if dev is None:
        raise devcmd.DeviceCommandRefused(f"no device {dev_id!r} in the configuration (a "
                                          "discovered device: only through the running daemon)")
    lock = StateDirLock(cfg.state_dir, cfg.config_path or "<config>")
    try:
        lock.acquire()
    except ConfigError as exc:
        raise devcmd.DeviceCommandRefused(
            f"{exc}; its control socket {cfg.control_socket} does not answer, so the command "
            "cannot be serialised with its work") from None
    journal = Journal(cfg.state_dir / "journal.sqlite")
    ops = OpState(cfg.state_dir / "fleet.sqlite")
    try:
        async with SMPSession(make_transport(dev), device_id=dev.id,
                              timeout_s=dev.timeouts.request_s) as s:
            res = await devcmd.run(dev, s, cmd, journal, ops,
                                   MaintenancePolicy.from_config(cfg.maintenance_windows),
                                   f"uid={os.getuid()} (direct)")
        return res, "direct"
    finally:
        journal.close()
        ops.close()
        lock.release()
