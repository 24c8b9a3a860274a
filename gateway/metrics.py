"""Prometheus metrics: counters/gauges in memory and a tiny ``/metrics`` HTTP endpoint.

Owns what the daemon exposes to Prometheus (text exposition format 0.0.4). The server is a few
lines on ``asyncio.start_server`` rather than ``prometheus_client``: the gateway needs a
handful of labelled counters and gauges, one GET handler, and runs in one event loop;
prometheus_client would add a dependency and a server thread for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from gateway.schema import ConfigError

log = logging.getLogger("gateway.metrics")

Labels = tuple[tuple[str, str], ...]


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _fmt_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in labels) + "}"


class Metrics:
    """Labelled counters and gauges; gauges may also be computed at scrape time."""

    def __init__(self, prefix: str = "smpgw") -> None:
        self.prefix = prefix
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._values: dict[str, dict[Labels, float]] = {}
        self._collectors: list[Callable[[], Iterable[tuple[str, dict[str, str], float]]]] = []

    def describe(self, name: str, kind: str, text: str) -> None:
        self._help[name] = (kind, text)
        self._values.setdefault(name, {})

    def inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        series = self._values.setdefault(name, {})
        series[key] = series.get(key, 0.0) + amount

    def set(self, name: str, value: float, **labels: str) -> None:
        self._values.setdefault(name, {})[tuple(sorted(labels.items()))] = value

    def get(self, name: str, **labels: str) -> float:
        return self._values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def collector(self, fn: Callable[[], Iterable[tuple[str, dict[str, str], float]]]) -> None:
        """``fn()`` yields (name, labels, value) gauges at every scrape (replacing the series)."""
        self._collectors.append(fn)

    def render(self) -> str:
        values = {k: dict(v) for k, v in self._values.items()}
        for fn in self._collectors:
            fresh: dict[str, dict[Labels, float]] = {}
            for name, labels, value in fn():
                fresh.setdefault(name, {})[tuple(sorted(labels.items()))] = value
            values.update(fresh)
        out: list[str] = []
        for name in sorted(values):
            full = f"{self.prefix}_{name}"
            kind, text = self._help.get(name, ("untyped", ""))
            if text:
                out.append(f"# HELP {full} {text}")
            out.append(f"# TYPE {full} {kind}")
            for key, v in sorted(values[name].items()):
                num = repr(float(v)) if v != int(v) else str(int(v))
                out.append(f"{full}{_fmt_labels(key)} {num}")
        return "\n".join(out) + "\n"


class MetricsServer:
    """``GET /metrics`` on host:port (anything else: 404). HTTP/1.0-style, one request a connection."""

    def __init__(self, metrics: Metrics, host: str, port: int,
                 config_path: str | Path = "<config>") -> None:
        self.metrics, self.host, self.port = metrics, host, port
        self.config_path = config_path
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        """Listen, or raise ``ConfigError`` (one line, exit 2) when host:port cannot be used."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            why = ("is in use by another program" if exc.errno == errno.EADDRINUSE
                   else f"cannot be used: {exc.strerror or exc}")
            raise ConfigError(self.config_path, "metrics", f"{self.host}:{self.port} {why}; give "
                              "metrics.port a free port (0: any) or stop the other program"
                              ) from None
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics listening=http://%s:%d/metrics", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
            if method in (b"GET", b"HEAD") and path.split(b"?")[0] in (b"/metrics", b"/"):
                body = self.metrics.render().encode()
                status, ctype = "200 OK", "text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", "404 Not Found", "text/plain"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}"
                         "\r\nConnection: close\r\n\r\n".encode())
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


class DeviceSeries:
    """Per-device series: ``device_state{device,step}`` (1 for the journal step it is in),
    ``device_last_outcome{device,outcome}`` (1 for its last outcome), ``device_upload_bytes_total``
    and ``device_upload_rate_bytes_per_second`` (its last upload). Bounded by the device list:
    series of devices no longer listed are not exported."""

    def __init__(self, device_ids: Callable[[], Iterable[str]],
                 steps: Callable[[], dict[str, str]]) -> None:
        self.device_ids = device_ids
        self.steps = steps
        self.last: dict[str, str] = {}
        self.bytes: dict[str, float] = {}
        self.rate: dict[str, float] = {}

    def outcome(self, out: object) -> None:
        dev = str(getattr(out, "device_id", ""))
        status = getattr(out, "status", None)
        if status is not None and str(getattr(status, "value", status)) != "held":
            self.last[dev] = str(getattr(status, "value", status))
        sent = float(getattr(out, "bytes_uploaded", 0) or 0)
        secs = float(getattr(out, "upload_seconds", 0.0) or 0.0)
        if sent:
            self.bytes[dev] = self.bytes.get(dev, 0.0) + sent
            if secs > 0:
                self.rate[dev] = sent / secs

    def register(self, m: Metrics) -> None:
        m.describe("device_state", "gauge", "1 for the journal step each device is in")
        m.describe("device_last_outcome", "gauge", "1 for each device's last outcome")
        m.describe("device_upload_bytes_total", "counter", "image bytes sent to each device")
        m.describe("device_upload_rate_bytes_per_second", "gauge",
                   "each device's last upload throughput")
        m.collector(self.rows)

    def rows(self) -> list[tuple[str, dict[str, str], float]]:
        steps = self.steps()
        out: list[tuple[str, dict[str, str], float]] = []
        for d in self.device_ids():
            out.append(("device_state", {"device": d, "step": steps.get(d, "idle")}, 1.0))
            if d in self.last:
                out.append(("device_last_outcome", {"device": d, "outcome": self.last[d]}, 1.0))
            out.append(("device_upload_bytes_total", {"device": d}, self.bytes.get(d, 0.0)))
            if d in self.rate:
                out.append(("device_upload_rate_bytes_per_second", {"device": d}, self.rate[d]))
        return out
