"""Take-back step: a test-running image reset back (revert), and a rollback reported.

Owns ``TakeBackStep._reset_to_revert`` (through the reset gate (c), journalled first; (b) the
device must no longer run the image afterwards) and ``_rolled_back`` (what the device's state
says happened to an image that does not run: refused at boot, reverted, or never reset).
Writes ``Step.RESET`` and ``Step.WAIT_BOOT``; the rollback through ``_finish``
(``Step.ROLLED_BACK`` or ``Step.FAILED``).
"""
from __future__ import annotations

import logging

from gateway.engine.model import (
    Outcome,
    Slots,
    Status,
    Step,
)
from gateway.engine.state import EngineState
from gateway.images import (
    VerifiedImage,
)
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


class TakeBackStep(EngineState):
    """The take-back step (see the module docstring)."""

    async def _reset_to_revert(self, image: VerifiedImage, old_v: str | None, reason: str,
                               gate_what: str, step_detail: str) -> str:
        """Reset a device test-running ``image`` so MCUboot reverts it: through the reset gate
        (c), journalled first; the version it runs afterwards, or FAILED when the device (b)
        still runs ``image`` after the reset."""
        self._gate(gate_what, image, old_v)
        self._step(Step.RESET, step_detail)
        await self._reset("revert reset acknowledged")
        slots = await self.read_slots()
        if slots.active_hash == image.hash:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{reason}; reset to revert, but the device still runs "
                               f"{image.version} unconfirmed", image, old_v)
        return slots.running or "?"

    def _rolled_back(self, image: VerifiedImage, slots: Slots, old_v: str | None,
                     reset_acked: bool) -> Outcome:
        target = image.hash
        other = slots.other
        if slots.other_hash == target and other is not None and other.pending:
            if reset_acked:
                # The link worked and the device acknowledged the reset: the bootloader did not
                # take the pending image (LwM2M 8, update failed), the link is not to blame.
                detail = ("the device acknowledged the reset but its bootloader did not take the "
                          f"image: {image.version} is still pending in the secondary slot and "
                          f"{slots.running or '?'} runs (the bootloader "
                          "may not be in a swap mode, or the device did not actually reset)")
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED, detail, image, old_v)
            detail = ("the reset request went unanswered and the device still runs "
                      f"{slots.running or '?'} with {image.version} "
                      "pending: the reset probably never reached it")
            raise self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST, detail, image, old_v)
        flow = self.flow
        now = slots.running or "?"
        if slots.other_hash == target:
            detail = (flow.reverted(image, now) if flow is not None else
                      f"rollback: {image.version} booted but was not confirmed before the next "
                      f"reset (crash or watchdog); MCUboot reverted to {now}")
        elif self.seen_running and flow is not None:
            detail = flow.reverted(image, now)
        else:
            detail = (flow.refused_at_boot(image, now) if flow is not None else
                      f"rollback: MCUboot refused {image.version} at boot; still running {now}")
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED, detail, image, old_v)
