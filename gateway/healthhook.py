"""The user-defined health check that must pass before the gateway confirms an image.

Owns running ``health_check:`` of a device config (``gateway.config.HealthCheckHook``) once
the new image has kept answering for ``health_check_s``:

* ``command: [...]`` - run without a shell, with the device's id, the new version, its
  transport and address and the image hash in its environment (``SMPGW_DEVICE_ID``,
  ``SMPGW_VERSION``, ``SMPGW_OLD_VERSION``, ``SMPGW_TRANSPORT``, ``SMPGW_ADDRESS``,
  ``SMPGW_IMAGE_HASH``); exit status 0 = healthy;
* ``smp: {group, command, op, body, expect_contains}`` - one SMP request on the update's own
  session that must be answered with success (and contain ``expect_contains``).

The verdict rests on (c) the gateway's configuration (which check) and (b) what the device or
the user's check answers; the hook is bounded like any input from outside: ``timeout_s``
(a command that does not end is killed - its whole process group - and counts as failed),
``max_output_bytes`` of its output kept (the rest is read and discarded, never buffered).
The command is judged by its own exit status within its own timeout: once it has exited its
output is read for at most ``DRAIN_S`` more - a process it left behind (``setsid``, a daemon)
that keeps the pipe open is never waited for (``asyncio``'s ``Process.wait`` would: it waits
for the pipes to close too).
Anything but a clear pass is a failure: the engine then does not confirm, resets so MCUboot
reverts, and reports ``rolled-back`` with the hook's output (``UpdateEngine._after_boot``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass

from gateway.config import DeviceConfig, HealthCheckHook
from gateway.devcmd import raw_request
from gateway.inventory import record as inventory_record
from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import TransportError

READ_CHUNK = 4096
DRAIN_S = 2.0  # output still read after the command exited (a leftover process may hold it)


@dataclass
class HookResult:
    ok: bool
    detail: str  # what the hook said (bounded), for the outcome and the journal


def hook_env(dev: DeviceConfig, version: str, old_version: str | None, image_hash: str) -> dict[str, str]:
    addr = inventory_record(dev).get("address")
    return {**os.environ, "SMPGW_DEVICE_ID": dev.id, "SMPGW_VERSION": version,
            "SMPGW_OLD_VERSION": old_version or "", "SMPGW_TRANSPORT": dev.transport.kind,
            "SMPGW_ADDRESS": str(addr or ""), "SMPGW_IMAGE_HASH": image_hash,
            "SMPGW_HARDWARE": dev.hardware}


class _Output:
    """A command's output: at most ``cap`` bytes kept, the rest counted and dropped."""

    def __init__(self, cap: int) -> None:
        self.cap, self.kept, self.total = cap, bytearray(), 0


async def _read_bounded(stream: asyncio.StreamReader, out: _Output) -> None:
    """Read to EOF into ``out`` (what was read stays there if this is cancelled)."""
    while True:
        chunk = await stream.read(READ_CHUNK)
        if not chunk:
            return
        out.total += len(chunk)
        if len(out.kept) < out.cap:
            out.kept += chunk[: out.cap - len(out.kept)]


def _text(out: bytes, total: int) -> str:
    s = out.decode("utf-8", "replace").strip()
    if total > len(out):
        s += f" [... {total - len(out)} more bytes discarded]"
    return s


class _ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Says when the process itself exited (``exited``), whoever still holds its pipes."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited: asyncio.Future[None] = loop.create_future()

    def process_exited(self) -> None:
        super().process_exited()
        if not self.exited.done():
            self.exited.set_result(None)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # the whole group: a shell's children too


async def run_command(hook: HealthCheckHook, env: dict[str, str]) -> HookResult:
    """The command's verdict: its own exit status within ``timeout_s`` (killed past it)."""
    assert hook.command is not None
    argv = list(hook.command)
    loop = asyncio.get_running_loop()
    try:
        transport, protocol = await loop.subprocess_exec(
            lambda: _ExitProtocol(READ_CHUNK * 16, loop), *argv,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as exc:
        return HookResult(False, f"health check command {argv[0]!r} could not start: {exc}")
    proc = asyncio.subprocess.Process(transport, protocol, loop)
    assert proc.stdout is not None
    out = _Output(hook.max_output_bytes)
    reader = asyncio.create_task(_read_bounded(proc.stdout, out))
    try:
        try:
            await asyncio.wait_for(asyncio.shield(protocol.exited), hook.timeout_s)
        except TimeoutError:
            _kill_group(proc.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(protocol.exited), 5.0)
            return HookResult(False, f"health check command timed out after {hook.timeout_s:g}s "
                                     "(killed)")
        # exited: its output up to EOF - or, when something it left behind holds the pipe,
        # what came within DRAIN_S (that process is not the hook, its lifetime is not waited for)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reader), DRAIN_S)
        if not reader.done():
            _kill_group(proc.pid)  # leftovers in the hook's own process group
    finally:
        if proc.returncode is None:  # cancelled (shutdown): never leave it running
            _kill_group(proc.pid)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        transport.close()  # its pipes, also those a leftover process still holds
    text = _text(bytes(out.kept), out.total)
    if proc.returncode == 0:
        return HookResult(True, f"health check command passed{': ' + text if text else ''}")
    return HookResult(False, f"health check command exited {proc.returncode}"
                             f"{': ' + text if text else ''}")


def _flatten(v: object, out: list[str], depth: int = 0) -> None:
    if depth > 8:
        return
    if isinstance(v, dict):
        for k, x in v.items():
            out.append(str(k))
            _flatten(x, out, depth + 1)
    elif isinstance(v, list | tuple):
        for x in v:
            _flatten(x, out, depth + 1)
    elif isinstance(v, bytes | bytearray):
        out.append(bytes(v).hex())
    else:
        out.append(str(v))


async def run_smp(hook: HealthCheckHook, session: SMPSession) -> HookResult:
    q = hook.smp
    assert q is not None
    what = f"SMP group {q.group} command {q.command} ({q.op})"
    try:
        body = await asyncio.wait_for(
            raw_request(session, 2 if q.op == "write" else 0, q.group, q.command, q.body,
                        timeout_s=hook.timeout_s), hook.timeout_s + 1.0)
    except (SMPError, SMPTimeout, TransportError, TimeoutError) as exc:
        return HookResult(False, f"health check {what} failed: {type(exc).__name__}: {exc}")
    parts: list[str] = []
    _flatten(body, parts)
    text = " ".join(parts)
    shown = text[: hook.max_output_bytes]
    if q.expect_contains is not None and q.expect_contains not in text:
        return HookResult(False, f"health check {what}: the answer does not contain "
                                 f"{q.expect_contains!r}: {shown}")
    return HookResult(True, f"health check {what} passed: {shown}")


async def run_hook(dev: DeviceConfig, session: SMPSession, version: str, old_version: str | None,
                   image_hash: str) -> HookResult | None:
    """The device's hook, if it has one (None: none configured). Never raises for what the
    hook does; a crash of the hook machinery itself is a failed check."""
    hook = dev.health_check
    if hook is None:
        return None
    try:
        if hook.command is not None:
            return await run_command(hook, hook_env(dev, version, old_version, image_hash))
        return await run_smp(hook, session)
    except (OSError, ValueError) as exc:
        return HookResult(False, f"health check could not run: {type(exc).__name__}: {exc}")
