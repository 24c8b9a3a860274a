"""How a Zephyr device takes SMP lines off its serial port: which lines survive.

Owns the line-level receive model of the simulator's serial transports (the PTY endpoint in
``device.py`` feeds it the bytes the link delivers and decodes the lines it keeps):

``uart`` (Zephyr 3.4 ``drivers/console/uart_mcumgr.c`` + ``subsys/mgmt/mcumgr/transport/
src/smp_uart.c``): the UART ISR (``uart_mcumgr_rx_byte``) needs a free RX buffer from a
k_mem_slab of ``rx_buf_count`` buffers when a line starts; with none free it ignores the
line up to its ``\\n`` ("Insufficient buffers; drop this fragment"), and a line longer than
``rx_buf_size`` is dropped too ("Line too long"). Complete lines go to a k_fifo and
``smp_uart_rx_frag`` submits ``smp_uart_work`` to the *system* work queue (priority -1,
cooperative, read from the Renode build: ``k_sys_work_q_init`` starts it with -1, ``smp_init``
the SMP queue with 3), which decodes the line into the frame's net_buf and frees the RX buffer
(``smp_uart_process_frag``). Being higher priority than the SMP work queue, it runs while a
request is handled: a buffer is free again ``work_latency_s`` after its line ended. Only a
CPU stall (``stalls``: the CPU executes from the flash being erased/written) delays it, and
bytes arriving during a stall overrun the UART's receive register: their line is lost.
With ``free_when_idle`` (Renode's emulated USART, measured on the shared stm32f4_disco
firmware): Renode queues every byte the host wrote and keeps RXNE set while its queue is not
empty, so ``uart_mcumgr_isr`` keeps reading and the work queue does not run until the input
*pauses*: the line buffers are freed only ``work_latency_s`` after the last byte of a
continuous run of input. A frame of more than ``buf_count`` lines written at once loses its
later lines, a second frame written right behind the first is lost, and the same lines written
with a pause between them all pass (2026-12-01: 266-byte packets, 3 lines, lost 27 % of
chunks written at once and none with 20 ms between lines; 380-byte packets, 5 lines, none
paced, almost all at once).

``shell`` (``subsys/mgmt/mcumgr/transport/src/smp_shell.c`` ``smp_shell_rx_bytes``, called
from the shell UART ISR, ``subsys/shell/backends/shell_uart.c``): each line goes into one of
``rx_buf_count`` net_bufs of 127 bytes (bytes beyond a full buffer are not stored, so the line
is corrupt); the buffers are handed to the shell thread (``smp_shell_process``), which runs at
K_LOWEST_APPLICATION_THREAD_PRIO and so only while the SMP work queue is idle. Lines that
arrive while SMP is busy wait in the buffers; with none free the line is lost
("Failed to alloc SMP buf"). With ``free_when_idle`` (the ``native_sim`` shell build of
``shared/zephyr-native``, whose shell UART is polled: the poll loop takes every byte the host
wrote before the shell thread runs) the buffers are freed only at a pause in the input, as for
Renode's USART above: a frame of 3 lines written at once loses its third (the kit's README: 182
bytes answered, 183 lost; with 50 ms between lines 380 answered).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class LineRx:
    """Line acceptance state of one serial SMP transport (times are event-loop seconds)."""

    kind: str  # "uart" | "shell"
    buf_count: int
    buf_size: int
    work_latency_s: float = 0.0
    # (start, end) windows in which the CPU does not run (flash erase/programming)
    stalls: list[tuple[float, float]] = field(default_factory=list)
    # RX buffers are freed only once the input pauses (Renode's USART, native_sim's shell)
    free_when_idle: bool = False
    _pending: int = 0  # free_when_idle: buffers holding lines, freed at the next pause
    _last_t: float | None = None  # when the last byte arrived
    # uart: release times of the buffers holding complete lines not yet freed
    _held_until: list[float] = field(default_factory=list)
    # shell: lines waiting for the shell thread
    waiting: list[bytes] = field(default_factory=list)
    _cur: bytearray = field(default_factory=bytearray)
    _cur_ok: bool = True
    _cur_start: float | None = None
    counters: dict[str, int] = field(default_factory=dict)

    def _count(self, key: str) -> None:
        self.counters[key] = self.counters.get(key, 0) + 1

    def reset(self) -> None:
        self._pending = 0
        self._last_t = None
        self._held_until.clear()
        self.waiting.clear()
        self._cur.clear()
        self._cur_ok = True
        self._cur_start = None

    def _in_stall(self, t0: float, t1: float) -> float | None:
        """End of a stall overlapping [t0, t1], if any."""
        for a, b in self.stalls:
            if a < t1 and t0 < b:
                return b
        return None

    def prune(self, now: float) -> None:
        self.stalls = [(a, b) for a, b in self.stalls if b > now - 5.0]

    def _free_at(self, line_end: float) -> float:
        t = line_end + self.work_latency_s
        end = self._in_stall(line_end, t)
        while end is not None:  # the work queue runs when the CPU runs again
            t = end + self.work_latency_s
            end = self._in_stall(end, t)
        return t

    def feed(self, data: bytes, t_first: float, t_last: float, *, smp_busy: bool,
             emit: Callable[[bytes], None]) -> None:
        """Bytes ``data`` arrived, the first at ``t_first``, the last at ``t_last``.

        ``emit`` gets each line the device keeps (with its ``\\n``); ``smp_busy`` (shell) says
        whether the SMP work queue is handling a request, so the shell thread cannot run.
        """
        n = len(data)
        step = (t_last - t_first) / (n - 1) if n > 1 else 0.0
        if self._pending and self._last_t is not None and (
                t_first - self._last_t > self.work_latency_s + step):
            # the input paused long enough for the work queue to run: the lines are taken
            if self.kind == "uart":
                self._held_until += [self._last_t + self.work_latency_s] * self._pending
            self._pending = 0
        self._last_t = t_last
        pos = 0
        while pos < n:
            nl = data.find(b"\n", pos)
            end = n - 1 if nl < 0 else nl
            t_a = t_first + pos * step
            t_b = t_first + end * step
            piece = data[pos:end + 1]
            if self._cur_start is None:
                self._line_start(t_a)
            if self._cur_ok:
                if self._in_stall(t_a, t_b) is not None:
                    self._cur_ok = False  # overrun while the CPU was halted
                    self._count("rx_lines_overrun")
                elif len(self._cur) + len(piece) > self.buf_size:
                    # uart: dropped ("Line too long"); shell: stored only up to the buffer's
                    # end, so the frame's base64/CRC check fails: lost either way
                    self._cur_ok = False
                    self._count("rx_lines_too_long")
                else:
                    self._cur += piece
            if nl < 0:
                break
            self._line_end(t_b, smp_busy, emit)
            pos = nl + 1

    def _line_start(self, t: float) -> None:
        self._cur_start = t
        self._cur.clear()
        if self.kind == "uart":
            self._held_until = [u for u in self._held_until if u > t]
            self._cur_ok = len(self._held_until) + self._pending < self.buf_count
        else:
            self._cur_ok = len(self.waiting) + self._pending < self.buf_count
        if not self._cur_ok:
            self._count("rx_lines_no_buffer")

    def _line_end(self, t: float, smp_busy: bool, emit: Callable[[bytes], None]) -> None:
        line, ok = bytes(self._cur), self._cur_ok
        self._cur.clear()
        self._cur_start = None
        self._cur_ok = True
        if not ok:
            return
        self._count("rx_lines")
        if self.kind == "uart":
            if self.free_when_idle:
                self._pending += 1
            else:
                self._held_until.append(self._free_at(t))
            emit(line)
        elif smp_busy:
            self.waiting.append(line)
        elif self.free_when_idle:
            self._pending += 1  # its buffer is freed at the next pause in the input
            emit(line)
        else:
            emit(line)

    def drain(self, emit: Callable[[bytes], None]) -> None:
        """Shell: the SMP work queue went idle, the shell thread decodes the waiting lines."""
        lines, self.waiting = self.waiting, []
        for line in lines:
            emit(line)
