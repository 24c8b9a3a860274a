"""A serial link that follows its device to a new tty name.

Owns one thing: at every ``open`` (the engine re-opens a link it lost mid-upload or after a
reset), ask discovery where the device is *now*. A USB board unplugged mid-upload that comes
back as ``/dev/ttyACM1`` instead of ``/dev/ttyACM0`` is identified again by discovery (by what
it reports, not by its tty name), and the next re-open of the running session lands on the new
path: the upload resumes from the device's offset within the same attempt.
"""

from __future__ import annotations

from collections.abc import Callable

from gateway.smp.transport import SerialTransport


class FollowingSerialLink(SerialTransport):
    def __init__(self, resolve: Callable[[], str | None], port: str, baud: int = 115200,
                 line_length: int = 127, mtu: int | None = None) -> None:
        super().__init__(port, baud, line_length, mtu)
        self._resolve = resolve

    async def open(self) -> None:
        now = self._resolve()
        if now and now != self.port:
            self.port = now
        await super().open()
