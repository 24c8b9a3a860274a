"""Operator control: a local UNIX socket for ``smp-gateway ctl``.

Owns the socket, its permissions and the wire format. The socket (``control.socket``, default
``<state_dir>/control.sock``) is created with mode 0600 (umask 0177 while binding, so it is
never reachable by others, not even for an instant), owned by the user the service runs as;
a peer whose uid (``SO_PEERCRED``) is neither that user nor root is refused. One request per
line, JSON: ``{"cmd": "...", ...}``; one answer per line: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. What each command does is the handler's business
(``gateway.fleetops``); every command is journaled and logged there with the peer's uid.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway import safejson

log = logging.getLogger("gateway.control")

Handler = Callable[[dict[str, Any], str], Awaitable[Any]]
MAX_LINE = 64 * 1024


class ControlError(Exception):
    """A request the handler refuses (unknown device, bad arguments): sent back as the error."""


def peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", data)
    return int(uid)


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = Path(path)
        self.handler = handler
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.path.is_socket() or self.path.exists():
            if await _alive(self.path):
                raise OSError(f"control socket {self.path} is in use by another smp-gateway")
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._client, path=str(self.path),
                                                           limit=MAX_LINE)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        log.info("control socket %s (mode 0600, uid %d)", self.path, os.getuid())

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            self.path.unlink()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        uid = peer_uid(writer)
        try:
            if uid is not None and uid not in (os.getuid(), 0):
                log.warning("control: refused a peer with uid %d", uid)
                await _send(writer, {"ok": False, "error": "permission denied"})
                return
            actor = f"uid={uid}" if uid is not None else "uid=?"
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await _send(writer, {"ok": False, "error": "request too long"})
                    return
                if not line:
                    return
                try:  # outside input: depth-checked (a RecursionError is no ValueError)
                    req = safejson.loads(line)
                    if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                        raise ValueError("a JSON object with 'cmd'")
                    if "deadline" in req and (not isinstance(req["deadline"], int | float)
                                              or isinstance(req["deadline"], bool)):
                        raise ValueError("'deadline' is a number (seconds since the epoch)")
                except (ValueError, UnicodeDecodeError) as exc:
                    await _send(writer, {"ok": False, "error": f"bad request: {exc}"})
                    continue
                try:
                    result = await self.handler(req, actor)
                    await _send(writer, {"ok": True, "result": result})
                except ControlError as exc:
                    await _send(writer, {"ok": False, "error": str(exc)})
                except Exception as exc:
                    log.exception("control: %s failed", req.get("cmd"))
                    await _send(writer, {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def _send(writer: asyncio.StreamWriter, msg: dict[str, Any]) -> None:
    writer.write(json.dumps(msg, default=str).encode() + b"\n")
    await writer.drain()


async def _alive(path: Path) -> bool:
    try:
        _r, w = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 1.0)
    except (OSError, TimeoutError):
        return False
    w.close()
    return True


async def request(path: Path, req: dict[str, Any], timeout_s: float = 60.0) -> Any:
    """Client: one request; the result, or ControlError (one line) with the daemon's error,
    no answer within ``timeout_s`` or an answer that is not one (the socket's other end is
    outside input: depth-checked JSON, an object with a boolean ``ok``).

    The request carries ``deadline`` (wall clock, this host): when the client stops waiting.
    The daemon does not start acting on a device command after it (``fleetops``), so a command
    the operator was told failed does not run later, when the device is free."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=1 << 24),
                                                5.0)
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is the daemon running (smp-gateway run) "
                           "with this configuration?") from None
    except PermissionError:
        raise ControlError(f"permission denied on {path}: run ctl as the gateway's user") from None
    except (OSError, TimeoutError) as exc:
        raise ControlError(f"cannot connect to {path}: {exc}") from None
    try:
        writer.write(json.dumps({**req, "deadline": time.time() + timeout_s}).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout_s)
    except TimeoutError:
        raise ControlError(f"no answer from the daemon within {timeout_s:g}s (it is busy with the "
                           "device?); it does not start the request after that") from None
    except (ValueError, asyncio.LimitOverrunError):
        raise ControlError("the daemon's answer is too long") from None
    except OSError as exc:
        raise ControlError(f"control socket {path}: {exc}") from None
    finally:
        writer.close()
    if not line:
        raise ControlError("the daemon closed the connection without an answer")
    try:
        rsp = safejson.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"unusable answer on {path}: {str(exc)[:120]}") from None
    if not isinstance(rsp, dict) or not isinstance(rsp.get("ok"), bool):
        raise ControlError(f"unusable answer on {path}: not an object with a boolean 'ok'")
    if not rsp["ok"]:
        raise ControlError(str(rsp.get("error"))[:1000])
    return rsp.get("result")
