"""``smp-gateway ctl``: the operator's client of the daemon's control socket.

Owns turning the command line into one request on ``control.socket`` (``gateway.control``)
and printing the answer (a table for ``list``, JSON with ``--json``). Exit codes: 0 done,
1 the daemon refused (the reason is printed), 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

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
    from rich.console import Console
    from rich.table import Table

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
    if args.json or args.action in ("rollout", "audit"):
        print(json.dumps(result, indent=2, default=str))
    elif args.action == "list":
        _print_list(result)
    else:
        print(result)
    return 0
