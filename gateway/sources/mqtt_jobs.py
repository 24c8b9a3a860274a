"""MQTT jobs fleet source in the AWS IoT Jobs topic layout (aiomqtt).

Owns one MQTT session for the gateway and, per device, an AWS IoT "thing" (the device id, or
``thing`` template). Topics (AWS IoT Jobs MQTT API):

- ``$aws/things/{thing}/jobs/notify-next`` (subscribed): the next pending execution changed;
  makes the next poll come sooner.
- ``$aws/things/{thing}/jobs/start-next`` ← ``{"clientToken", "statusDetails"}``, answered on
  ``/accepted`` ``{"execution": {"jobId", "jobDocument", "status", "versionNumber",
  "executionNumber", ...}, "clientToken"}`` (no ``execution`` = nothing pending) or
  ``/rejected`` ``{"code", "message", "clientToken"}``. start-next moves the job to IN_PROGRESS.
- ``$aws/things/{thing}/jobs/{jobId}/update`` ← ``{"status": IN_PROGRESS|SUCCEEDED|FAILED|REJECTED,
  "statusDetails": {str: str}, "clientToken"}``, answered on ``/accepted`` / ``/rejected``.

Job document (what the gateway understands)::

    {"devices": ["dev-1", ...],            # optional: which MCUs behind this thing
     "files": [{"url": "...", "sha256": "<hex>", "size": 123, "version": "1.2.3"}]}

or a flat ``{"url", "sha256", "size", "version"}``; FreeRTOS-OTA style
``{"afr_ota": {"files": [{"update_data_url", "filesize"}]}}`` is read too (URL and size only).
``statusDetails`` carries ``lwm2m_state``, ``lwm2m_result`` (numbers as strings, AWS requires
string values), their names, ``detail`` and ``progress`` (percent). Progress updates are
rate-limited to one per ``progress_interval_s``.

Report handle (``Offer.report_to``): ``{"thing", "job_id", "execution_number"}``; every update
names its ``executionNumber``, so a final status sent after a restart lands on the execution
the gateway worked on. An update that gets no ``/accepted`` raises ``ReportNotDelivered``.

One execution per (job, thing): with one thing for several devices (``thing: "{gateway}"``)
the execution is the gateway's as a whole. It covers the gateway's devices behind the thing
(configured, or seen) that the job names and has a file for - a device it does not cover is
left alone. Each covered device's result goes into ``statusDetails`` (``result:<device>``,
``detail:<device>``; upload ``progress:<device>``; the whole map is sent each time, AWS may
replace rather than merge it; ``_key`` escapes ids so two devices never share a key), and the
final SUCCEEDED/FAILED is sent once, when all are done - with discovery on (the roster is not
known in advance) also only once a device the job names has reported, or ``roster_wait_s``
passed. A message that cannot be parsed is dropped (logged, bounded); the session task is
supervised (restarted, with its reconnect backoff).

Closed executions: DescribeJobExecution of a terminal execution (CANCELED, TIMED_OUT,
REMOVED...) answers ``TerminalStateReached``, an update ``InvalidStateTransition``, a deleted
one ``ResourceNotFound``: any of them (or a terminal status) stops the work as a cancel
(``canceled()``). A final update rejected with ``InvalidStateTransition`` whose
``executionState`` already holds this very status and details was delivered before (its answer
was lost); otherwise ``ReportRefused``. ``InternalError``/``RequestThrottled``/
``VersionMismatch`` are retried; a start-next whose answer is lost is asked again (bounded).
Trust: ``ca_file`` is the broker's; downloads use the system CAs or ``download_ca_file``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import ssl
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from gateway import safejson
from gateway.artifacts.bundle import may_be_bundle, set_cap
from gateway.config import ConfigError
from gateway.download import Downloader, DownloadTimeouts
from gateway.inventory import shadow_document
from gateway.mcuboot import Version
from gateway.sources.base import (
    DeviceView,
    FetchError,
    FleetSource,
    Offer,
    Report,
    ReportNotDelivered,
    ReportRefused,
    UpdateResult,
    UpdateState,
    peeking,
)
from gateway.sources.settings import MqttJobsSourceConfig

log = logging.getLogger(__name__)


# AWS IoT Jobs MQTT error codes worth another try (jobs-api.html, "ErrorResponse")
_TRANSIENT = {"InternalError", "RequestThrottled", "VersionMismatch"}
# answers that say an execution takes no more work (jobs-api.html, "ErrorResponse"): it is in a
# terminal state - CANCELED, TIMED_OUT, REMOVED... (DescribeJobExecution: TerminalStateReached,
# UpdateJobExecution: InvalidStateTransition) - or it is gone (ResourceNotFound)
_CLOSED_CODES = {"TerminalStateReached", "InvalidStateTransition", "ResourceNotFound"}
_TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"}
_START_NEXT_TRIES = 3  # a start-next whose answer was lost is asked again (it is idempotent)
_MAX_DETAILED_DEVICES = 100  # per-device statusDetails entries kept (bounded map)
_MAX_PAYLOAD = 256 * 1024  # an MQTT answer larger than this is not parsed
_MAX_DOCUMENT = 32 * 1024  # AWS job documents are at most 32 KiB
_KEY_BAD = re.compile(r"[^a-zA-Z0-9_-]")
_KEY_MAX = 128


def _key(prefix: str, device_id: str) -> str:
    """A statusDetails key AWS takes ([a-zA-Z0-9:_-], 1-128 characters), distinct for distinct
    device ids: every other character (``:`` too) is escaped as ``:`` + two hex digits per
    UTF-8 byte ("pump.1" -> "pump:2e1", "pump_1" stays). Too long: cut, and ``:z`` + 16 hex
    digits of the id's sha256 appended - ``:z`` never occurs in an uncut encoding."""
    enc = _KEY_BAD.sub(lambda m: "".join(f":{b:02x}" for b in m.group().encode()), device_id)
    if len(prefix) + len(enc) <= _KEY_MAX:
        return prefix + enc
    digest = hashlib.sha256(device_id.encode()).hexdigest()[:16]
    return prefix + enc[:_KEY_MAX - len(prefix) - 18] + ":z" + digest


