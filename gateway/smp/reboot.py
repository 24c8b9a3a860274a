"""After ``os reset``: when the device has rebooted, judged by what it answers.

Owns ``reset_and_wait`` (every reset of an update and of a take-back sends it) and its parts:
``wait_reboot``, ``wait_answer``, ``state_key``, ``reboot_changes``. Mechanics only - which
reset may be sent, and when, is the caller's (the reset gate, the journal).

Zephyr's os_mgmt answers ``os reset`` first and reboots ``CONFIG_MCUMGR_GRP_OS_RESET_MS``
(250 ms) later (``os_mgmt_reset`` in zephyr/subsys/mgmt/mcumgr/grp/os_mgmt/src/os_mgmt.c; a
work item, so a busy or emulated device takes longer). A gap in its echoes is the first guess
that it went away; it is only a guess: an echo that merely came late (the host or an emulator
under load) looks the same, and the device then still answers from its old boot. Its image
state is the evidence (b): read just before the reset, a state with something a reboot into
MCUboot must change (a pending mark: swapped, copied, or refused and erased; a test-running
image: reverted) that the device still reports unchanged means it has not rebooted yet.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from smp.image_management import ImageState

from gateway.smp.session import SMPError, SMPSession, SMPTimeout
from gateway.smp.transport import TransportError

log = logging.getLogger("gateway.smp.reboot")

GONE_PROBE_S = 5.0  # how long to look for the gap after the reset's answer (a fast boot hides it)


def state_key(states: list[ImageState]) -> list[tuple[object, ...]]:
    """What a reboot can change in the device's image list, comparable."""
    return sorted((st.image or 0, st.slot, bytes(st.hash or b""), st.version, bool(st.active),
                   bool(st.confirmed), bool(st.pending), bool(st.permanent)) for st in states)


def reboot_changes(states: list[ImageState]) -> bool:
    """Whether a reboot into MCUboot must change this state: a pending mark or a test-running
    (active, unconfirmed) image."""
    return any(st.pending or (st.active and not st.confirmed) for st in states)


async def reopen(session: SMPSession) -> None:
    """A serial device that re-enumerates (USB CDC) or a closed socket: open again."""
    try:
        await session.close()
        await session.open()
    except TransportError as exc:
        log.debug("device=%s reopen failed: %s", session.device_id, exc)


async def state_before_reset(session: SMPSession) -> list[ImageState] | None:
    """The device's image state right before a reset (asked again like any read: one lost
    answer must not cost the evidence); None when it gives none - the reboot is then judged by
    the link alone. Never raises: this read only informs the wait, it never stops a reset."""
    try:
        return await session.image_state()
    except (SMPTimeout, SMPError, TransportError) as exc:
        log.debug("device=%s no state before the reset (%s)", session.device_id, exc)
        return None


async def wait_answer(session: SMPSession, deadline: float, timeout_s: float,
                      poll_s: float = 0.5) -> None:
    """Wait until the device answers an echo; SMPTimeout at ``deadline`` (``timeout_s``, the
    bound's name for the message). Any answer counts, an error too (a device out of buffers
    answers ENOMEM, ``smp_on_err``): it is up."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            await session.echo("boot?", timeout_s=min(1.0, max(0.2, deadline - time.monotonic())))
            return
        except SMPError:
            return
        except SMPTimeout as exc:
            last = exc
        except TransportError as exc:
            last = exc
            await reopen(session)
            await asyncio.sleep(poll_s)
    raise SMPTimeout(f"{session.device_id} did not come back within {timeout_s:g}s after a "
                     f"reset ({last})")


async def wait_reboot(session: SMPSession, timeout_s: float,
                      before: list[ImageState] | None = None, poll_s: float = 0.5) -> None:
    """After a reset: look (at most ``GONE_PROBE_S``) for the link to go away, then wait for
    the device to answer; with ``before`` (the state read just before the reset) holding
    something a reboot must change, also while the device reports exactly ``before`` (it has
    not rebooted yet). One bound for all of it: ``GONE_PROBE_S + timeout_s`` from the start
    (the old link-only wait's bound; plus one state read's timeout), SMPTimeout when the device
    goes silent and does not answer again by then. A device still reporting ``before`` at the
    end, or silent only on the read that crossed it, is left to the caller's own read (a
    bootloader that did not take the image, a reset that never arrived: sent again)."""
    start = time.monotonic()
    deadline = start + GONE_PROBE_S + timeout_s
    while time.monotonic() < start + GONE_PROBE_S:
        try:
            await session.echo("boot?", timeout_s=0.3)
        except SMPTimeout:
            break
        except TransportError:
            await reopen(session)
            break
        except SMPError:  # an answer, if an error one: still up
            pass
        await asyncio.sleep(0.1)
    await wait_answer(session, deadline, timeout_s, poll_s)
    if before is None or not reboot_changes(before):
        return
    key = state_key(before)
    while time.monotonic() < deadline:
        try:
            now = await session.image_state(retries=0)  # its full timeout, even at the deadline
        except (SMPTimeout, TransportError) as exc:
            if isinstance(exc, TransportError):
                await reopen(session)
            if time.monotonic() >= deadline:
                break  # past the bound: the caller's own read decides, as for an unchanged state
            await wait_answer(session, deadline, timeout_s, poll_s)  # it went away: its reboot
            continue
        except SMPError as exc:  # an error answer (busy, no memory): asked again, like a
            # garbled one; only a device without img_mgmt's state read ends the wait here
            log.debug("device=%s state after the reset: %s", session.device_id, exc)
            if exc.not_supported:
                return
            await asyncio.sleep(poll_s)
            continue
        if state_key(now) != key:
            return
        log.debug("device=%s still reports its state from before the reset: its reboot has "
                  "not happened yet", session.device_id)
        await asyncio.sleep(poll_s)
    log.info("device=%s shows no reboot %gs after the reset", session.device_id,
             GONE_PROBE_S + timeout_s)


async def reset_and_wait(session: SMPSession, timeout_s: float, poll_s: float = 0.5,
                         answered: Callable[[bool], None] | None = None) -> bool:
    """Read the state, send ``os reset``, wait for the reboot (``wait_reboot``); whether the
    reset was acknowledged (``answered`` is told as soon as that is known: the engine journals
    it before the wait). An unacknowledged reset is waited for the same way: its answer may be
    what was lost, and the device reboots all the same - a reset that never arrived costs the
    wait's bound, then the caller's read finds the state unchanged."""
    before = await state_before_reset(session)
    acked = await session.reset()
    if answered is not None:
        answered(acked)
    await wait_reboot(session, timeout_s, before, poll_s)
    return acked
