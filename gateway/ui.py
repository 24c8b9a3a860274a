"""Terminal presentation: a progress bar per device while updating, a table at the end.

Owns only what a person sees on a terminal (rich). With no terminal the gateway prints plain
structured logs instead, and this module stays silent.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn
from rich.table import Table

from gateway.daemon import Gateway
from gateway.engine import Outcome

if TYPE_CHECKING:
    from gateway.config import GatewayConfig
    from gateway.daemon import Pass


class _ConsoleStream:
    """A file-like stream printing whole lines through a rich console (above a live display)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def write(self, text: str) -> int:
        for line in text.rstrip("\n").split("\n"):
            self.console.print(line, markup=False, highlight=False, emoji=False)
        return len(text)

    def flush(self) -> None:
        pass


class ProgressView:
    """Context manager; ``update`` is the gateway's on_progress callback."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[device]:<14}"),
            TextColumn("{task.fields[step]:<16}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, Any] = {}

    def __enter__(self) -> ProgressView:
        self.progress.start()
        # log lines go above the bars (through the live console), not through them
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler) and getattr(h.stream, "isatty", lambda: False)():
                self._swapped.append((h, h.setStream(_ConsoleStream(self.progress.console))))
        return self

    def __exit__(self, *exc: object) -> None:
        for h, stream in self._swapped:
            h.setStream(stream)
        self.progress.stop()

    def update(self, device_id: str, step: str, done: int, total: int) -> None:
        task = self.tasks.get(device_id)
        if task is None:
            task = self.progress.add_task("", device=device_id, step=step, total=total or None)
            self.tasks[device_id] = task
        kw: dict[str, Any] = {"step": step}
        if total:
            kw["total"] = total
            kw["completed"] = done
        self.progress.update(task, **kw)


def outcome_table(outcomes: dict[str, Outcome], title: str = "smp-gateway") -> Table:
    table = Table(title=title)
    for col in ("device", "result", "from", "to", "uploaded", "detail"):
        table.add_column(col)
    colors = {"updated": "green", "up-to-date": "green", "refused": "yellow",
              "rolled-back": "red", "failed": "red"}
    for dev_id, o in sorted(outcomes.items()):
        c = colors.get(o.status.value, "white")
        up = f"{o.bytes_uploaded / 1024:.0f} KiB in {o.upload_seconds:.1f}s" if o.bytes_uploaded else "-"
        table.add_row(dev_id, f"[{c}]{o.status.value}[/{c}]", o.old_version or "-",
                      o.new_version or "-", up, o.detail)
    return table


def print_outcomes_plain(outcomes: dict[str, Outcome]) -> None:
    """One ``key=value`` line a device. ``wire_bytes``: bytes sent (retransmissions included);
    ``image_bytes``: the image's size."""
    for dev_id, o in sorted(outcomes.items()):
        print(f"device={dev_id} result={o.status.value} lwm2m_result={int(o.result)} "
              f"from={o.old_version} to={o.new_version} wire_bytes={o.bytes_uploaded} "
              f"image_bytes={o.image_bytes} seconds={o.upload_seconds:.2f} detail=\"{o.detail}\"")


def outcomes_json(result: Pass) -> dict[str, Any]:
    """``run --once --json``: the pass as one JSON document (stdout)."""
    return {
        "ok": result.ok,
        "seconds": round(result.seconds, 3),
        "devices": [{"device": dev_id, "status": o.status.value, "ok": o.ok,
                     "result": int(o.result), "result_name": o.result.name, "detail": o.detail,
                     "from_version": o.old_version, "to_version": o.new_version,
                     "wire_bytes": o.bytes_uploaded, "image_bytes": o.image_bytes,
                     "upload_seconds": round(o.upload_seconds, 3), "group": o.group}
                    for dev_id, o in sorted(result.outcomes.items())],
    }


async def run_once_shown(cfg: GatewayConfig, console: Console | None = None,
                         title: str = "smp-gateway", as_json: bool = False) -> Pass:
    """One ``--once`` pass: a progress bar per device and a table on a terminal, plain lines
    otherwise (``as_json``: one JSON document on stdout). ``title`` may use ``{seconds}``."""
    tty = sys.stderr.isatty() and not as_json
    view = ProgressView(console) if tty else None
    gw = Gateway(cfg, on_progress=view.update if view else None)
    try:
        if view:
            with view:
                result = await gw.run_once()
        else:
            result = await gw.run_once()
    finally:
        gw.close()
    if as_json:
        print(json.dumps(outcomes_json(result), indent=2), flush=True)
    elif view:
        view.console.print(outcome_table(result.outcomes, title.format(seconds=result.seconds)))
    else:
        print_outcomes_plain(result.outcomes)
    return result