def _value(text: str, limit: int = 1000) -> str:
    """A statusDetails value AWS takes (1-1024 characters, no control characters)."""
    clean = "".join(c if c.isprintable() else " " for c in text)[:limit]
    return clean or "-"


class _NoAnswer(FetchError):
    """A request was sent but neither ``/accepted`` nor ``/rejected`` came back in time."""


@dataclass
class _Job:
    """One job execution - AWS has one per (job, thing). With one thing for several devices
    (``thing: "{gateway}"``) the gateway works it as a whole: each device the job covers
    reports its result into it, and one final status is sent when every covered device is done.
    """

    thing: str
    job_id: str
    execution_number: int | None = None
    document: Any = None
    loaded: bool = False  # document and the results already with the server are known
    results: dict[str, tuple[str, str]] = field(default_factory=dict)  # device: (result, detail)
    progress: dict[str, str] = field(default_factory=dict)  # device: percent uploaded
    last_sig: dict[str, tuple[int, int]] = field(default_factory=dict)
    last_progress_at: dict[str, float] = field(default_factory=dict)
    closed: str | None = None  # why the execution takes no more work (None: open)
    seen_at: float = field(default_factory=time.monotonic)  # first seen by this process
    final: str | None = None  # the final status this gateway got accepted
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class MqttJobsSource(FleetSource):
    name = "mqtt_jobs"
    # peek: DescribeJobExecution of $next instead of start-next, no status, no inventory
    peekable = True

    def __init__(self, cfg: MqttJobsSourceConfig, state_dir: Path, gateway_id: str = "smp-gateway",
                 devices: Iterable[tuple[str, str | None]] = (), roster_open: bool = False) -> None:
        self.cfg = cfg
        self.gateway_id = gateway_id
        # downloads trust the system CAs (or download_ca_file), never the broker's ca_file: the
        # firmware host is not the broker
        self._downloader = Downloader(
            Path(state_dir),
            ca_file=cfg.download_ca_file,
            insecure=cfg.insecure,
            timeouts=DownloadTimeouts(read_s=cfg.download_read_timeout_s),
            retries=cfg.download_retries,
        )
        self._client: aiomqtt.Client | None = None
        self._runner: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._things: set[str] = set()
        self._pending: dict[str, asyncio.Future[tuple[str, dict[str, Any]]]] = {}
        self._notified: set[str] = set()
        self._jobs: dict[tuple[str, str], _Job] = {}
        self.notified = asyncio.Event()  # set when notify-next announces a pending job
        self._stopping = False
        self._dropped = 0  # messages not used (unreadable, hostile)
        self._inventory_sent: dict[str, str] = {}  # topic -> last reported state
        # thing -> the gateway's devices behind it (c: configured devices, and every device
        # seen asking): who an execution of that thing covers
        self._roster: dict[str, set[str]] = {}
        for dev_id, group in devices:
            self._roster.setdefault(self._thing_of(dev_id, group), set()).add(dev_id)
        # discovery configured: devices not configured may be behind a thing too (they join
        # the roster when they first ask) - the roster is not complete in advance
        self._roster_open = roster_open
        self._waker: Callable[[str], None] | None = None

    def set_waker(self, wake: Callable[[str], None]) -> None:
        """``wake(device_id)``: the device's cancel probe (and next check) now - called when an
        execution is found closed on the server (``_closed``), so a cancel learnt from a
        rejected status update is journalled and taken back at once, not a poll period later."""
        self._waker = wake

    def _closed(self, job: _Job, why: str) -> None:
        """The server says the execution takes no more work (canceled, removed, timed out): the
        job is closed and every device it covers is woken (``set_waker``)."""
        was, job.closed = job.closed, why
        if was is not None or self._waker is None:
            return
        for dev in sorted(self._covered(job) | set(job.progress)):
            try:
                self._waker(dev)
            except Exception as exc:  # a wake-up is best effort: the watcher's poll remains
                log.warning("wake-up of %s after job %s closed failed: %s", dev, job.job_id, exc)

    # -- connection ----------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None

        for key in ("ca_file", "cert_file", "key_file"):
            p = getattr(self.cfg, key)
            if p is not None and not Path(p).is_file():
                raise ConfigError(p, key, "no such file (MQTT TLS)")
        ctx = ssl.create_default_context(cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None)
        if self.cfg.cert_file and self.cfg.key_file:
            ctx.load_cert_chain(str(self.cfg.cert_file), str(self.cfg.key_file))
        if self.cfg.insecure:
            log.warning("MQTT broker certificate verification is DISABLED (insecure: true)")
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _drop(self, topic: str, why: str) -> None:
        """A message that is not used; logged at the 1st, 2nd, 4th, 8th... (bounded logs)."""
        self._dropped += 1
        if self._dropped & (self._dropped - 1) == 0:
            log.warning("MQTT message on %s dropped: %s (%d dropped so far)", topic, why[:200],
                        self._dropped)

    async def start(self) -> None:
        r = self._runner
        if r is not None and r.done() and not self._stopping:
            # the session task ended (it should not): said so, and started again
            exc = None if r.cancelled() else r.exception()
            log.error("MQTT session task ended (%s); starting it again", exc or "cancelled")
            self._runner = None
        if self._runner is None:
            self._stopping = False
            self._runner = asyncio.create_task(self._run(), name="mqtt-jobs")

    async def close(self) -> None:
        self._stopping = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        await self._downloader.close()

    async def _run(self) -> None:
        delay = 1.0
        tls = self._tls_context()
        while not self._stopping:
            try:
                async with aiomqtt.Client(
                    self.cfg.host,
                    self.cfg.port,
                    identifier=self.cfg.client_id or self.gateway_id,
                    username=self.cfg.username,
                    password=self.cfg.password.get() if self.cfg.password else None,
                    keepalive=self.cfg.keepalive_s,
                    tls_context=tls,
                    tls_insecure=self.cfg.insecure if tls is not None else None,
                ) as client:
                    self._client = client
                    for thing in list(self._things):
                        await self._subscribe(client, thing)
                    self._connected.set()
                    delay = 1.0
                    log.info("connected to MQTT broker %s:%d", self.cfg.host, self.cfg.port)
                    async for msg in client.messages:
                        try:  # one hostile message costs that message, never the session
                            self._dispatch(msg.topic.value, msg.payload)
                        except Exception as exc:
                            self._drop(msg.topic.value, f"{type(exc).__name__}: {exc}")
            except aiomqtt.MqttError as exc:
                log.warning(
                    "MQTT connection to %s:%d lost: %s; reconnecting in %.0fs",
                    self.cfg.host,
                    self.cfg.port,
                    exc,
                    delay,
                )
            except Exception as exc:  # never silently dead: logged, and the session starts over
                log.error("MQTT session with %s:%d failed: %s: %s; reconnecting in %.0fs",
                          self.cfg.host, self.cfg.port, type(exc).__name__, exc, delay,
                          exc_info=exc)
            finally:
                self._connected.clear()
                self._client = None
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(FetchError("MQTT connection lost", UpdateResult.CONNECTION_LOST))
            if self._stopping:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 60.0)

    @staticmethod
    async def _subscribe(client: aiomqtt.Client, thing: str) -> None:
        base = f"$aws/things/{thing}/jobs"
        await client.subscribe(
            [
                (f"{base}/notify-next", 1),
                (f"{base}/start-next/accepted", 1),
                (f"{base}/start-next/rejected", 1),
                (f"{base}/+/update/accepted", 1),
                (f"{base}/+/update/rejected", 1),
                (f"{base}/+/get/accepted", 1),
                (f"{base}/+/get/rejected", 1),
            ]
        )

    async def _client_for(self, thing: str) -> aiomqtt.Client:
        await self.start()
        try:
            await asyncio.wait_for(self._connected.wait(), self.cfg.request_timeout_s)
        except TimeoutError:
            raise FetchError(
                f"MQTT broker {self.cfg.host}:{self.cfg.port} unreachable", UpdateResult.CONNECTION_LOST
            ) from None
        client = self._client
        if client is None:
            raise FetchError("MQTT connection lost", UpdateResult.CONNECTION_LOST)
        if thing not in self._things:
            self._things.add(thing)
            await self._subscribe(client, thing)
        return client

    def _dispatch(self, topic: str, payload: Any) -> None:
        if not isinstance(payload, bytes | str) or len(payload) > _MAX_PAYLOAD:
            log.warning("unusable MQTT message on %s (not text, or over %d bytes)", topic, _MAX_PAYLOAD)
            return
        try:
            data = safejson.loads(payload)
        except (ValueError, RecursionError) as exc:  # not JSON, not UTF-8, nested too deep...
            self._drop(topic, f"unreadable ({type(exc).__name__})")
            return
        if not isinstance(data, dict):
            return
        if topic.endswith("/notify-next"):
            thing = topic.split("/")[2]
            if data.get("execution"):
                log.info("jobs service notified a pending job for %s", thing)
                self._notified.add(thing)
                self.notified.set()
            return
        token = data.get("clientToken")
        fut = self._pending.pop(token, None) if isinstance(token, str) else None
        if fut is not None and not fut.done():
            fut.set_result(("accepted" if topic.endswith("/accepted") else "rejected", data))

    async def _request(self, thing: str, topic: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if peeking() and not topic.endswith("/get"):  # run --dry-run: describe only
            raise FetchError(f"{topic}: not sent in a read-only check", UpdateResult.CONNECTION_LOST)
        client = await self._client_for(thing)
        token = uuid.uuid4().hex
        body = {**body, "clientToken": token}
        fut: asyncio.Future[tuple[str, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        try:
            await client.publish(topic, json.dumps(body), qos=1)
            return await asyncio.wait_for(fut, self.cfg.request_timeout_s)
        except TimeoutError:
            raise _NoAnswer(f"no answer on {topic} within {self.cfg.request_timeout_s:g}s",
                            UpdateResult.CONNECTION_LOST) from None
        except aiomqtt.MqttError as exc:
            raise FetchError(f"MQTT publish failed: {exc}", UpdateResult.CONNECTION_LOST) from None
        finally:
            self._pending.pop(token, None)

    def poll_interval(self) -> float:
        return 1.0 if self._notified else self.cfg.poll_interval_s

    def _thing_of(self, device_id: str, group: str | None) -> str:
        return self.cfg.thing.format(device=device_id, gateway=self.gateway_id, group=group or "")

    def thing_name(self, device: DeviceView) -> str:
        return self._thing_of(device.id, device.group)

    # -- FleetSource ---------------------------------------------------------------------
    async def check(self, device: DeviceView) -> Offer | None:
        thing = self.thing_name(device)
        self._roster.setdefault(thing, set()).add(device.id)
        if peeking():  # read-only: describe the next execution, start nothing, publish nothing
            data = await self._describe_next(thing)
        else:
            await self.publish_inventory(thing, device)
            self._notified.discard(thing)
            if not self._notified:
                self.notified.clear()
            data = await self._start_next(thing)
        execution = data.get("execution")
        if not isinstance(execution, dict):
            return None
        job_id = str(execution.get("jobId"))
        number = execution.get("executionNumber")
        number = number if isinstance(number, int) and not isinstance(number, bool) else None
        job = self._jobs.get((thing, job_id))
        if job is None or job.closed or job.execution_number != number:  # a new execution
            job = self._jobs[(thing, job_id)] = _Job(thing, job_id, number)
        if not job.loaded:
            self._adopt(job, execution)
        try:
            files = _files(job.document)
        except ValueError as exc:
            if peeking():
                raise FetchError(f"job {job_id}: document not understood: {exc} (a pass reports "
                                 "the job FAILED)", UpdateResult.INVALID_URI) from None
            await self._update_quietly(
                job,
                "FAILED",
                {
                    "lwm2m_result": str(int(UpdateResult.INVALID_URI)),
                    "lwm2m_result_name": UpdateResult.INVALID_URI.name,
                    "detail": _value(f"job document not understood: {exc}"),
                },
            )
            return None
        covered = self._covered(job)
        if device.id not in covered:
            # (c) which devices an execution covers is the gateway's configuration (the devices
            # behind this thing) crossed with the job's list: a device the job does not name is
            # simply not part of it - REJECTED only when no device of this thing can do it
            if not covered and not peeking():
                await self._update_quietly(job, "REJECTED", {"detail": _value(
                    f"no device of this gateway behind {thing} is named by the job or has a file "
                    f"in it (asked by {device.id})")})
            return None
        if device.id in job.results:
            if not peeking():
                await self._final_if_due(job)  # a final status that waited for an unseen device
            return None  # its part of this execution is done (its result is with the server)
        f = _file_for(files, device.id)
        assert f is not None  # covered
        version = None
        if isinstance(f.get("version"), str):
            try:
                version = Version.parse(f["version"])
            except ValueError:
                version = None
        sha = f.get("sha256")
        return Offer(
            device_id=device.id,
            source=self.name,
            artifact_id=f"job-{sha.lower()}" if isinstance(sha, str) else f"job-{job_id}",
            version=version,
            sha256=sha.lower() if isinstance(sha, str) else None,
            size=f.get("size") if isinstance(f.get("size"), int) else None,
            handle={"job": job, "url": f["url"]},
            report_to={"thing": thing, "job_id": job_id, "execution_number": job.execution_number},
        )

    async def _start_next(self, thing: str) -> dict[str, Any]:
        """StartNextPendingJobExecution; an answer lost (or RequestThrottled/InternalError) is
        asked again, at most ``_START_NEXT_TRIES`` times - start-next returns the execution
        already IN_PROGRESS, so asking twice starts nothing twice."""
        topic = f"$aws/things/{thing}/jobs/start-next"
        last = ""
        for _ in range(_START_NEXT_TRIES):
            try:
                verdict, data = await self._request(
                    thing, topic, {"statusDetails": {"gateway": _value(self.gateway_id)}})
            except _NoAnswer as exc:
                last = str(exc)
                log.info("start-next for %s: %s; asking again", thing, exc)
                continue
            if verdict == "accepted":
                return data
            code, message = data.get("code"), data.get("message")
            if code in _TRANSIENT:
                last = f"{code} {message}"
                continue
            raise FetchError(f"start-next rejected for {thing}: {code} {message}",
                             UpdateResult.CONNECTION_LOST)
        raise FetchError(f"start-next for {thing}: no usable answer after {_START_NEXT_TRIES} tries "
                         f"({last}); is the jobs service behind MQTT broker {self.cfg.host}:"
                         f"{self.cfg.port} up?", UpdateResult.CONNECTION_LOST)

    async def _describe_next(self, thing: str) -> dict[str, Any]:
        """DescribeJobExecution of ``$next`` (the next pending execution, IN_PROGRESS or
        QUEUED): read-only, unlike start-next. Nothing pending: an answer without execution."""
        verdict, data = await self._request(thing, f"$aws/things/{thing}/jobs/$next/get",
                                            {"includeJobDocument": True})
        if verdict == "accepted":
            return data
        if data.get("code") == "ResourceNotFound":
            return {}
        raise FetchError(f"describe of the next job for {thing} rejected: {data.get('code')} "
                         f"{data.get('message')}", UpdateResult.CONNECTION_LOST)

    def _adopt(self, job: _Job, execution: dict[str, Any]) -> None:
        """Take the execution's job document and the per-device results this gateway already
        put in its statusDetails (after a restart, the server holds them)."""
        doc = execution.get("jobDocument")
        if isinstance(doc, str) and len(doc) <= _MAX_DOCUMENT:  # JobExecution documents it a string
            try:
                doc = safejson.loads(doc)
            except (ValueError, RecursionError):
                pass
        job.document = doc
        details = execution.get("statusDetails")
        if isinstance(details, dict):
            roster = self._roster.get(job.thing, set())
            keys: dict[str, list[str]] = {}
            for dev in roster:
                keys.setdefault(_key("result:", dev), []).append(dev)
            for dev in roster:
                if len(keys[_key("result:", dev)]) > 1:  # never another device's result as its own
                    log.error("devices %s share the statusDetails key %s: their results are not "
                              "adopted (each is updated again)", keys[_key("result:", dev)],
                              _key("result:", dev))
                    continue
                res = details.get(_key("result:", dev))
                if isinstance(res, str) and res in UpdateResult.__members__:
                    job.results[dev] = (res, str(details.get(_key("detail:", dev), ""))[:200])
        job.loaded = True

    def _covered(self, job: _Job) -> set[str]:
        """The gateway's devices behind the job's thing that the job names and has a file for."""
        try:
            files = _files(job.document)
        except ValueError:
            return set()
        named = job.document.get("devices") if isinstance(job.document, dict) else None
        return {d for d in self._roster.get(job.thing, ())
                if (not isinstance(named, list) or d in named) and _file_for(files, d) is not None}

    async def publish_inventory(self, thing: str, device: DeviceView) -> None:
        """The device's inventory, retained, in the AWS Device Shadow layout
        (``{"state": {"reported": ...}}``) on ``inventory_topic`` - sent when it changed."""
        topic_t = self.cfg.inventory_topic
        if not topic_t or not device.inventory:
            return

        doc = shadow_document(device.inventory)
        sig = json.dumps(doc["state"], sort_keys=True, default=str)
        topic = topic_t.format(thing=thing, device=device.id, gateway=self.gateway_id)
        if self._inventory_sent.get(topic) == sig:
            return
        client = await self._client_for(thing)
        try:
            await client.publish(topic, json.dumps(doc, default=str), qos=1, retain=True)
            self._inventory_sent[topic] = sig
        except aiomqtt.MqttError as exc:
            log.warning("inventory of %s not published on %s: %s", device.id, topic, exc)

    async def canceled(self, offer: Offer) -> str | None:
        """Whether the execution was called off: already known closed (a rejected update), or
        DescribeJobExecution (``jobs/{jobId}/get``) answers TerminalStateReached (CANCELED,
        TIMED_OUT, REMOVED... - AWS answers a describe of a terminal execution so),
        ResourceNotFound, or a terminal status. Any of them stops the work like a cancel."""
        job = self._job_for(offer)
        if job.final is not None:
            return None  # closed by this gateway's own final status
        if job.closed is not None:
            return job.closed
        body: dict[str, Any] = {"includeJobDocument": False}
        if job.execution_number is not None:
            body["executionNumber"] = job.execution_number
        verdict, data = await self._request(
            job.thing, f"$aws/things/{job.thing}/jobs/{job.job_id}/get", body)
        if verdict == "rejected":
            code = data.get("code")
            if code in ("TerminalStateReached", "ResourceNotFound"):
                job.closed = (f"job {job.job_id} canceled on the server: its execution for "
                              f"{job.thing} is {'gone' if code == 'ResourceNotFound' else 'closed'} "
                              f"({code})")
            return job.closed
        status = (data.get("execution") or {}).get("status")
        if status in _TERMINAL:
            job.closed = f"job {job.job_id} {str(status).lower()}" + (
                "" if status == "CANCELED" else f" (canceled on the server: {status})")
        return job.closed

    async def acknowledge_cancel(self, offer: Offer, done: bool, detail: str) -> None:
        # AWS IoT Jobs: a canceled or removed execution accepts no status update; the cancel is
        # acknowledged by not reporting it any more (and logged here)
        log.info("job of %s canceled on the server: %s", offer.device_id, detail)

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        if may_be_bundle(urlsplit(offer.handle["url"]).path):  # an image set (dfu_application.zip)
            max_size = set_cap(max_size)
        return await self._downloader.fetch(
            offer.handle["url"], sha256=offer.sha256, max_size=max_size, size=offer.size
        )

    def _job_for(self, offer: Offer) -> _Job:
        """The job execution of ``offer`` from its report handle (also after a restart)."""
        rt = offer.report_to
        try:
            thing, job_id = str(rt["thing"]), str(rt["job_id"])
        except KeyError as exc:
            raise ReportRefused(f"MQTT jobs report handle of {offer.device_id} lacks {exc}") from None
        self._roster.setdefault(thing, set()).add(offer.device_id)
        number = rt.get("execution_number")
        job = self._jobs.get((thing, job_id))
        if job is None or (isinstance(number, int) and job.execution_number not in (None, number)):
            job = self._jobs[(thing, job_id)] = _Job(thing, job_id)
        if job.execution_number is None and isinstance(number, int):
            job.execution_number = number
        return job

    async def _load(self, job: _Job) -> None:
        """DescribeJobExecution of a job this process did not start (a restart): its document
        and the results already with the server; closed when it is terminal or gone."""
        body: dict[str, Any] = {"includeJobDocument": True}
        if job.execution_number is not None:
            body["executionNumber"] = job.execution_number
        try:
            verdict, data = await self._request(
                job.thing, f"$aws/things/{job.thing}/jobs/{job.job_id}/get", body)
        except FetchError as exc:
            raise ReportNotDelivered(f"job {job.job_id} of {job.thing}: {exc}") from None
        if verdict == "rejected":
            code = data.get("code")
            if code in ("TerminalStateReached", "ResourceNotFound"):
                job.closed = f"job {job.job_id} of {job.thing} is closed ({code})"
                return
            raise ReportNotDelivered(f"job {job.job_id} of {job.thing}: describe rejected: {code}")
        execution = data.get("execution")
        if not isinstance(execution, dict) or execution.get("status") in _TERMINAL:
            job.closed = f"job {job.job_id} of {job.thing} is closed"
            return
        self._adopt(job, execution)

    async def report(self, offer: Offer, report: Report) -> None:
        job = self._job_for(offer)
        dev = offer.device_id
        async with job.lock:  # one update of an execution at a time: each sends the whole map
            if not job.loaded and job.closed is None:
                await self._load(job)
            if job.closed is not None:
                if report.finished:
                    await self._settle_closed(job, dev, report)
                return
            if report.finished:
                job.results[dev] = (report.result.name, _value(report.detail, 200))
                job.progress.pop(dev, None)
                if self._final_waits(job):  # the execution is the gateway's: final when all are done
                    await self._update(job, "IN_PROGRESS", self._details(job, dev, report))
                    return
                await self._final(job, dev, report)
                return
            if dev in job.results:
                return
            sig = (int(report.state), int(report.result))
            now = time.monotonic()
            if (sig == job.last_sig.get(dev)
                    and now - job.last_progress_at.get(dev, 0.0) < self.cfg.progress_interval_s):
                return
            job.last_sig[dev], job.last_progress_at[dev] = sig, now
            if report.progress is not None:
                job.progress[dev] = str(round(report.progress * 100))
            await self._update(job, "IN_PROGRESS", self._details(job, dev, report))

    def _final_waits(self, job: _Job) -> set[str]:
        """The devices the execution still waits for before its final status: every covered
        device without a result - and, while the roster is not complete in advance (discovery)
        and for at most ``roster_wait_s``, a device the job names that could be behind this
        thing but has not asked yet. Never a success declared for a device not heard from."""
        waiting = self._covered(job) - job.results.keys()
        if waiting or not self._roster_open:
            return waiting
        named = job.document.get("devices") if isinstance(job.document, dict) else None
        if not isinstance(named, list) or time.monotonic() - job.seen_at >= self.cfg.roster_wait_s:
            return set()
        try:
            files = _files(job.document)
        except ValueError:
            return set()
        return {d for d in named[:_MAX_DETAILED_DEVICES] if isinstance(d, str)
                and d not in job.results and _file_for(files, d) is not None}

    async def _final(self, job: _Job, dev: str, report: Report) -> None:
        failed = any(r != "SUCCESS" for r, _d in job.results.values())
        status = "FAILED" if failed else "SUCCEEDED"
        await self._update(job, status, self._details(job, dev, report, final=True), final=True)
        job.final, job.closed = status, f"job {job.job_id} finished: {status}"

    async def _final_if_due(self, job: _Job) -> None:
        """An execution whose devices all reported but whose final status waited for a named
        device not seen (``_final_waits``): sent once that wait is over (at a later check)."""
        async with job.lock:
            if job.closed is not None or not job.results or self._final_waits(job):
                return
            dev, (res, detail) = sorted(job.results.items())[-1]
            report = Report(UpdateState.IDLE, UpdateResult[res], detail=detail)
            try:
                await self._final(job, dev, report)
            except ReportNotDelivered as exc:  # asked again at the next check
                log.warning("%s", exc)

    def _details(self, job: _Job, dev: str, report: Report, final: bool = False) -> dict[str, str]:
        """The execution's whole statusDetails (AWS may replace rather than merge them): the
        per-device results and progress, then the reporting device's state - or, for a final
        status over several devices, a summary of them."""
        out: dict[str, str] = {"gateway": _value(self.gateway_id)}
        for d, (res, detail) in sorted(job.results.items())[:_MAX_DETAILED_DEVICES]:
            out[_key("result:", d)] = res
            if detail != "-":
                out[_key("detail:", d)] = detail
        for d, pct in sorted(job.progress.items())[:_MAX_DETAILED_DEVICES]:
            out[_key("progress:", d)] = pct
        if final and len(job.results) > 1:
            bad = sorted((d, r) for d, (r, _x) in job.results.items() if r != "SUCCESS")
            result = UpdateResult[bad[0][1]] if bad else UpdateResult.SUCCESS
            text = f"{len(job.results) - len(bad)}/{len(job.results)} devices updated or up to date"
            if bad:
                text += "; failed: " + ", ".join(f"{d} {r}" for d, r in bad)
            out.update(lwm2m_state=str(int(UpdateState.IDLE)), lwm2m_state_name="IDLE",
                       lwm2m_result=str(int(result)), lwm2m_result_name=result.name,
                       detail=_value(text))
            return out
        out.update(device=_value(dev), lwm2m_state=str(int(report.state)),
                   lwm2m_state_name=report.state.name, lwm2m_result=str(int(report.result)),
                   lwm2m_result_name=report.result.name)
        if report.detail:
            out["detail"] = _value(report.detail)
        if report.progress is not None:
            out["progress"] = str(round(report.progress * 100))
        return out

    async def _settle_closed(self, job: _Job, dev: str, report: Report) -> None:
        """A device's final report for an execution that takes no more updates: delivered when
        the execution's terminal state holds this device's result (a final status sent before,
        whose answer was lost or whose process restarted), refused otherwise."""
        if job.final is not None and job.results.get(dev, ("",))[0] == report.result.name:
            return  # its result went out with this gateway's final status
        if job.final is None:  # closed before this process sent anything (restarted): ask it
            status = "SUCCEEDED" if report.result == UpdateResult.SUCCESS else "FAILED"
            body: dict[str, Any] = {"status": status, "statusDetails": {"gateway": _value(self.gateway_id)}}
            if job.execution_number is not None:
                body["executionNumber"] = job.execution_number
            try:
                verdict, data = await self._request(
                    job.thing, f"$aws/things/{job.thing}/jobs/{job.job_id}/update", body)
            except FetchError as exc:
                raise ReportNotDelivered(f"job {job.job_id} of {job.thing}: {exc}") from None
            state = _state_of(data)
            have = state.get("statusDetails")
            if (verdict == "rejected" and state.get("status") in ("SUCCEEDED", "FAILED")
                    and isinstance(have, dict) and have.get(_key("result:", dev)) == report.result.name):
                log.info("job %s of %s already holds the result of %s (delivered before)",
                         job.job_id, job.thing, dev)
                return
        raise ReportRefused(f"job {job.job_id} of {job.thing} is closed: {job.closed}")

    async def _update_quietly(self, job: _Job, status: str, details: dict[str, str]) -> None:
        """An update the gateway may lose (the job is offered again at the next poll)."""
        try:
            await self._update(job, status, details)
        except ReportNotDelivered as exc:
            log.warning("%s", exc)

    async def _update(self, job: _Job, status: str, details: dict[str, str],
                      final: bool = False) -> None:
        """UpdateJobExecution; returns once accepted, else raises ReportNotDelivered.

        A rejection saying the execution is closed (InvalidStateTransition, ResourceNotFound,
        TerminalStateReached) closes the job here: the work on it stops like a cancel."""
        body: dict[str, Any] = {"status": status, "statusDetails": details}
        if job.execution_number is not None:
            body["executionNumber"] = job.execution_number
        try:
            verdict, data = await self._request(
                job.thing, f"$aws/things/{job.thing}/jobs/{job.job_id}/update", body)
        except FetchError as exc:
            raise ReportNotDelivered(f"job {job.job_id} update ({status}) not delivered: {exc}") from None
        if verdict == "accepted":
            return
        code, message = data.get("code"), data.get("message")
        if code in _TRANSIENT:
            raise ReportNotDelivered(f"job {job.job_id} update to {status} rejected for now: "
                                     f"{code} {message}")
        state = _state_of(data)
        if final and code == "InvalidStateTransition" and _holds(state, status, details):
            log.info("job %s of %s already holds %s (an earlier delivery got through)",
                     job.job_id, job.thing, status)
            return
        if code in _CLOSED_CODES:
            self._closed(job, f"job {job.job_id} canceled on the server: its execution for "
                              f"{job.thing} is {state.get('status') or 'closed'} ({code})")
        raise ReportRefused(f"job {job.job_id} of {job.thing}: update to {status} rejected: "
                            f"{code} {message}")


def _state_of(data: dict[str, Any]) -> dict[str, Any]:
    """The ``executionState`` of an ErrorResponse (InvalidStateTransition, VersionMismatch)."""
    state = data.get("executionState")
    return state if isinstance(state, dict) else {}


def _holds(state: dict[str, Any], status: str, details: dict[str, str]) -> bool:
    """The execution's state is this very final status with these very details."""
    have = state.get("statusDetails")
    return (state.get("status") == status and isinstance(have, dict)
            and all(have.get(k) == v for k, v in details.items()))


def _file_for(files: list[dict[str, Any]], device_id: str) -> dict[str, Any] | None:
    return next((f for f in files if f.get("device") in (None, device_id)), None)


def _files(doc: Any) -> list[dict[str, Any]]:
    if not isinstance(doc, dict):
        raise ValueError("job document is not an object")
    raw: Any
    if isinstance(doc.get("files"), list):
        raw = doc["files"]
    elif isinstance(doc.get("afr_ota"), dict) and isinstance(doc["afr_ota"].get("files"), list):
        raw = [
            {"url": f.get("update_data_url"), "size": f.get("filesize")}
            for f in doc["afr_ota"]["files"]
            if isinstance(f, dict)
        ]
    elif "url" in doc:
        raw = [doc]
    else:
        raise ValueError("no files/url in the job document")
    out = []
    for f in raw:
        if not isinstance(f, dict) or not isinstance(f.get("url"), str) or not f["url"]:
            raise ValueError("a file entry has no url")
        out.append(f)
    if not out:
        raise ValueError("the job document lists no files")
    return out
