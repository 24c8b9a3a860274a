"""Mark-and-reset step: the test mark (journal first), then the reset into the test boot.

Owns ``MarkResetStep._mark_and_reset`` (through the reset gate; the mark, or none in a mode
whose reset installs the newest image, then (b) the device must report it pending) and
``_reset_and_verify`` (an unanswered reset is re-sent only while the device still runs the old
image with the target pending). Writes ``Step.MARK_TEST`` (with ``tested_hash``, before the
mark is sent), ``Step.RESET`` and ``Step.WAIT_BOOT``.
"""
from __future__ import annotations

import logging

from gateway.bootmodes.flows import Mark
from gateway.engine.model import (
    Outcome,
    Slots,
    Stage,
    Status,
    Step,
)
from gateway.engine.verify_confirm import VerifyConfirmStep
from gateway.images import (
    VerifiedImage,
)
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


class MarkResetStep(VerifyConfirmStep):
    """The mark-and-reset step (see the module docstring)."""

    async def _mark_and_reset(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """Mark the uploaded image (journal first), then reset into the test boot."""
        flow = self.flow
        assert flow is not None
        target = image.hash
        th = target.hex()
        self._gate("the mark and the reset into the test boot", image, old_v)

        # 4. mark (journal first: from here on this gateway owns the test / the install)
        if flow.mark == Mark.NONE:
            # nothing to write: the reset installs it (the newest valid image runs)
            self._step(Step.MARK_TEST, f"hash={th[:16]} {flow.mode.value}: no mark, the reset "
                       "installs it", tested_hash=th)
            post = await self.read_slots()
            if not (post.other_hash == target and post.other is not None):
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "before the reset the device no longer reports the uploaded "
                                   "image: not reset", image, old_v)
        else:
            self._step(Step.MARK_TEST, f"hash={th[:16]}", tested_hash=th)
            states = await self.s.image_test(target)
            post = Slots.parse(states, self.dev.image)
            if not (post.other_hash == target and post.other and post.other.pending):
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   "device did not mark the image pending", image, old_v)
        self._hold(Stage.MARKED, image, old_v)
        return await self._reset_and_verify(image, old_v)

    async def _reset_and_verify(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """Reset into the test boot. A reset whose answer never came may never have reached the
        device: if it still runs the old image with ``image`` pending (so nothing booted), it is
        sent again - safe, as the state was read just before: a pending image test-boots at a
        reset, nothing can be reverted. An acknowledged reset is never repeated."""
        self._gate("the reset into the test boot", image, old_v)
        for attempt in range(1, 4):
            self._step(Step.RESET, f"attempt {attempt}" if attempt > 1 else "")
            acked = await self._reset()
            self._reset_here = True
            if acked or attempt == 3:
                break
            slots = await self.read_slots()
            if not (slots.active_hash != image.hash and slots.other_hash == image.hash
                    and slots.other is not None and slots.other.pending):
                break
            log.warning("device=%s reset unanswered and %s still pending: the reset did not reach "
                        "the device; resetting again", self.dev.id, image.version)
        return await self._after_boot(image, old_v, reset_acked=acked)
