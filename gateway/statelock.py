"""One writer per state directory: the exclusive lock a gateway holds while it drives devices.

Two gateway processes on one ``state_dir`` would both upload to, mark and reset the same
devices and journal over each other (a user started a second instance by hand beside the
service: four false UPDATE_FAILED reports). A gateway therefore takes an exclusive POSIX
record lock on ``<state_dir>/gateway.lock`` before it opens the journal, and refuses to start
with one line naming the holder's PID when another process holds it.

``fcntl.lockf`` (POSIX record locks) rather than ``flock``: the lock belongs to the process, so
a test or an embedding program that builds a second ``Gateway`` on the same directory in the
same process (a simulated restart) is not refused, while any other process is; the kernel drops
it when the holder dies (SIGKILL, power loss), so a stale lock file never blocks a restart.
Since closing any descriptor of the file drops the process's lock, the Gateways of one process
share one descriptor, closed with the last of them.
Readers that never write to devices (``status --offline``, ``ctl``) do not take it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from pathlib import Path

from gateway.schema import ConfigError

LOCK_NAME = "gateway.lock"


class StateDirInUse(ConfigError):
    """Another process holds the state directory's lock (exit 2, one line)."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="ascii", errors="replace")[:32].strip()
    except OSError:
        return "another process"
    return f"PID {text}" if text.isdigit() else "another process"


# lock file (real path) -> [descriptor, holders]: every Gateway of this process shares one
# descriptor, since closing *any* descriptor of the file drops the process's POSIX lock on it
_HELD: dict[str, list[int]] = {}
_HELD_LOCK = threading.Lock()


class StateDirLock:
    """Held from ``acquire()`` until ``release()`` (or the process ends)."""

    def __init__(self, state_dir: Path, config_path: str | Path = "<config>") -> None:
        self.state_dir = state_dir
        self.path = state_dir / LOCK_NAME
        self.config_path = config_path
        self._fd: int | None = None
        self._key = ""

    def acquire(self) -> None:
        """Create the state directory if needed and take the lock, or raise ``ConfigError``
        (``state_dir`` unusable) / ``StateDirInUse`` (held by another process)."""
        with _HELD_LOCK:
            self._acquire()

    def _acquire(self) -> None:
        where = str(self.state_dir)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = os.path.realpath(self.path)
            held = _HELD.get(key)
            if held is not None:  # this process holds it already: one more holder
                held[1] += 1
                self._fd, self._key = held[0], key
                return
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(self.config_path, "state_dir",
                              f"{where}: {exc.strerror or exc}; give a directory the gateway "
                              "user can create and write") from exc
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise StateDirInUse(self.config_path, "state_dir",
                                    f"{where} is in use by {_holder(self.path)} (another "
                                    "smp-gateway drives these devices); stop it or give this "
                                    "one its own state_dir") from exc
            raise ConfigError(self.config_path, "state_dir",
                              f"{where}: cannot lock {self.path.name}: {exc.strerror or exc}"
                              ) from exc
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd, self._key = fd, key
        _HELD[key] = [fd, 1]

    def release(self) -> None:
        with _HELD_LOCK:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            held = _HELD.get(self._key)
            if held is not None and held[0] == fd:
                held[1] -= 1
                if held[1] > 0:
                    return  # another Gateway of this process still holds it
                del _HELD[self._key]
            with contextlib.suppress(OSError):
                os.close(fd)  # the last holder: closing the descriptor drops the record lock
