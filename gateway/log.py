"""Structured logging: ``key=value`` text (reads well in journald) or one JSON object a line.

Owns the process-wide logging setup. Messages in the gateway are written as ``key=value``
pairs (``device=... step=...``); the JSON formatter lifts those pairs into JSON keys (numbers as
numbers) and leaves only the remaining words in ``msg``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time

_KV = re.compile(r"(\w+)=(\"[^\"]*\"|'[^']*'|\S+)")
_RESERVED = {"time", "level", "logger", "msg", "exc"}
_NUM = re.compile(r"-?\d+(\.\d+)?")


def _value(v: str) -> object:
    v = v.strip(",;")
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "\"'":
        return v[1:-1]
    if _NUM.fullmatch(v):
        return float(v) if "." in v else int(v)
    return v


class TextFormatter(logging.Formatter):
    def __init__(self, with_time: bool = True) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        head = f"level={record.levelname.lower()} logger={record.name}"
        if self.with_time:
            t = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            head = f"time={t}.{int(record.msecs):03d} {head}"
        line = f"{head} {msg}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        out: dict[str, object] = {
            "time": record.created,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": msg,
        }
        fields: dict[str, object] = {}

        def lift(m: re.Match[str]) -> str:
            k = m.group(1)
            if k in _RESERVED or k in fields:
                return m.group(0)
            fields[k] = _value(m.group(2))
            return ""

        # the key=value pairs become JSON keys; msg keeps only the words around them
        out["msg"] = " ".join(_KV.sub(lift, msg).split())
        out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup(fmt: str = "text", level: int = logging.INFO, stream: object = None, *,
          trace_ble: bool = False) -> None:
    """Configure the root logger. Under systemd (JOURNAL_STREAM set) timestamps are omitted.

    Libraries stay at WARNING even under ``-v`` (debug): Bumble logs every HCI/ATT packet at
    debug level, which floods the log and slows the link it is meant to show; ``trace_ble``
    (``--trace-ble``) switches Bumble's debug log on."""
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(with_time="JOURNAL_STREAM" not in os.environ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("smp", "smpclient", "asyncio", "aiohttp.access", "bumble"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if trace_ble:
        logging.getLogger("bumble").setLevel(logging.DEBUG)
