"""Verify-and-confirm step: the booted image is checked, watched, and only then made permanent.

Owns ``VerifyConfirmStep._after_boot`` (b: the device runs the target), the health window and
the user's ``health_check:`` hook (``_user_health_check``), ``_confirm`` (only the image this
gateway tested, never after an open cancel, never blindly re-sent), ``_wait_app_confirm``
(``confirm: app``), ``_after_install`` (modes without a test boot) and ``_check_permanent``
(the health window and hook of any image permanent without the gateway's confirm: no test
boot, an application that confirms itself, a trailer torn by a power cut, a bootloader
install; a failure is reported, never reverted). Writes ``Step.VERIFY``,
``Step.CONFIRM`` (the health check, the hook's verdict, and ``CONFIRM_SENT`` before every
confirm) and ``Step.WAIT_APP``.
"""
from __future__ import annotations

import asyncio
import logging
import time

from gateway.engine.model import (
    CONFIRM_SENT,
    CONFIRMED_ELSEWHERE,
    Outcome,
    Slots,
    Stage,
    Status,
    Step,
    _Finish,
)
from gateway.engine.state import Unanswered
from gateway.engine.take_back import TakeBackStep
from gateway.healthhook import run_hook
from gateway.images import (
    VerifiedImage,
)
from gateway.smp.session import SMPProtocolError, SMPTimeout
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


