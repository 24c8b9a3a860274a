"""The orchestrator: ``UpdateEngine``, one device's attempt from start to outcome.

Owns the public entry points and how an attempt ends: ``run`` (bounded by (c)
``timeouts.attempt_s``, ``_attempt_s``; every exception becomes a journalled outcome,
``_crashed``), and the group phases ``confirm`` and ``revert``. The steps themselves are the
mixins it is built from (``plan`` -> ``upload`` -> ``mark_reset`` -> ``verify_confirm`` /
``take_back``; ``image_set``; ``recovery``), sharing ``state.EngineState``. Writes
``Step.CONFIRM`` (a group's decision to confirm); everything else through the steps.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3

from gateway.engine.model import (
    Outcome,
    Slots,
    Stage,
    Status,
    Step,
    _Finish,
)
from gateway.engine.plan import PlanStep
from gateway.images import (
    ImageRefused,
    VerifiedImage,
    VerifiedImageSet,
)
from gateway.smp.session import SMPError, SMPTimeout, UploadError
from gateway.smp.transport import TransportError
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


class UpdateEngine(PlanStep):
    """Drives one device through one update. Create one per (device, image) attempt."""


    async def run(self, image: VerifiedImage, slots: Slots | None = None,
                  artifact_id: str | None = None, source: str | None = None,
                  until: Stage = Stage.CONFIRMED) -> Outcome:
        """The flow up to ``until``; short of CONFIRMED it returns Status.HELD at that stage
        (the journal row stays open, so a restart resumes it)."""
        self.until = until
        # (c) the gateway's own configuration bounds the attempt in time: a device that keeps
        # answering without getting anywhere cannot hold its lock and a max_concurrent slot
        limit = self._attempt_s(image)
        bound = asyncio.timeout(limit)
        try:
            async with bound:
                return await self._run(image, slots, artifact_id, source)
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, UploadError, SMPError) as exc:
            result = (UpdateResult.CONNECTION_LOST if isinstance(exc, SMPTimeout | TransportError)
                      else UpdateResult.UPDATE_FAILED)
            return self._finish(Status.FAILED, result, f"{type(exc).__name__}: {exc}", image).outcome
        except TimeoutError as exc:
            if not bound.expired():
                return self._crashed("update", exc, image, None)
            return self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                f"attempt not finished within {limit:.0f}s (timeouts.attempt_s) "
                                f"at step {self.entry.step}: given up", image).outcome
        except Exception as exc:
            return self._crashed("update", exc, image, None)

    async def confirm(self, image: VerifiedImage) -> Outcome:
        """Group phase: confirm the image the device test-runs - only if this gateway tested it."""
        self.until = Stage.CONFIRMED
        old_v = self.entry.old_version
        try:
            slots = await self.read_slots()
            if slots.active_hash == image.hash:
                if slots.active and slots.active.confirmed:
                    raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                       f"running {image.version}, confirmed", image, old_v)
                self._step(Step.CONFIRM, "group decision: confirm")
                return await self._confirm(image, old_v)
            return self._rolled_back(image, slots, old_v, True)
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, SMPError) as exc:
            return self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                                f"confirm: {type(exc).__name__}: {exc}", image, old_v).outcome
        except Exception as exc:
            return self._crashed("confirm", exc, image, old_v)

    async def revert(self, image: VerifiedImage, reason: str) -> Outcome:
        """Group phase: take the device back to its previous image.

        A device test-running ``image`` (booted, unconfirmed) is reset: MCUboot reverts it. A
        device that was never reset is not touched: if the image is still pending there, img_mgmt
        cannot un-pend it (no erase of a pending slot), so the group flow marks nobody before
        every member holds its image. A confirmed image cannot be reverted (reported FAILED).
        """
        self.until = Stage.CONFIRMED
        old_v = self.entry.old_version
        try:
            slots = await self.read_slots()
            if slots.active_hash == image.hash:
                if slots.active and slots.active.confirmed:
                    raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                       f"{reason}; {image.version} is already confirmed here and "
                                       "cannot be reverted", image, old_v)
                now = await self._reset_to_revert(image, old_v, reason, "the reset that reverts it",
                                                  f"group revert: {reason}")
                raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                                   f"{reason}; reset, MCUboot reverted to {now}", image, old_v)
            now = slots.running or "?"
            if slots.other_hash == image.hash and slots.other and slots.other.pending:
                # FAILED, not rolled back: the journal keeps tested_hash for the next attempt
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"{reason}; not reset, still on {now} ({image.version} stays "
                                   "pending: img_mgmt cannot un-pend it; it will test-boot at the "
                                   "next reset and be reverted at the one after)", image, old_v)
            raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                               f"{reason}; not reset, still on {now}", image, old_v)
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, SMPError) as exc:
            return self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                                f"revert: {type(exc).__name__}: {exc}", image, old_v).outcome
        except Exception as exc:
            return self._crashed("revert", exc, image, old_v)

    def _crashed(self, what: str, exc: Exception, image: VerifiedImage,
                 old_v: str | None) -> Outcome:
        """An unexpected exception (a bug, a store problem): this device's attempt fails -
        journaled with the outcome, logged with the traceback - and nothing else is affected.
        The journal keeps what was done (tested_hash...), so the next attempt resumes as after
        any other failure. The gateway's own disk failing (OSError, SQLite) goes up to the
        daemon, which names the state directory to fix."""
        if isinstance(exc, OSError | sqlite3.Error):
            raise exc
        log.error("device=%s %s failed with an unexpected error: %s: %s", self.dev.id, what,
                  type(exc).__name__, exc, exc_info=exc)
        result = exc.reason.lwm2m if isinstance(exc, ImageRefused) else UpdateResult.UPDATE_FAILED
        return self._finish(Status.FAILED, result,
                            f"{what}: internal error {type(exc).__name__}: {exc}", image,
                            old_v).outcome

    def _attempt_s(self, image: VerifiedImage) -> float:
        """(c) how long one attempt may take: ``timeouts.attempt_s``, else the upload's bound
        (every image of a set) plus the resets, waits and checks that follow."""
        t = self.dev.timeouts
        if t.attempt_s is not None:
            return t.attempt_s
        members = image.members if isinstance(image, VerifiedImageSet) else ()
        upload = (sum(self._upload_s(m.verified.size) for m in members) if members
                  else self._upload_s(image.size))
        return upload + 3 * t.reset_s + t.app_confirm_s + self.dev.health_check_s + 300.0
