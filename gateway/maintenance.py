"""Local maintenance windows: when a device may be reset (``maintenance_windows:``).

Owns the one question the scheduler asks before a device is marked for test and reset: *is a
window open for this device now, and if not, when does the next one open?* Downloads and the
upload to the secondary slot may happen at any time; marking the image for test and the reset
that boots it happen only inside a window (a pending image would be booted by any power cycle,
so the mark belongs with the reset).

A window opens at each time its cron expression (``croniter``, 5 fields, evaluated in the
window's IANA time zone, so daylight-saving changes follow local time) fires and stays open
``duration_s``. A device names the windows that apply to it (``maintenance: [nightly]``); a
device that names none is governed by every window defined; ``maintenance: []`` means any
time. No window defined at all: any time.

Every reset the engine and the group runner issue goes through one check built on this policy
(``FleetOps.reset_gate``), not only the admission at the start of an attempt: a window that
closes during an upload, a health window or the wait for an application's confirm stops the
next mark or reset, and the update waits (journaled) for the next window.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter


class MaintenanceWindowConfig(Protocol):
    """What a window's config gives (``gateway.config.MaintenanceWindowConfig``; a protocol so
    that the config, which validates windows with ``check_window``, and this module do not
    import each other)."""

    @property
    def cron(self) -> str: ...
    @property
    def duration_s(self) -> float: ...
    @property
    def timezone(self) -> str: ...


class DeviceConfig(Protocol):
    """The part of a device's config this module reads: its window names (None = all)."""

    @property
    def maintenance(self) -> list[str] | None: ...


def check_window(cron: str, timezone: str) -> None:
    """ValueError naming what is wrong with a cron expression or time zone (config checks)."""
    try:
        ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {timezone!r} (an IANA name such as 'Europe/Berlin' "
                         "or 'UTC')") from None
    if len(cron.split()) != 5:
        raise ValueError(f"cron expression {cron!r} must have 5 fields: minute hour day-of-month "
                         "month day-of-week")
    if not croniter.is_valid(cron):
        raise ValueError(f"cron expression {cron!r} is not valid")


@dataclass(frozen=True)
class Window:
    name: str
    cron: str
    duration_s: float
    timezone: str = "UTC"

    @classmethod
    def from_config(cls, name: str, cfg: MaintenanceWindowConfig) -> Window:
        return cls(name, cfg.cron, cfg.duration_s, cfg.timezone)

    def _local(self, now: dt.datetime) -> dt.datetime:
        return now.astimezone(ZoneInfo(self.timezone))

    def last_start(self, now: dt.datetime) -> dt.datetime:
        """The latest opening at or before ``now`` (1-second resolution)."""
        it = croniter(self.cron, self._local(now) + dt.timedelta(seconds=1))
        start: dt.datetime = it.get_prev(dt.datetime)
        return start

    def is_open(self, now: dt.datetime) -> bool:
        return (now - self.last_start(now)).total_seconds() < self.duration_s

    def closes_at(self, now: dt.datetime) -> dt.datetime | None:
        if not self.is_open(now):
            return None
        return self.last_start(now) + dt.timedelta(seconds=self.duration_s)

    def next_open(self, now: dt.datetime) -> dt.datetime:
        """``now`` if open, else the next opening."""
        if self.is_open(now):
            return now
        nxt: dt.datetime = croniter(self.cron, self._local(now)).get_next(dt.datetime)
        return nxt


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class MaintenancePolicy:
    """The windows of a configuration, applied per device."""

    def __init__(self, windows: Iterable[Window],
                 clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.windows = {w.name: w for w in windows}
        self.clock = clock  # aware "now" (tests move it to open and close windows)

    @classmethod
    def from_config(cls, cfg: Mapping[str, MaintenanceWindowConfig]) -> MaintenancePolicy:
        return cls(Window.from_config(n, w) for n, w in cfg.items())

    def windows_for(self, dev: DeviceConfig) -> list[Window] | None:
        """The windows governing ``dev``; None = no restriction."""
        names = dev.maintenance
        if names is None:
            names = list(self.windows)
        if not names:
            return None
        return [self.windows[n] for n in names if n in self.windows] or None

    def reset_allowed(self, dev: DeviceConfig, now: dt.datetime | None = None) -> bool:
        ws = self.windows_for(dev)
        if ws is None:
            return True
        now = now or self.clock()
        return any(w.is_open(now) for w in ws)

    def next_allowed(self, dev: DeviceConfig, now: dt.datetime | None = None) -> dt.datetime:
        """When ``dev`` may next be reset (``now`` when it may now)."""
        now = now or self.clock()
        ws = self.windows_for(dev)
        if ws is None:
            return now
        return min(w.next_open(now) for w in ws)

    def seconds_until_allowed(self, dev: DeviceConfig, now: dt.datetime | None = None) -> float:
        now = now or self.clock()
        return max(0.0, (self.next_allowed(dev, now) - now).total_seconds())

    def describe(self, dev: DeviceConfig, now: dt.datetime | None = None) -> str:
        now = now or self.clock()
        ws = self.windows_for(dev)
        if ws is None:
            return "no maintenance window: resets allowed any time"
        open_ = [w for w in ws if w.is_open(now)]
        if open_:
            w = open_[0]
            return f"window {w.name} open until {w.closes_at(now):%Y-%m-%d %H:%M %Z}"
        nxt = min(ws, key=lambda w: w.next_open(now))
        return (f"outside the maintenance windows ({', '.join(w.name for w in ws)}); next: "
                f"{nxt.name} at {nxt.next_open(now):%Y-%m-%d %H:%M %Z}")


def both_gates(first: Callable[[], str | None],
               second: Callable[[], str | None] | None) -> Callable[[], str | None]:
    """One reset gate from two: the first one's reason to hold, else the second's (a
    source's window - hawkBit's - on top of the gateway's own maintenance windows)."""
    return lambda: first() or (second() if second is not None else None)