class VerifyConfirmStep(TakeBackStep):
    """The verify-and-confirm step (see the module docstring)."""

    async def _after_boot(self, image: VerifiedImage, old_v: str | None,
                          reset_acked: bool = True) -> Outcome:
        target = image.hash
        self._step(Step.VERIFY)
        slots = await self.read_slots()
        if slots.active_hash != target:
            return self._rolled_back(image, slots, old_v, reset_acked)
        self.seen_running = True
        flow = self.flow
        if flow is not None and not flow.test_boot and slots.active is not None \
                and slots.active.confirmed:
            return await self._after_install(image, old_v)
        if slots.active and slots.active.confirmed and self.entry.step == Step.VERIFY.value and \
                self._reset_here and slots.other is None and self.dev.confirm != "app":
            # a test boot was expected, yet right after the reset the image is confirmed and the
            # secondary slot is empty (a swap leaves the previous image there): MCUboot copied
            # it over the old one without a test boot (overwrite-only behaviour) - say so; the
            # health check still decides whether that is a success
            return await self._check_permanent(
                image, old_v, f"{old_v} -> {image.version}: confirmed right after the reset, the "
                "device installed it without a test boot (no revert possible; its MCUboot mode "
                f"is {self.flow.describe() if self.flow else '?'}: set mcuboot_mode in the "
                "device config)")
        if self.dev.confirm == "app":
            return await self._wait_app_confirm(image, old_v)
        if slots.active and slots.active.confirmed:
            return await self._check_permanent(image, old_v, self.confirmed_elsewhere(image))
        # health window: the new image must keep answering before it is made permanent
        self._step(Step.CONFIRM, f"health check {self.dev.health_check_s:g}s")
        end = time.monotonic() + self.dev.health_check_s
        while True:
            slots = await self._read_slots_through_reboot()
            if slots.active_hash != target:
                return self._rolled_back(image, slots, old_v, True)
            if time.monotonic() >= end:
                break
            await asyncio.sleep(min(self.poll, max(0.0, end - time.monotonic())))
        await self._user_health_check(image, old_v)  # health_check: hook; failing = reverted
        self._hold(Stage.BOOTED, image, old_v)
        return await self._confirm(image, old_v)

    async def _user_health_check(self, image: VerifiedImage, old_v: str | None) -> None:
        """The device's ``health_check:`` hook (``gateway.healthhook``: a command or an SMP
        request, bounded in time and output) must pass before the confirm. Which check is (c),
        its verdict is what the user's check or the device answers (b); anything but a pass
        means not healthy: never confirmed - the reset that reverts it is journalled first and
        goes through the reset gate, MCUboot reverts, and the outcome is rolled-back with the
        hook's output."""
        res = await run_hook(self.dev, self.s, str(image.version), old_v, image.hash.hex())
        if res is None:
            return
        if res.ok:
            self._step(Step.CONFIRM, res.detail)
            return
        log.warning("device=%s %s: not confirming %s", self.dev.id, res.detail, image.version)
        now = await self._reset_to_revert(image, old_v, res.detail,
                                          f"{res.detail}; the reset that reverts it",
                                          f"{res.detail}: not confirmed; reset so MCUboot reverts")
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                           f"{res.detail}; not confirmed: reset, MCUboot reverted to {now}",
                           image, old_v)

    async def _after_install(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """A mode without a test boot (overwrite-only, direct-XIP without revert, RAM load):
        the image runs and is confirmed by MCUboot's own rules; nothing can take it back. The
        health window still runs - its failure is reported, never hidden - but no confirm is
        sent and no rollback is promised."""
        assert self.flow is not None
        return await self._check_permanent(
            image, old_v, self.flow.installed(old_v, image, "confirmed by the bootloader"),
            what=f"installed ({self.flow.mode.value})")

    def confirmed_elsewhere(self, image: VerifiedImage) -> str:
        """What it means when an image this gateway test-marked runs confirmed without the
        gateway's confirm (the journal has no ``CONFIRM_SENT`` since the mark)."""
        return (f"{image.version} runs confirmed without this gateway's confirm (the "
                "application confirmed itself, or a power cut during the swap tore MCUboot's "
                "trailer: it no longer reverts); no revert possible")

    async def _check_permanent(self, image: VerifiedImage, old_v: str | None, how: str,
                               what: str = CONFIRMED_ELSEWHERE) -> Outcome:
        """The target runs and is already permanent, by no decision of this gateway: a mode
        without a test boot, an application that confirms itself, or MCUboot's trailer torn
        by a power cut (found on real MCUboot, docs/reliability.md: a torn copy-done or
        image-ok byte leaves swap type NONE, and img_mgmt then reports the running slot
        confirmed). The health window and the ``health_check:`` hook still run and decide
        the outcome: UPDATED only when both pass; otherwise FAILED with what they saw -
        never rolled-back, because nothing can take it back now (b)."""
        target = image.hash
        self._step(Step.CONFIRM, f"{what}; health check {self.dev.health_check_s:g}s")
        try:
            async for states in self._permanent_window():
                slots = Slots.parse(states, self.dev.image)
                if slots.active_hash != target:
                    now = slots.running or "?"
                    raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                       f"{how}; but the device now runs {now}", image, old_v)
        except Unanswered as exc:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED, f"{how}; {exc}",
                               image, old_v) from None
        res = await run_hook(self.dev, self.s, str(image.version), old_v, image.hash.hex())
        if res is not None and not res.ok:
            log.warning("device=%s %s: %s cannot be reverted", self.dev.id, res.detail,
                        image.version)
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{how}; its health check failed: {res.detail}", image, old_v)
        if res is not None:
            self._step(Step.CONFIRM, res.detail)
        detail = f"{how}; health check passed"
        if image.unverified:
            detail += f"; {image.unverified}"
        raise self._finish(Status.UPDATED, UpdateResult.SUCCESS, detail, image, old_v)

    async def _confirm(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        """Confirm the image the device runs - only if it is ``image`` and this gateway tested it.

        Zephyr's img_mgmt (``img_mgmt_state_write`` -> ``img_mgmt_set_next_boot_slot``,
        img_mgmt_state.c) confirms *by hash* whichever slot holds that hash: for the secondary
        slot that is ``boot_set_next(active=false, confirm=true)``, i.e. "install this image
        permanently at the next boot" (MCUboot's PERM swap). A confirm-by-hash that lands after
        the image crashed and MCUboot reverted would make the crashed image permanent. So:

        * image 0 is confirmed *without* a hash: img_mgmt then confirms the running slot
          (``img_mgmt_active_slot(img_mgmt_active_image())``), which can never schedule a swap;
        * the state is read immediately before (the target must be active) and after (active
          and confirmed) the write;
        * a confirm that goes unanswered is never re-sent blindly: the state is read again (the
          device may have rebooted) and only a still-running, unconfirmed target gets another.

        Another MCUboot image number (``image: N``, e.g. a network core) cannot be confirmed
        without a hash (that would confirm image 0); it is confirmed by hash, still only after a
        read showing the hash active, and an answer that shows it scheduled in the secondary
        slot is reported as the failure it is.
        """
        target = image.hash
        if self.entry.tested_hash != target.hex():  # the invariant, checked at the last moment
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "refusing to confirm an image this gateway did not test", image, old_v)
        called_off = await self.confirm_gate() if self.confirm_gate is not None else None
        if called_off is not None or any(i.kind == "cancel" and i.target_hash == target.hex()
                                         for i in self.journal.open_intents(self.dev.id)):
            # a cancel journalled for this image (fleet server or operator): never confirmed;
            # the intent's take-back (gateway.fleetops) reverts it - the row stays open for it
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL,
                                  f"{image.version} was canceled: not confirmed (the cancel is "
                                  "being taken back)", old_version=old_v,
                                  new_version=str(image.version)))
        by_hash = target if self.dev.image != 0 else None
        attempts = 3
        for attempt in range(1, attempts + 1):
            before = await self._read_slots_through_reboot()
            if before.active_hash != target:
                return self._rolled_back(image, before, old_v, True)
            if before.active is not None and before.active.confirmed:
                # an earlier confirm landed (its answer was lost), or the application confirmed
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                   f"{old_v} -> {image.version}, confirmed" + (
                                       "" if attempt > 1 else " before the gateway's confirm "
                                       "(by the device or someone else)"), image, old_v)
            # journalled before it is sent: a later pass tells its own confirm from another's
            self._step(Step.CONFIRM, f"{CONFIRM_SENT} {target.hex()[:16]} ({attempt}/{attempts})")
            try:
                states = await self.s.image_confirm(by_hash, retries=0)
            except (SMPTimeout, SMPProtocolError) as exc:
                log.warning("device=%s confirm attempt=%d/%d unanswered (%s); reading the state "
                            "instead of re-sending", self.dev.id, attempt, attempts, exc)
                continue
            post = Slots.parse(states, self.dev.image)
            if by_hash is not None and post.other_hash == target and post.other is not None and (
                    post.other.pending or post.other.permanent):
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"the device scheduled {image.version} in its secondary slot "
                                   "instead of confirming the running image; it will be "
                                   "installed at the next reset", image, old_v)
            after = await self._read_slots_through_reboot()
            if after.active_hash != target:
                return self._rolled_back(image, after, old_v, True)
            if after.active is not None and after.active.confirmed:
                detail = (self.flow.installed(old_v, image, "confirmed by the gateway")
                          if self.flow is not None else
                          f"{old_v} -> {image.version}, confirmed by the gateway")
                if image.unverified:
                    detail += f"; {image.unverified}"
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS, detail, image, old_v)
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               "device accepted the confirm but does not report the image "
                               "confirmed", image, old_v)
        raise self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"the confirm went unanswered {attempts} times; {image.version} still "
                           "runs unconfirmed (MCUboot reverts it at the next reset unless a later "
                           "attempt confirms it)", image, old_v)

    async def _wait_app_confirm(self, image: VerifiedImage, old_v: str | None) -> Outcome:
        target = image.hash
        self._step(Step.WAIT_APP, f"waiting up to {self.dev.timeouts.app_confirm_s:g}s")
        deadline = time.monotonic() + self.dev.timeouts.app_confirm_s
        while time.monotonic() < deadline:
            slots = await self._read_slots_through_reboot()
            if slots.active_hash != target:
                return self._rolled_back(image, slots, old_v, True)
            if slots.active and slots.active.confirmed:
                raise self._finish(Status.UPDATED, UpdateResult.SUCCESS,
                                   f"{old_v} -> {image.version}, confirmed by the application",
                                   image, old_v)
            await asyncio.sleep(self.poll)
        # the application never confirmed: reset so MCUboot reverts, and report it
        self._gate(f"application did not confirm {image.version} within "
                   f"{self.dev.timeouts.app_confirm_s:g}s; the reset that reverts it", image, old_v)
        await self._reset(wait_detail=None)
        slots = await self.read_slots()
        detail = (f"application did not confirm {image.version} within "
                  f"{self.dev.timeouts.app_confirm_s:g}s; reset to revert")
        if slots.active_hash == target:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               detail + ", but the device still runs it", image, old_v)
        now = slots.running or "?"
        raise self._finish(Status.ROLLED_BACK, UpdateResult.UPDATE_FAILED,
                           detail + f"; MCUboot reverted to {now} (with confirm: app the "
                           "application must confirm itself, boot_write_img_confirmed(); "
                           "confirm: gateway lets the gateway confirm after its health check)",
                           image, old_v)
