"""Command line: ``smp-gateway run|status|sim|demo``.

Owns argument parsing, exit codes (0 every device on its target, 1 something failed,
2 configuration or usage error) and choosing between terminal UI and plain logs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from gateway import log as glog
from gateway.config import ConfigError, GatewayConfig, load_config

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="smp-gateway", description=(
        "Keep MCUboot/Zephyr devices up to date over MCUmgr SMP (UDP, serial, BLE)."))
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--log-format", choices=["text", "json"], help="log format (default: config)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="poll the update source and update devices")
    r.add_argument("--config", "-c", required=True, type=Path)
    r.add_argument("--once", action="store_true",
                   help="one pass; exit 0 if every device ended on its target, 1 otherwise")
    s = sub.add_parser("status", help="show each device's slots and the journal")
    s.add_argument("--config", "-c", required=True, type=Path)
    s.add_argument("--offline", action="store_true", help="journal only; do not contact devices")
    m = sub.add_parser("sim", help="run simulated devices (Zephyr smp_svr + MCUboot)")
    m.add_argument("--config", "-c", required=True, type=Path)
    d = sub.add_parser("demo", help="simulated devices + signed images + one --once pass")
    d.add_argument("--workdir", help="keep the demo's files here (default: a temporary dir)")
    d.add_argument("--keep", action="store_true", help="do not delete the temporary directory")
    return p


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:
        return EXIT_USAGE if exc.code not in (0, None) else EXIT_OK
    level = logging.DEBUG if args.verbose else logging.INFO
    try:
        if args.cmd == "demo":
            glog.setup(args.log_format or "text", logging.WARNING if sys.stderr.isatty() else level)
            from gateway.demo import main_demo

            return main_demo(args.workdir, args.keep)
        if args.cmd == "sim":
            glog.setup(args.log_format or "text", level)
            return _sim(args.config)
        cfg = load_config(args.config)
        glog.setup(args.log_format or cfg.log_format, level)
        if args.cmd == "run":
            return asyncio.run(_run(cfg, args.once))
        if args.cmd == "status":
            return asyncio.run(_status(cfg, args.offline))
    except ConfigError as exc:
        print(f"smp-gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


def _sim(path: Path) -> int:
    from pydantic import ValidationError

    from gateway.sim.config import load_sim_config
    from gateway.sim.simulator import run_simulator

    try:
        cfg = load_sim_config(path)
    except (OSError, ValidationError, ValueError) as exc:
        print(f"smp-gateway: simulator configuration error in {path}: {exc}", file=sys.stderr)
        return EXIT_USAGE

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await run_simulator(cfg, stop, announce=lambda s: print(s, flush=True))

    asyncio.run(go())
    return EXIT_OK


async def _run(cfg: GatewayConfig, once: bool) -> int:
    from gateway.daemon import Gateway
    from gateway.ui import ProgressView, outcome_table, print_outcomes_plain

    tty = sys.stderr.isatty()
    if once:
        view = ProgressView() if tty else None
        gw = Gateway(cfg, on_progress=view.update if view else None)
        try:
            if view:
                with view:
                    result = await gw.run_once()
                view.console.print(outcome_table(result.outcomes))
            else:
                result = await gw.run_once()
                print_outcomes_plain(result.outcomes)
        finally:
            gw.close()
        return EXIT_OK if result.ok else EXIT_FAILED
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gw = Gateway(cfg)
    try:
        await gw.run_forever(stop)
    finally:
        gw.close()
    return EXIT_OK


async def _status(cfg: GatewayConfig, offline: bool) -> int:
    from rich.console import Console
    from rich.table import Table

    from gateway.daemon import make_transport
    from gateway.journal import Journal
    from gateway.smp.session import SMPSession

    journal = Journal(cfg.state_dir / "journal.sqlite")
    table = Table(title=f"{cfg.gateway_id}: devices")
    for col in ("device", "slot", "version", "hash", "flags", "journal step", "target", "progress",
                "last error"):
        table.add_column(col)
    rc = EXIT_OK
    for dev in cfg.devices:
        e = journal.get(dev.id)
        prog = f"{100 * e.upload_offset // e.upload_total}%" if e.upload_total else "-"
        jcols = [e.step, e.target_version or "-", prog, e.last_error or ""]
        rows: list[list[str]] = []
        if not offline:
            try:
                async with SMPSession(make_transport(dev), device_id=dev.id,
                                      timeout_s=dev.timeouts.request_s) as s:
                    for st in await s.image_state(retries=1):
                        flags = [f for f in ("active", "confirmed", "pending", "permanent", "bootable")
                                 if getattr(st, f)]
                        rows.append([f"{st.image or 0}/{st.slot}", st.version,
                                     bytes(st.hash).hex()[:16] if st.hash else "-", ",".join(flags)])
            except Exception as exc:
                rows.append(["-", "-", "-", f"unreachable: {exc}"])
                rc = EXIT_FAILED
        if not rows:
            rows.append(["-", e.running_version or "-", (e.running_hash or "-")[:16], "(journal)"])
        for i, r in enumerate(rows):
            table.add_row(dev.id if i == 0 else "", *r, *(jcols if i == 0 else [""] * 4))
    journal.close()
    Console().print(table)
    return rc


if __name__ == "__main__":
    sys.exit(main())
