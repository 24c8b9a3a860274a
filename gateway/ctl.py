"""``smp-gateway ctl``: the operator's client of the daemon's control socket.

Owns turning the command line into one request on ``control.socket`` (``gateway.control``)
and printing the answer (tables for ``list`` and ``audit`` in local time, a line per artifact for
``rollout``; the raw answer as JSON with ``--json``). Exit codes: 0 done,
1 the daemon refused (the reason is printed), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from gateway.config import GatewayConfig
from gateway.control import ControlError, request


def build_request(args: argparse.Namespace) -> dict[str, Any]:
    req: dict[str, Any] = {"cmd": args.action}
    if args.action in ("update", "cancel", "unblock") and not args.target:
        raise ControlError(f"ctl {args.action} needs a device id")
    if args.action in ("pause", "resume"):
        if args.all:
            req["all"] = True
        elif not args.target:
            raise ControlError(f"ctl {args.action} needs a device id or --all")
    if args.action == "rollout-resume":
        if not args.target:
            raise ControlError("ctl rollout-resume needs the artifact id (ctl rollout lists them)")
        req["artifact"] = args.target
    elif args.target:
        req["device"] = args.target
    if args.reason:
        req["reason"] = args.reason
    if args.ignore_window:
        req["ignore_window"] = True
    return req


def _print_list(rows: list[dict[str, Any]]) -> None:
    table = Table(title="devices")
    cols = ["device", "source", "transport", "address", "present", "paused", "step", "outcome",
            "running", "target", "blocked", "parked", "window", "quarantine"]
    for c in cols:
        table.add_column(c, overflow="fold")
    for r in rows:
        sb = r.get("source_backoff")
        if sb and not r.get("parked"):  # waits for the fleet server, not parked
            r = {**r, "parked": f"waits for {sb.get('source')} (backing off)"}
        table.add_row(*["" if r.get(c) is None else str(r.get(c)) for c in cols])
    Console(width=220 if not sys.stdout.isatty() else None).print(table)


def main_ctl(cfg: GatewayConfig, args: argparse.Namespace) -> int:
    try:
        req = build_request(args)
        result = asyncio.run(request(cfg.control_socket, req))
    except ControlError as exc:
        print(f"smp-gateway ctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif args.action == "list":
        _print_list(result)
    elif args.action == "audit":
        _print_audit(result)
    elif args.action == "rollout":
        _print_rollout(result)
    else:
        print(result)
    return 0


def _when(t: Any) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(t)))
    except (TypeError, ValueError, OverflowError, OSError):
        return str(t)


def _print_audit(rows: list[Any]) -> None:
    """The audit log, newest first, in local time (``--json``: the raw rows, epoch seconds)."""
    if not rows:
        print("no operator actions recorded")
        return
    table = Table(title="operator actions (newest first)")
    for c in ("time", "actor", "action", "target", "detail"):
        table.add_column(c, overflow="fold")
    for r in rows:
        t, *rest = list(r) + [""] * (5 - len(r))
        table.add_row(_when(t), *[str(x) for x in rest[:4]])
    Console(width=220 if not sys.stdout.isatty() else None).print(table)


def _print_rollout(waves: dict[str, Any]) -> None:
    if not waves:
        print("no rollout (none configured, or no artifact offered yet)")
        return
    for art, w in waves.items():
        summary = w.get("summary") if isinstance(w, dict) else None
        print(f"{art}: {summary or w}")
