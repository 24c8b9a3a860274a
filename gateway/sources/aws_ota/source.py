"""AWS IoT OTA fleet source: FreeRTOS-style ``afr_ota`` jobs for secondary processors (MCUs).

Builds on the AWS IoT Jobs handling of ``gateway.sources.mqtt_jobs`` (one MQTT session, job
executions per thing, whole-map ``statusDetails``, one final status when every covered device
is done, closed executions taken as a cancel) and adds what the OTA agent does:

* **Job documents** - the ``afr_ota`` shape (``document.py``). A malformed one is answered
  REJECTED with the reason. The next execution is read with DescribeJobExecution ``$next``
  (``jobs/$next/get``, as the agent does): an execution with no file for this gateway's MCUs is
  left untouched (QUEUED) for its owner - never failed.
* **Routing** (trust rule (c)): ``routes`` in the configuration map a thing + ``fileid`` (and
  optionally ``filepath`` / ``fileType``) to a device or a group. The job only names a fileid;
  which physical device gets it is the configuration's. Several files in one job go to several
  MCUs; ``fileid`` 0 (the connectivity processor's own image) is never routed.
* **Delivery** - MQTT streams (``streams.py``: GetStream with a block bitmap, resumed from the
  state directory after a lost message, a dropped connection or a restart) or the HTTP
  presigned URL (``update_data_url``) through the shared downloader.
* **Code signing** (``codesign.py``, trust rule (a)/(c)): with a certificate store configured,
  the file's ``sig-sha256-ecdsa`` (or RSA) signature must verify with the configured
  certificate its ``certfile`` names - before the image store's MCUboot checks, and before any
  byte goes to a device; otherwise the fetch fails permanently and the execution is REJECTED.
* **Status** like the agent: IN_PROGRESS with ``progress``; ``self_test: "ready"`` while the MCU
  test-boots the image (marked and reset), ``"active"`` once the device reports it runs it
  (health window before the confirm); SUCCEEDED with ``reason: "accepted v<version>"`` (the
  version from the image header the signature covers); FAILED (or REJECTED for a refused image)
  with ``reason`` and the LwM2M code.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import hashlib
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiomqtt

from gateway.mcuboot import read_version
from gateway.sources.aws_ota import streams
from gateway.sources.aws_ota.codesign import CertStore, CodeSignError, verify
from gateway.sources.aws_ota.document import JobDocumentError, OtaDocument, OtaFile, parse
from gateway.sources.base import (
    DeviceView,
    FetchError,
    Offer,
    Report,
    UpdateResult,
    UpdateState,
)
from gateway.sources.mqtt_jobs import MqttJobsSource, _Job, _key, _value
from gateway.sources.settings import AwsOtaSourceConfig

log = logging.getLogger(__name__)

STEP_PREFIX = "step:"  # Report.detail of a test-boot step the daemon passes on (reports_steps)
_SELF_TEST = {"mark-test": "ready", "reset": "ready", "wait-boot": "ready", "confirm": "active"}
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


@dataclass
class _Listener:
    fileid: int
    queue: asyncio.Queue[Any] = field(default_factory=lambda: asyncio.Queue(maxsize=256))
    token: str = ""  # the client token of the request in flight (a rejection names it)


class AwsOtaSource(MqttJobsSource):
    name = "aws_ota"
    reports_steps = True  # the daemon passes on test-boot steps (self_test ready / active)

    def __init__(self, cfg: AwsOtaSourceConfig, state_dir: Path, gateway_id: str = "smp-gateway",
                 devices: Iterable[tuple[str, str | None]] = ()) -> None:
        devices = list(devices)
        super().__init__(cfg, state_dir, gateway_id=gateway_id, devices=devices)
        self.ota = cfg
        self._groups: dict[str, str | None] = dict(devices)
        self._store = CertStore(cfg.code_signing_cert_dir, cfg.code_signing_certs)
        self._stream_root = Path(state_dir) / "aws_ota"
        self._listeners: dict[tuple[str, str], list[_Listener]] = {}
        self._versions: dict[tuple[str, str, str], str] = {}
        self._self_test: dict[tuple[str, str, str], str] = {}
        self._rejected: set[tuple[str, str]] = set()
        self._gone: set[str] = set()  # downloads removed while running: they stop
        self._describing: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = {}
        self.stream_stats = {"requests": 0, "blocks": 0, "duplicates": 0, "bad": 0, "resumed": 0,
                             "unasked": 0, "swept": 0}
        if not self._store.configured:
            log.warning("aws_ota: no code-signing certificate configured: files are checked "
                        "by MCUboot's signature only")

    # -- MQTT plumbing -------------------------------------------------------------------
    @staticmethod
    async def _subscribe(client: aiomqtt.Client, thing: str) -> None:
        await MqttJobsSource._subscribe(client, thing)
        base = f"$aws/things/{thing}/streams/+"
        await client.subscribe([(f"{base}/data/+", 1), (f"{base}/rejected/+", 1),
                                (f"{base}/description/+", 1)])

    def _dispatch(self, topic: str, payload: Any) -> None:
        parts = topic.split("/")
        if len(parts) == 7 and parts[3] == "streams" and parts[5] in ("data", "rejected",
                                                                      "description"):
            self._stream_message(parts[2], parts[4], parts[5], parts[6], payload)
            return
        super()._dispatch(topic, payload)

    def _stream_message(self, thing: str, stream: str, kind: str, fmt: str, payload: Any) -> None:
        """A stream message: only to a download or a DescribeStream waiting for it; everything
        else (unasked, unreadable, over its size bound) is dropped here, costing nothing kept."""
        listeners = self._listeners.get((thing, stream))
        if ((not listeners and not self._describing) or fmt not in ("cbor", "json")
                or not isinstance(payload, bytes | str)):
            self.stream_stats["unasked"] += 1
            return
        raw = payload.encode() if isinstance(payload, str) else payload
        try:
            data = streams.decode(fmt, raw, self.ota.block_size * 2 + 1024)
        except ValueError as exc:
            self.stream_stats["bad"] += 1
            self._drop(f"$aws/things/{thing}/streams/{stream}/{kind}", str(exc))
            return
        token = data.get("c")
        if kind != "data":
            fut = self._describing.get(token) if isinstance(token, str) else None
            if fut is not None:
                if not fut.done():
                    fut.set_result((kind, data))
                return
            if kind == "description":
                self.stream_stats["unasked"] += 1
                return
        try:
            item: Any = streams.block_of(fmt, data) if kind == "data" else (
                "rejected", str(data.get("o"))[:80], str(data.get("m"))[:200])
        except ValueError as exc:
            self.stream_stats["bad"] += 1
            self._drop(f"$aws/things/{thing}/streams/{stream}/{kind}", str(exc))
            return
        for lst in listeners or ():
            # a rejection goes to the request it names (any, when it names none)
            if (lst.fileid == item.fileid if kind == "data"
                    else not isinstance(token, str) or token == lst.token):
                with contextlib.suppress(asyncio.QueueFull):  # a flood costs blocks, asked again
                    lst.queue.put_nowait(item)

    # -- routing (c) ----------------------------------------------------------------------
    def _routed(self, thing: str, device_id: str, f: OtaFile) -> bool:
        """Whether the configuration sends file ``f`` of a job for ``thing`` to ``device_id``."""
        if f.fileid == 0:
            return False  # the connectivity processor's own image: never an MCU's
        group = self._groups.get(device_id)
        for r in self.ota.routes:
            if r.fileid != f.fileid or (r.thing is not None and not fnmatch.fnmatchcase(thing, r.thing)):
                continue
            if r.filepath is not None and not fnmatch.fnmatchcase(f.filepath, r.filepath):
                continue
            if r.file_type is not None and f.file_type != r.file_type:
                continue
            if r.device == device_id or (r.group is not None and r.group == group):
                return True
        return False

    def _covered(self, job: _Job) -> set[str]:
        try:
            doc = parse(job.document)
        except JobDocumentError:
            return set()
        return {d for d in self._roster.get(job.thing, ())
                if any(self._routed(job.thing, d, f) for f in doc.files)}

    # -- FleetSource ----------------------------------------------------------------------
    async def check(self, device: DeviceView) -> Offer | None:
        thing = self.thing_name(device)
        self._roster.setdefault(thing, set()).add(device.id)
        self._groups.setdefault(device.id, device.group)
        await self.publish_inventory(thing, device)
        self._notified.discard(thing)
        if not self._notified:
            self.notified.clear()
        verdict, data = await self._request(thing, f"$aws/things/{thing}/jobs/$next/get",
                                            {"includeJobDocument": True})
        if verdict != "accepted":
            raise FetchError(f"jobs/$next/get rejected for {thing}: {data.get('code')} "
                             f"{data.get('message')}", UpdateResult.CONNECTION_LOST)
        execution = data.get("execution")
        if not isinstance(execution, dict) or not isinstance(execution.get("jobId"), str):
            return None
        job_id = execution["jobId"]
        number = execution.get("executionNumber")
        number = number if isinstance(number, int) and not isinstance(number, bool) else None
        job = self._jobs.get((thing, job_id))
        if job is None or job.closed or job.execution_number != number:
            job = self._jobs[(thing, job_id)] = _Job(thing, job_id, number)
        if not job.loaded:
            self._adopt(job, execution)
        try:
            doc = parse(job.document)
        except JobDocumentError as exc:
            if (thing, job_id) not in self._rejected:
                self._rejected.add((thing, job_id))
                log.warning("job %s of %s rejected: %s", job_id, thing, exc)
                res = UpdateResult.UNSUPPORTED_PACKAGE
                await self._update_quietly(job, "REJECTED", {
                    "reason": _value(f"rejected: job document: {exc}"),
                    "lwm2m_result": str(int(res)), "lwm2m_result_name": res.name,
                    "gateway": _value(self.gateway_id)})
            return None
        mine = [f for f in doc.files if self._routed(thing, device.id, f)]
        if not mine:
            return None  # no file for this MCU: left for its owner, never failed
        if device.id in job.results:
            await self._final_if_due(job)
            return None
        if len(mine) > 1:
            log.warning("job %s routes files %s to %s: only fileid %d is taken (one image per "
                        "update)", job_id, [f.fileid for f in mine], device.id, mine[0].fileid)
        f = mine[0]
        use_http = f.url is not None and "HTTP" in doc.protocols and (
            self.ota.prefer_protocol == "HTTP" or "MQTT" not in doc.protocols or not doc.streamname)
        return Offer(
            device_id=device.id, source=self.name,
            artifact_id=f"aws-ota-{_SAFE.sub('_', job_id)[:64]}-{f.fileid}",
            size=f.filesize, hardware=None,
            handle={"job": job, "file": f, "doc": doc, "thing": thing,
                    "protocol": "HTTP" if use_http else "MQTT"},
            report_to={"thing": thing, "job_id": job_id, "execution_number": job.execution_number,
                       "fileid": f.fileid})

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        h = offer.handle
        f: OtaFile = h["file"]
        doc: OtaDocument = h["doc"]
        cap = min(x for x in (max_size, self.ota.max_file_bytes) if x)
        if f.filesize > cap:
            raise FetchError(f"file {f.fileid} is {f.filesize} bytes, over {cap}",
                             UpdateResult.NOT_ENOUGH_FLASH, permanent=True)
        if self._store.configured:  # refused before a byte is downloaded, let alone sent
            try:
                self._store.find(f.certfile)
                if f.signature is None:
                    raise CodeSignError("the job gives no signature for the file")
            except CodeSignError as exc:
                raise FetchError(f"code signing: {exc}", UpdateResult.INTEGRITY_FAILURE,
                                 permanent=True) from None
        if h["protocol"] == "HTTP":
            assert f.url is not None
            path = await self._downloader.fetch(f.url, sha256=None, max_size=cap, size=f.filesize)
        else:
            assert doc.streamname is not None
            try:
                path = await self._stream_fetch(h["thing"], doc.streamname, f, h["job"].job_id,
                                                offer)
            except FetchError as exc:
                if exc.permanent:  # REJECTED: nothing of it is kept
                    self._forget(offer)
                raise
        if self._store.configured:
            try:
                what = await asyncio.to_thread(verify, path, f, self._store)
            except (CodeSignError, OSError) as exc:
                self._forget(offer)
                raise FetchError(f"code signing: {exc}", UpdateResult.INTEGRITY_FAILURE,
                                 permanent=True) from None
            log.info("device=%s job file %d: %s", offer.device_id, f.fileid, what)
        with contextlib.suppress(OSError, ValueError, Exception):
            with path.open("rb") as fh:  # for "accepted v<version>"; the store checks the rest
                v = str(read_version(fh.read(32)))
                self._versions[self._rkey(offer)] = v
                # journalled with the report handle: "accepted v<version>" after a restart too
                # (said only on SUCCESS, i.e. once the device (b) reports running this image)
                offer.report_to["version"] = v
        return path

    def _key_of(self, thing: str, stream: str, f: OtaFile, job_id: str) -> str:
        digest = hashlib.sha256(f"{thing}\0{stream}\0{job_id}".encode()).hexdigest()[:16]
        return f"{_SAFE.sub('_', stream)[:48]}-{f.fileid}-{digest}"

    def _forget(self, offer: Offer) -> None:
        """Remove the stream download of an offer (finished, REJECTED or called off)."""
        h = offer.handle if isinstance(offer.handle, dict) else None
        if h is None or h.get("protocol") != "MQTT" or not isinstance(h.get("doc"), OtaDocument):
            rt = offer.report_to
            key = rt.get("stream_key")
            if isinstance(key, str) and _SAFE.sub("_", key) == key:
                self._gone.add(key)
                streams.discard(self._stream_root, key)
            return
        doc: OtaDocument = h["doc"]
        if doc.streamname is not None:
            key = self._key_of(h["thing"], doc.streamname, h["file"], h["job"].job_id)
            self._gone.add(key)
            streams.discard(self._stream_root, key)

    async def _describe(self, thing: str, stream: str) -> tuple[int | None, dict[int, int]]:
        """DescribeStream: the stream's version and files (bounded in time and size)."""
        fmt = self.ota.stream_format
        token = uuid.uuid4().hex[:16]
        fut: asyncio.Future[tuple[str, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._describing[token] = fut
        try:
            client = await self._client_for(thing)
            await client.publish(f"$aws/things/{thing}/streams/{stream}/describe/{fmt}",
                                 streams.encode_describe(fmt, token), qos=1)
            kind, data = await asyncio.wait_for(fut, self.ota.request_timeout_s)
        except TimeoutError:
            raise FetchError(f"stream {stream}: no DescribeStream answer within "
                             f"{self.ota.request_timeout_s:g}s", UpdateResult.CONNECTION_LOST) from None
        except aiomqtt.MqttError as exc:
            raise FetchError(f"stream {stream}: DescribeStream not sent ({exc})",
                             UpdateResult.CONNECTION_LOST) from None
        finally:
            self._describing.pop(token, None)
        if kind == "rejected":
            code, msg = str(data.get("o"))[:80], str(data.get("m"))[:200]
            raise FetchError(f"stream {stream}: DescribeStream rejected: {code} {msg}",
                             UpdateResult.INVALID_URI, permanent=code == "NotFound")
        try:
            return streams.description_of(data)
        except ValueError as exc:
            raise FetchError(f"stream {stream}: unusable DescribeStream answer: {exc}",
                             UpdateResult.CONNECTION_LOST) from None

    async def _stream_fetch(self, thing: str, stream: str, f: OtaFile, job_id: str,
                            offer: Offer) -> Path:
        """The file over MQTT streams, resumed from the bitmap in the state directory."""
        cfg = self.ota
        key = self._key_of(thing, stream, f, job_id)
        offer.report_to["stream_key"] = key  # journalled: a restarted gateway removes it too
        final = self._stream_root / f"{key}.bin"
        if final.is_file() and final.stat().st_size == f.filesize:
            return final  # complete before a restart (the checks that follow still apply)
        self._stream_root.mkdir(parents=True, exist_ok=True)
        self._gone.discard(key)
        swept = await asyncio.to_thread(streams.sweep, self._stream_root, key,
                                        cfg.stream_cache_bytes, cfg.stream_keep_s, time.time())
        self.stream_stats["swept"] += len(swept)
        version = None
        if cfg.describe_stream:
            # the job's filesize is checked against the stream's own (a mismatch is REJECTED
            # before a byte is asked); trust still rests on the signatures checked after
            version, files = await self._describe(thing, stream)
            if f.fileid not in files:
                raise FetchError(f"stream {stream} has no file {f.fileid} (DescribeStream: "
                                 f"{sorted(files)[:8]})", UpdateResult.UNSUPPORTED_PACKAGE,
                                 permanent=True)
            if files[f.fileid] != f.filesize:
                raise FetchError(f"stream {stream} file {f.fileid} is {files[f.fileid]} bytes, "
                                 f"the job says {f.filesize}", UpdateResult.UNSUPPORTED_PACKAGE,
                                 permanent=True)
        part = await asyncio.to_thread(streams.Partial, self._stream_root, key, f.filesize,
                                       cfg.block_size, version)
        if part.resumed:
            self.stream_stats["resumed"] += part.resumed
            log.info("stream %s file %d: resuming, %d of %d blocks already here", stream,
                     f.fileid, part.resumed, part.blocks)
        lst = _Listener(f.fileid, asyncio.Queue(maxsize=cfg.blocks_per_request * 2 + 8))
        self._listeners.setdefault((thing, stream), []).append(lst)
        topic = f"$aws/things/{thing}/streams/{stream}/get/{cfg.stream_format}"
        idle = 0
        deadline = time.monotonic() + cfg.stream_deadline_s
        try:
            while part.bitmap.missing():
                if key in self._gone:
                    raise FetchError(f"stream {stream} file {f.fileid}: download called off",
                                     UpdateResult.CONNECTION_LOST)
                if time.monotonic() > deadline:
                    raise FetchError(
                        f"stream {stream} file {f.fileid}: not complete within "
                        f"{cfg.stream_deadline_s:g}s ({part.bitmap.missing()} of {part.blocks} "
                        "missing; kept for a resume)", UpdateResult.CONNECTION_LOST)
                if idle >= cfg.stream_rounds_without_progress:
                    raise FetchError(
                        f"stream {stream} file {f.fileid}: no block in {idle} requests "
                        f"({part.bitmap.missing()} of {part.blocks} missing; kept for a resume)",
                        UpdateResult.CONNECTION_LOST)
                client = await self._client_for(thing)
                n = min(cfg.blocks_per_request, part.bitmap.missing())
                lst.token = uuid.uuid4().hex[:16]
                body = streams.encode_request(cfg.stream_format, lst.token, f.fileid,
                                              cfg.block_size, part.bitmap, n, version)
                try:
                    await client.publish(topic, body, qos=1)
                except aiomqtt.MqttError as exc:
                    idle += 1
                    log.info("stream %s: request not sent (%s); asking again", stream, exc)
                    await asyncio.sleep(min(1.0, cfg.block_timeout_s))
                    continue
                self.stream_stats["requests"] += 1
                new = await self._round(lst, part, n, stream, deadline)
                await asyncio.to_thread(part.save)
                idle = 0 if new else idle + 1
                if new:  # "receive": "<blocks>/<total>" as the agent reports it (rate-limited)
                    got = part.blocks - part.bitmap.missing()
                    with contextlib.suppress(Exception):
                        await self.report(offer, Report(UpdateState.DOWNLOADING,
                                                        detail=f"receive {got}/{part.blocks}"))
            return await asyncio.to_thread(part.done)
        finally:
            ls = self._listeners.get((thing, stream), [])
            if lst in ls:
                ls.remove(lst)
            if not ls:
                self._listeners.pop((thing, stream), None)
            part.close()
            if key in self._gone:  # removed while it ran: nothing of it is left behind
                streams.discard(self._stream_root, key)

    async def _round(self, lst: _Listener, part: streams.Partial, n: int, stream: str,
                     deadline: float) -> int:
        """Take the blocks of one request: until ``n`` new blocks came, or no new block for
        ``block_timeout_s`` (messages that bring nothing new - duplicates, blocks out of range,
        a flood - do not extend it), or the attempt's deadline. Returns the new blocks."""
        new = 0
        quiet_until = time.monotonic() + self.ota.block_timeout_s
        while new < n:
            left = min(quiet_until, deadline) - time.monotonic()
            if left <= 0:
                break
            try:
                item = await asyncio.wait_for(lst.queue.get(), left)
            except TimeoutError:
                break
            if isinstance(item, tuple):
                _r, code, message = item
                raise FetchError(f"stream {stream} rejected the request: {code} {message}",
                                 UpdateResult.CONNECTION_LOST)
            b: streams.Block = item
            if (b.index >= part.blocks or b.length != len(b.payload)
                    or b.length != streams.block_len(b.index, part.size, part.block)):
                self.stream_stats["bad"] += 1
                continue
            if not part.bitmap.wanted(b.index):
                self.stream_stats["duplicates"] += 1
                continue
            part.write(b)
            new += 1
            quiet_until = time.monotonic() + self.ota.block_timeout_s
            self.stream_stats["blocks"] += 1
        return new

    # -- status like the OTA agent ----------------------------------------------------------
    @staticmethod
    def _rkey(offer: Offer) -> tuple[str, str, str]:
        rt = offer.report_to
        return (str(rt.get("thing")), str(rt.get("job_id")), offer.device_id)

    async def report(self, offer: Offer, report: Report) -> None:
        if report.detail.startswith(STEP_PREFIX) and not report.finished:
            state = _SELF_TEST.get(report.detail[len(STEP_PREFIX):])
            k = self._rkey(offer)
            if state is None or self._self_test.get(k) == state:
                return
            self._self_test[k] = state
            job = self._job_for(offer)
            async with job.lock:
                if not job.loaded and job.closed is None:
                    await self._load(job)
                if job.closed is not None or offer.device_id in job.results:
                    return
                await self._update(job, "IN_PROGRESS", self._details(
                    job, offer.device_id, Report(UpdateState.UPDATING, progress=1.0,
                                                 detail=f"self test {state}")))
            return
        if report.finished:
            v = offer.report_to.get("version")  # journalled with the handle (see fetch)
            if isinstance(v, str) and len(v) <= 64:
                self._versions.setdefault(self._rkey(offer), v)
        await super().report(offer, report)
        if report.result == UpdateResult.SUCCESS:  # taken by the server: not needed any more
            self._forget(offer)  # (a FAILED one is kept for a retry of the job, swept later)

    async def canceled(self, offer: Offer) -> str | None:
        why = await super().canceled(offer)
        if why is not None:  # called off on the server: its download goes too
            self._forget(offer)
        return why

    def _details(self, job: _Job, dev: str, report: Report, final: bool = False) -> dict[str, str]:
        out = super()._details(job, dev, report, final)
        for (thing, job_id, d), state in sorted(self._self_test.items()):
            if (thing, job_id) == (job.thing, job.job_id) and d not in job.results:
                out[_key("self_test:", d)] = state
        k = (job.thing, job.job_id, dev)
        if report.state == UpdateState.DOWNLOADING and report.detail.startswith("receive "):
            out["receive"] = report.detail[len("receive "):]
        if not report.finished and k in self._self_test:
            out["self_test"] = self._self_test[k]
        if report.finished:
            for d, (res, detail) in sorted(job.results.items()):
                out[_key("reason:", d)] = self._reason(job, d, res, detail)
            res, detail = job.results.get(dev, (report.result.name, report.detail))
            out["reason"] = self._reason(job, dev, res, detail)
        return out

    def _reason(self, job: _Job, dev: str, res: str, detail: str) -> str:
        if res == "SUCCESS":
            v = self._versions.get((job.thing, job.job_id, dev))
            return f"accepted v{v}" if v else "accepted"
        word = "rejected" if detail.startswith("refused") else "failed"
        return _value(f"{word}: {detail}", 900)

    async def _final(self, job: _Job, dev: str, report: Report) -> None:
        bad = [d for r, d in job.results.values() if r != "SUCCESS"]
        status = ("SUCCEEDED" if not bad else
                  "REJECTED" if any(d.startswith("refused") for d in bad) else "FAILED")
        await self._update(job, status, self._details(job, dev, report, final=True), final=True)
        job.final, job.closed = status, f"job {job.job_id} finished: {status}"
        for k in [k for k in self._self_test if k[:2] == (job.thing, job.job_id)]:
            self._self_test.pop(k, None)


__all__ = ["STEP_PREFIX", "AwsOtaSource"]
