"""Recovery step: updates through MCUboot itself (serial recovery, the firmware loader).

Owns ``RecoveryStep._run_recovery`` (single application slot or firmware loader, enabled per
device; entered with a boot-mode reset, ``_boot_mode_reset``), ``_flash_from_bootloader``
(upload image 0, check, reset, check the application runs it, then its health window and hook:
installed for good, ``VerifyConfirmStep._check_permanent``) and ``recover`` (the last resort:
re-flash the last image confirmed here). Rules in ``gateway/bootmodes/recovery.py``. Writes
``Step.READ_STATE``, ``Step.MARK_TEST`` (before the boot-mode reset), ``Step.UPLOAD`` (through
``_send``), ``Step.RESET``, ``Step.WAIT_BOOT``, ``Step.VERIFY`` and ``Step.CONFIRM`` (the check).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from smp.image_management import ImageState
from smpclient.requests.os_management import ResetWrite

from gateway.bootmodes.recovery import RecoveryFlow, in_serial_recovery, loader_running
from gateway.engine.model import (
    Outcome,
    Slots,
    Stage,
    Status,
    Step,
    _Finish,
)
from gateway.engine.upload import UploadStep
from gateway.engine.verify_confirm import VerifyConfirmStep
from gateway.images import (
    ImageRefused,
    VerifiedImage,
    preflight,
)
from gateway.journal import Entry
from gateway.smp.session import SMPError, SMPProtocolError, SMPTimeout, UploadError
from gateway.smp.transport import TransportError
from gateway.sources.base import UpdateResult

log = logging.getLogger("gateway.engine")


class RecoveryStep(UploadStep, VerifyConfirmStep):
    """The recovery step (see the module docstring)."""

    async def _poll_states(self, want: Callable[[list[ImageState]], bool], what: str,
                           timeout_s: float) -> list[ImageState]:
        """Poll the image state until ``want`` holds (the device may be rebooting; serial
        recovery answers no echo, so the state read is the probe)."""
        deadline = time.monotonic() + timeout_s
        last: list[ImageState] | None = None
        while time.monotonic() < deadline:
            try:
                last = await self.s.image_state(timeout_s=1.0, retries=0)
                if want(last):
                    return last
            except SMPTimeout:
                pass
            except TransportError:
                await self._reopen()
            await asyncio.sleep(self.poll)
        seen = "no answer" if last is None else (
            "serial recovery" if in_serial_recovery(last) else "its application")
        raise TransportError(f"{what} within {timeout_s:g}s (the device answered as: {seen})")

    async def _boot_mode_reset(self) -> bool:
        """``os reset`` with ``boot_mode: 1``: MCUboot's serial recovery / the firmware loader
        at the next boot (Zephyr CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE). Never retried."""
        try:
            await self.s.request(lambda q: ResetWrite(boot_mode=1, sequence=q), timeout_s=2.0)
            return True
        except (SMPTimeout, SMPProtocolError):
            return False

    async def _run_recovery(self, image: VerifiedImage, slots: Slots, artifact_id: str | None,
                            source: str | None) -> Outcome:
        """Single application slot (serial recovery) or firmware loader, enabled per device."""
        assert isinstance(self.flow, RecoveryFlow)
        flow = self.flow
        rec = self.dev.recovery
        assert rec is not None
        target, th = image.hash, image.hash.hex()
        old_v = slots.running
        prev = self.entry
        resuming = prev.target_hash == th and prev.outcome is None
        # a failed attempt at the same image keeps what this gateway did: the image it wrote
        # (its health check may have failed or been cut: checked again below)
        same = prev.target_hash == th and prev.outcome == Status.FAILED.value
        if (resuming or same) and prev.old_version:
            old_v = prev.old_version
        if not resuming:
            self.entry = Entry(device_id=self.dev.id, target_hash=th,
                               target_version=str(image.version), artifact_id=artifact_id,
                               source=source, image_path=str(image.path),
                               old_hash=slots.active_hash.hex() if slots.active_hash else None,
                               old_version=old_v, attempts=prev.attempts + 1,
                               tested_hash=prev.tested_hash if same else None,
                               running_version=prev.running_version,
                               running_hash=prev.running_hash, blocked_hash=prev.blocked_hash,
                               blocked_artifact=prev.blocked_artifact)
        self._step(Step.READ_STATE, f"running={old_v} target={image.version} mode="
                   f"{flow.mode.value} via {flow.via} resume={resuming}")
        states = await self.s.image_state()
        app_runs = not in_serial_recovery(states) and not loader_running(states)
        if app_runs and slots.active_hash == target:
            if self.entry.tested_hash == th:
                # written here through the bootloader, its health check not passed yet (a
                # restart, a link lost): installed for good, so it is checked, never assumed
                return await self._check_permanent(
                    image, old_v, flow.installed(old_v, image, ""), what=f"installed via {flow.via}")
            st = Status.UPDATED if resuming else Status.UP_TO_DATE
            raise self._finish(st, UpdateResult.SUCCESS, f"running {image.version}", image, old_v)
        try:
            preflight(image, device_id=self.dev.id, hardware=self.dev.hardware,
                      slot_size=self.dev.slot_size,
                      running=slots.active_version if app_runs else None,
                      running_hash=slots.active_hash if app_runs else None,
                      allow_downgrade=self.dev.allow_downgrade, trailer=flow.trailer(image))
            refusal = flow.refuse(image, slots.active_version if app_runs else None)
            if refusal is not None:
                raise refusal
        except ImageRefused as exc:
            raise self._finish(Status.REFUSED, exc.reason.lwm2m, str(exc), image, old_v) from None
        self._checked(prev, image, old_v)
        if self.until < Stage.CONFIRMED:
            raise _Finish(Outcome(self.dev.id, Status.HELD, UpdateResult.INITIAL,
                                  f"{flow.mode.value}: the upload overwrites the running image; "
                                  "not started until it may run to the end",
                                  old_version=old_v, new_version=str(image.version)))
        if app_runs:
            if rec.entry != "boot_mode":
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"the device runs its application; recovery.entry is "
                                   f"{rec.entry!r}: waiting for it to be in {flow.via}",
                                   image, old_v)
            # the whole recovery update is one disruption that starts with this reset: only
            # inside a maintenance window (the reset that leaves recovery afterwards ends it)
            self._gate(f"reset into {flow.via}", image, old_v)
            # journal first: from here on the device leaves its application
            self._step(Step.MARK_TEST, f"entering {flow.via} (os reset boot_mode=1)",
                       tested_hash=th)
            acked = await self._boot_mode_reset()
            self._step(Step.WAIT_BOOT, f"boot-mode reset acknowledged={acked}")
            await asyncio.sleep(0.5)  # CONFIG_MCUMGR_GRP_OS_RESET_MS: the answer precedes the reboot
            want = loader_running if flow.mode.value == "firmware-loader" else in_serial_recovery
            try:
                states = await self._poll_states(want, f"the device did not enter {flow.via}",
                                                 self.dev.timeouts.reset_s)
            except TransportError as exc:
                raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                                   f"{exc}; the application needs CONFIG_MCUMGR_GRP_OS_RESET_"
                                   "BOOT_MODE and MCUboot CONFIG_BOOT_SERIAL_BOOT_MODE (or the "
                                   "firmware loader's entry)", image, old_v) from None
        return await self._flash_from_bootloader(image, old_v, flow.via,
                                                 lambda d: flow.installed(old_v, image, d))

    async def _flash_from_bootloader(self, image: VerifiedImage, old_v: str | None, via: str,
                                     success: Callable[[str], str]) -> Outcome:
        """The device answers from serial recovery or the firmware loader: upload image 0,
        check the device lists exactly it, reset, check the application runs it."""
        target, th = image.hash, image.hash.hex()
        self.entry = self.entry.with_(tested_hash=th)
        # serial recovery serves one request at a time: no pipelining there
        self.upload = await self._send(image, 0, f"via {via}: ", window=1)
        after = await self.s.image_state()
        slot0 = next((s for s in after if (s.image or 0) == 0 and s.slot == 0), None)
        if slot0 is None or not slot0.hash or bytes(slot0.hash) != target:
            raise self._finish(Status.FAILED, UpdateResult.INTEGRITY_FAILURE,
                               f"after the upload through {via} the device does not list "
                               f"{image.version} in slot 0 (it lists only images it validated); "
                               "not reset - the next attempt uploads again", image, old_v)
        self._step(Step.RESET, f"leaving {via}")
        acked = await self.s.reset()
        self._step(Step.WAIT_BOOT, f"reset acknowledged={acked}")
        await asyncio.sleep(0.5)
        try:
            states = await self._poll_states(
                lambda st: not in_serial_recovery(st) and not loader_running(st),
                "the application did not come back", self.dev.timeouts.reset_s)
        except TransportError as exc:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{image.version} was written through {via}, but {exc}",
                               image, old_v) from None
        self._step(Step.VERIFY)
        run = Slots.parse(states, 0)
        if run.active_hash != target:
            raise self._finish(Status.FAILED, UpdateResult.UPDATE_FAILED,
                               f"{image.version} was written through {via}, but the device runs "
                               f"{run.running or '?'}", image, old_v)
        # installed for good (no revert through a bootloader): the health window and the
        # health_check: hook decide whether that is a success (``_check_permanent``)
        return await self._check_permanent(image, old_v, success(""), what=f"installed via {via}")

    async def recover(self, image: VerifiedImage) -> Outcome:
        """Last resort for a device whose application no longer answers SMP: if MCUboot's
        serial recovery answers (recovery pin held, or no bootable application left), re-flash
        ``image`` - the last image this gateway knew confirmed there
        (``bootmodes.recovery.last_confirmed_path``). Only with ``recovery.last_resort``."""
        rec = self.dev.recovery
        old_v = self.entry.running_version
        if rec is None or not rec.enabled or not rec.last_resort:
            return Outcome(self.dev.id, Status.REFUSED, UpdateResult.UNSUPPORTED_PROTOCOL,
                           "serial recovery is not enabled for this device (recovery: {enabled: "
                           "true, last_resort: true})")
        try:
            states = await self.s.image_state(timeout_s=self.dev.timeouts.request_s, retries=1)
        except (SMPTimeout, TransportError) as exc:
            return Outcome(self.dev.id, Status.FAILED, UpdateResult.CONNECTION_LOST,
                           f"neither the application nor MCUboot's serial recovery answers: {exc}")
        except SMPError as exc:
            return Outcome(self.dev.id, Status.FAILED, UpdateResult.UPDATE_FAILED,
                           f"the device answered the state read with an error: {exc}")
        if not in_serial_recovery(states):
            return Outcome(self.dev.id, Status.UP_TO_DATE, UpdateResult.INITIAL,
                           "the application answers: nothing to recover")
        prev = self.entry
        self.entry = Entry(device_id=self.dev.id, target_hash=image.hash.hex(),
                           target_version=str(image.version), source="recovery",
                           image_path=str(image.path), old_hash=prev.old_hash,
                           old_version=prev.old_version, attempts=prev.attempts + 1,
                           running_version=prev.running_version, running_hash=prev.running_hash,
                           blocked_hash=prev.blocked_hash, blocked_artifact=prev.blocked_artifact)
        self._step(Step.READ_STATE, "the application does not answer; MCUboot serial recovery "
                   f"does: re-flashing {image.version} (last confirmed here)")
        try:
            return await self._flash_from_bootloader(
                image, old_v, "MCUboot serial recovery",
                lambda _: f"re-flashed {image.version} (the last image confirmed here) through "
                          "MCUboot serial recovery; the application answers again")
        except _Finish as f:
            return f.outcome
        except (SMPTimeout, TransportError, UploadError, SMPError) as exc:
            return self._finish(Status.FAILED, UpdateResult.CONNECTION_LOST,
                                f"recovery: {type(exc).__name__}: {exc}", image, old_v).outcome
