"""Developer kit: launch real Zephyr + MCUboot firmware on Renode for tests and benchmarks.

Owns starting and stopping one emulated board (``../shared/firmware/<name>/*.resc`` on the
prebuilt Renode in ``../shared/renode``): a private ``TMPDIR`` and PTY under the caller's work
directory, a FIFO as the monitor's stdin (no telnet port; see ``shared/renode/README.md``,
"Without Robot"), the console UART (usart1: MCUboot and Zephyr logs) in a file, and waiting
until the application answers an SMP echo on the usart2 PTY. Never imported by the daemon.

Where the shared folder is: ``$SMPGW_SHARED``, else ``<repository>/../shared``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from gateway.smp.session import SMPSession, SMPTimeout
from gateway.smp.transport import SerialTransport, TransportError

SHARED_ENV = "SMPGW_SHARED"
REPO_ROOT = Path(__file__).resolve().parent.parent


class RenodeError(RuntimeError):
    """Renode did not start, died, or the firmware did not answer in time."""


def shared_candidate() -> tuple[Path, str]:
    """The shared folder this checkout would use and where that choice came from."""
    env = os.environ.get(SHARED_ENV)
    if env:
        return Path(env).expanduser().resolve(), f"${SHARED_ENV}"
    return (REPO_ROOT.parent / "shared").resolve(), f"default <repository>/../shared (set ${SHARED_ENV})"


def shared_dir() -> Path | None:
    """``$SMPGW_SHARED`` or ``<repo>/../shared`` if it holds the Renode runtime, else None."""
    path, _ = shared_candidate()
    return path if (path / "renode" / "renode").is_file() else None


def _require_shared() -> Path:
    path = shared_dir()
    if path is None:
        cand, why = shared_candidate()
        raise FileNotFoundError(
            f"Renode runtime not found: {cand / 'renode' / 'renode'} is missing ({why}). "
            f"Point ${SHARED_ENV} at the folder holding renode/ and firmware/.")
    return path


def firmware_dir(name: str) -> Path:
    """``<shared>/firmware/<name>`` (e.g. ``stm32f4_disco``) with its ``.resc``."""
    path = _require_shared() / "firmware" / name
    if not (path / "stm32f4_disco_mcuboot.resc").is_file():
        have = sorted(p.name for p in (path.parent.iterdir() if path.parent.is_dir() else []))
        raise FileNotFoundError(
            f"firmware {name!r} not found: {path / 'stm32f4_disco_mcuboot.resc'} is missing "
            f"(available in {path.parent}: {', '.join(have) or 'none'})")
    return path


def renode_binary() -> Path:
    return _require_shared() / "renode" / "renode"


def renode_test_binary() -> Path:
    return _require_shared() / "renode" / "renode-test"


def _monitor_path(p: Path) -> str:
    s = str(p.resolve())
    if any(c.isspace() for c in s) or '"' in s:
        # the monitor's @path token ends at white space
        raise ValueError(f"{s}: Renode monitor paths may not contain spaces or quotes")
    return s


class RenodeMachine:
    """One emulated board: ``async with RenodeMachine(firmware_dir("stm32f4_disco"), work) as m``.

    ``pty`` is the SMP port (usart2) to give to any SMP client, ``console`` the usart1 log
    (MCUboot + Zephyr). ``slot0_image`` replaces the .resc's slot0 image; ``loads`` are extra
    ``(file, address)`` pairs written to flash before the first boot (e.g. a slot1 image).
    """

    def __init__(self, firmware: Path, workdir: Path, *, slot0_image: Path | None = None,
                 loads: Sequence[tuple[Path, int]] = ()) -> None:
        self.firmware = Path(firmware).resolve()
        self.resc = self.firmware / "stm32f4_disco_mcuboot.resc"
        if not self.resc.is_file():
            raise FileNotFoundError(f"{self.resc}: no Renode script in the firmware folder")
        self.workdir = Path(workdir).resolve()
        self.slot0_image = slot0_image
        self.loads = list(loads)
        self.pty = self.workdir / "smp-uart"
        self.console = self.workdir / "console.log"
        self.log = self.workdir / "renode.log"
        self.tmpdir = self.workdir / "tmp"  # never $TMPDIR/renode-*: Renode cleans those
        self.fifo = self.workdir / "monitor.fifo"
        self.proc: asyncio.subprocess.Process | None = None
        self._fifo_fd = -1
        self.started_at = 0.0

    # -- lifecycle -----------------------------------------------------------------------
    def _script(self) -> str:
        cmds = [f'$pty="{_monitor_path(self.pty)}"']
        if self.slot0_image is not None:
            cmds.append(f"$slot0_image=@{_monitor_path(Path(self.slot0_image))}")
        cmds.append(f"include @{_monitor_path(self.resc)}")
        cmds += [f"sysbus LoadBinary @{_monitor_path(Path(f))} {addr:#x}" for f, addr in self.loads]
        cmds.append(f"usart1 CreateFileBackend @{_monitor_path(self.console)} true")
        cmds.append("start")
        return "; ".join(cmds)

    async def start(self, *, ready_timeout_s: float = 60) -> None:
        """Boot the board and return once the application answers an SMP echo on ``pty``."""
        if self.proc is not None:
            raise RenodeError("machine already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tmpdir.mkdir(exist_ok=True)
        for p in (self.pty, self.console, self.fifo):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        os.mkfifo(self.fifo)
        # opened read-write: the monitor's stdin never sees EOF, and our writes never block
        self._fifo_fd = os.open(self.fifo, os.O_RDWR)
        env = dict(os.environ, TMPDIR=str(self.tmpdir))
        with open(self.log, "wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                str(renode_binary()), "--console", "--plain", "--disable-gui", "-e", self._script(),
                stdin=self._fifo_fd, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.workdir, start_new_session=True)
        self.started_at = time.monotonic()
        try:
            await self.wait_smp(timeout_s=ready_timeout_s)
        except BaseException:
            await self.stop()
            raise

    async def wait_smp(self, *, timeout_s: float) -> float:
        """Wait until the application answers an SMP echo; returns the seconds waited."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            self._check_alive()
            if self.pty.exists():
                try:
                    async with SMPSession(SerialTransport(str(self.pty)), device_id="renode",
                                          timeout_s=1.0) as s:
                        await s.echo("ready?", timeout_s=1.0)
                        return time.monotonic() - t0
                except (SMPTimeout, TransportError) as exc:
                    last = exc
            await asyncio.sleep(0.2)
        raise RenodeError(f"no SMP echo on {self.pty} within {timeout_s:g}s (last: {last}); "
                          f"Renode log {self.log}, console {self.console}:\n{self.tail()}")

    def _check_alive(self) -> None:
        if self.proc is None:
            raise RenodeError("machine not started")
        if self.proc.returncode is not None:
            raise RenodeError(f"Renode exited with status {self.proc.returncode}; log {self.log}:\n"
                              f"{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        out = []
        for p in (self.log, self.console):
            with contextlib.suppress(OSError):
                text = p.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {p.name}\n" + "\n".join(text))
        return "\n".join(out)

    async def monitor(self, command: str) -> None:
        """Send one Renode monitor command (fire and forget; output goes to ``log``)."""
        self._check_alive()
        if "\n" in command:
            raise ValueError("one monitor command at a time")
        os.write(self._fifo_fd, (command + "\n").encode())

    def console_text(self, after: int = 0) -> str:
        try:
            with open(self.console, "rb") as f:
                f.seek(after)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def console_size(self) -> int:
        try:
            return self.console.stat().st_size
        except FileNotFoundError:
            return 0

    async def wait_console(self, text: str, *, timeout_s: float, after: int = 0) -> int:
        """Wait (wall time) for ``text`` on usart1 past byte ``after``; returns the offset just
        after the match, to chain waits."""
        deadline = time.monotonic() + timeout_s
        raw = text.encode()
        while True:
            try:
                with open(self.console, "rb") as f:
                    f.seek(after)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            i = data.find(raw)
            if i >= 0:
                return after + i + len(raw)
            self._check_alive()
            if time.monotonic() >= deadline:
                raise RenodeError(f"{text!r} not seen on the console within {timeout_s:g}s; "
                                  f"{self.tail()}")
            await asyncio.sleep(0.1)  # a file has no readiness event: poll it

    async def reset_keep_flash(self) -> None:
        """Reset the board from the monitor (like a reset button / power glitch): CPU and
        peripherals restart, the flash model keeps its contents, the .resc's reset macro runs."""
        await self.monitor("machine Reset")

    async def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(OSError):
                os.write(self._fifo_fd, b"quit\n")
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                # only our own process group (start_new_session): Renode and its children
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        self.proc = None
        if self._fifo_fd >= 0:
            os.close(self._fifo_fd)
            self._fifo_fd = -1
        with contextlib.suppress(FileNotFoundError):
            self.fifo.unlink()

    async def __aenter__(self) -> RenodeMachine:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
