"""Upload step: the image's bytes into a slot, resumed across lost links, bounded in time.

Owns ``UploadStep._send`` (one MCUboot image number; (c) the deadline from the config,
``_upload_s``; the acknowledged offset checkpointed in the journal at most once a second) and
``_upload`` (then (b) the device must list exactly the image in its secondary slot). Writes
``Step.UPLOAD`` (offset zeroed before the first chunk) and the journal events
``upload-progress`` / ``upload-interrupted``.
"""
from __future__ import annotations

import logging
import time

from gateway.engine.model import (
    Step,
)
from gateway.engine.state import EngineState
from gateway.images import (
    VerifiedImage,
)
from gateway.smp.session import UploadError
from gateway.smp.transport import TransportError
from gateway.smp.upload import upload_deadline_s

log = logging.getLogger("gateway.engine")


class UploadStep(EngineState):
    """The upload step (see the module docstring)."""

    async def _upload(self, image: VerifiedImage) -> tuple[int, float, int]:
        sent, secs, start = await self._send(image, self.dev.image)
        # the device must now hold exactly our image in the secondary slot
        slots = await self.read_slots()
        if slots.other_hash != image.hash:
            raise UploadError("after the upload the secondary slot does not hold the image "
                              f"(slot hash {slots.other_hash.hex()[:16] if slots.other_hash else None})")
        problem = self.flow.uploaded_problem(slots, image) if self.flow is not None else None
        if problem is not None:
            raise UploadError(f"after the upload: {problem}; nothing marked")
        return sent, secs, start

    def _upload_s(self, size: int) -> float:
        """(c) how long an upload of ``size`` bytes may take (``upload.upload_deadline_s``)."""
        t = self.dev.timeouts
        return upload_deadline_s(size, first_timeout_s=t.upload_first_chunk_s,
                                 min_rate_bps=t.upload_min_rate_bps)

    async def _send(self, image: VerifiedImage, image_num: int, label: str = "",
                    window: int | None = None) -> tuple[int, float, int]:
        """Upload ``image`` as MCUboot image ``image_num``; (bytes sent, seconds, resumed from)."""
        data = image.read()
        self._step(Step.UPLOAD, f"{label}{len(data)} bytes", upload_offset=0,
                   upload_total=len(data))
        last_saved = [time.monotonic()]

        def progress(off: int, total: int) -> None:
            self.entry = self.entry.with_(upload_offset=off, upload_total=total)
            now = time.monotonic()
            if now - last_saved[0] > 1.0 or off == total:  # checkpoint at most once a second
                last_saved[0] = now
                self.journal.put(self.entry, "upload-progress")
            if self.on_progress:
                self.on_progress(self.dev.id, Step.UPLOAD, off, total)

        # a link lost mid-upload (cable pulled, USB re-enumeration) is re-opened and the upload
        # resumes from the device's offset, within the reset timeout and a few attempts
        deadline = time.monotonic() + self.dev.timeouts.reset_s
        upload_end = time.monotonic() + self._upload_s(len(data))  # reconnects included
        sent = 0
        for attempt in range(1, 6):
            try:
                stats = await self.s.upload(
                    data, image_num=image_num, window=window or self.dev.window,
                    chunk_cap=self.dev.chunk_size,
                    first_timeout_s=self.dev.timeouts.upload_first_chunk_s, progress=progress,
                    store=self.journal,  # packet size / window learned for this device
                    deadline_s=max(0.0, upload_end - time.monotonic()),
                )
                break
            except TransportError as exc:
                self.journal.put(self.entry, "upload-interrupted")
                if attempt == 5 or time.monotonic() >= deadline:
                    raise
                log.warning("device=%s link lost during upload at %d/%d (%s); reconnecting",
                            self.dev.id, self.entry.upload_offset, len(data), exc)
                sent += self.entry.upload_offset
                await self._reconnect(deadline)
            except BaseException:  # cancelled (shutdown) or failed: checkpoint the acked offset
                self.journal.put(self.entry, "upload-interrupted")
                raise
        stats.sent_bytes += sent
        log.info("device=%s upload done image_bytes=%d resumed_from=%d wire_bytes=%d window=%d "
                 "chunk=%d seconds=%.2f retransmits=%d rewinds=%d", self.dev.id, stats.total,
                 stats.start_offset, stats.sent_bytes, stats.window, stats.chunk_size,
                 stats.seconds, stats.retransmits, stats.rewinds)
        return stats.sent_bytes, stats.seconds, stats.start_offset
