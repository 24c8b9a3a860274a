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
the gateway worked on. An update that gets no ``/accepted`` raises ``ReportNotDelivered``. A
final update rejected with ``InvalidStateTransition`` carries the execution's state (AWS puts
``executionState`` in that error): if it already holds this very status and LwM2M result, an
earlier delivery whose answer was lost got through (delivered); otherwise the execution was
closed by someone else and ``ReportRefused`` is raised, as for ``ResourceNotFound`` and
malformed requests. ``InternalError``/``RequestThrottled``/``VersionMismatch`` are retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiomqtt

from gateway.artifacts.bundle import may_be_bundle, set_cap
from gateway.download import Downloader, DownloadTimeouts
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
)
from gateway.sources.settings import MqttJobsSourceConfig

log = logging.getLogger(__name__)


# AWS IoT Jobs MQTT error codes worth another try (jobs-api.html, "ErrorResponse")
_TRANSIENT = {"InternalError", "RequestThrottled", "VersionMismatch"}


@dataclass
class _Job:
    thing: str
    job_id: str
    execution_number: int | None = None
    last_sig: tuple[int, int] | None = None
    last_progress_at: float = 0.0
    closed: bool = False


class MqttJobsSource(FleetSource):
    name = "mqtt_jobs"

    def __init__(self, cfg: MqttJobsSourceConfig, state_dir: Path, gateway_id: str = "smp-gateway") -> None:
        self.cfg = cfg
        self.gateway_id = gateway_id
        self._downloader = Downloader(
            Path(state_dir),
            ca_file=cfg.ca_file,
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
        self._inventory_sent: dict[str, str] = {}  # topic -> last reported state

    # -- connection ----------------------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext | None:
        if not self.cfg.tls:
            return None
        from gateway.config import ConfigError

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

    async def start(self) -> None:
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
                        self._dispatch(msg.topic.value, msg.payload)
            except aiomqtt.MqttError as exc:
                log.warning(
                    "MQTT connection to %s:%d lost: %s; reconnecting in %.0fs",
                    self.cfg.host,
                    self.cfg.port,
                    exc,
                    delay,
                )
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
        try:
            data = json.loads(payload if isinstance(payload, bytes | str) else b"")
        except ValueError:
            log.warning("unreadable MQTT message on %s", topic)
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
        client = await self._client_for(thing)
        token = uuid.uuid4().hex
        body = {**body, "clientToken": token}
        fut: asyncio.Future[tuple[str, dict[str, Any]]] = asyncio.get_running_loop().create_future()
        self._pending[token] = fut
        try:
            await client.publish(topic, json.dumps(body), qos=1)
            return await asyncio.wait_for(fut, self.cfg.request_timeout_s)
        except TimeoutError:
            raise FetchError(f"no answer on {topic}", UpdateResult.CONNECTION_LOST) from None
        except aiomqtt.MqttError as exc:
            raise FetchError(f"MQTT publish failed: {exc}", UpdateResult.CONNECTION_LOST) from None
        finally:
            self._pending.pop(token, None)

    def poll_interval(self) -> float:
        return 1.0 if self._notified else self.cfg.poll_interval_s

    def thing_name(self, device: DeviceView) -> str:
        return self.cfg.thing.format(device=device.id, gateway=self.gateway_id, group=device.group or "")

    # -- FleetSource ---------------------------------------------------------------------
    async def check(self, device: DeviceView) -> Offer | None:
        thing = self.thing_name(device)
        await self.publish_inventory(thing, device)
        self._notified.discard(thing)
        if not self._notified:
            self.notified.clear()
        verdict, data = await self._request(
            thing, f"$aws/things/{thing}/jobs/start-next", {"statusDetails": {"gateway": self.gateway_id}}
        )
        if verdict == "rejected":
            raise FetchError(
                f"start-next rejected for {thing}: {data.get('code')} {data.get('message')}",
                UpdateResult.CONNECTION_LOST,
            )
        execution = data.get("execution")
        if not isinstance(execution, dict):
            return None
        job_id = str(execution.get("jobId"))
        doc = execution.get("jobDocument")
        number = execution.get("executionNumber")
        number = number if isinstance(number, int) else None
        job = self._jobs.get((thing, job_id))
        if job is None or job.closed or job.execution_number != number:  # a new execution
            job = self._jobs[(thing, job_id)] = _Job(thing, job_id, number)
        try:
            files = _files(doc)
        except ValueError as exc:
            await self._update_quietly(
                job,
                "FAILED",
                {
                    "lwm2m_result": str(int(UpdateResult.INVALID_URI)),
                    "lwm2m_result_name": UpdateResult.INVALID_URI.name,
                    "detail": f"job document not understood: {exc}"[:1000],
                },
            )
            return None
        devices = doc.get("devices") if isinstance(doc, dict) else None
        if isinstance(devices, list) and device.id not in devices:
            await self._update_quietly(
                job, "REJECTED", {"detail": f"device {device.id} is not named by the job"})
            return None
        mine = [f for f in files if f.get("device") in (None, device.id)]
        if not mine:
            await self._update_quietly(job, "REJECTED", {"detail": f"no file for device {device.id}"})
            return None
        f = mine[0]
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

    async def publish_inventory(self, thing: str, device: DeviceView) -> None:
        """The device's inventory, retained, in the AWS Device Shadow layout
        (``{"state": {"reported": ...}}``) on ``inventory_topic`` - sent when it changed."""
        topic_t = self.cfg.inventory_topic
        if not topic_t or not device.inventory:
            return
        from gateway.inventory import shadow_document

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
        """DescribeJobExecution (``jobs/{jobId}/get``): CANCELED/REMOVED, or the execution gone."""
        job = self._job_for(offer)
        verdict, data = await self._request(job.thing, f"$aws/things/{job.thing}/jobs/{job.job_id}/get",
                                            {"includeJobDocument": False})
        if verdict == "rejected":
            if data.get("code") == "ResourceNotFound":
                job.closed = True
                return f"job {job.job_id} no longer exists for {job.thing} (removed)"
            return None
        status = (data.get("execution") or {}).get("status")
        if status in ("CANCELED", "REMOVED"):
            job.closed = True  # a canceled execution takes no more updates
            return f"job {job.job_id} {status.lower()}"
        return None

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
        job = self._jobs.get((thing, job_id))
        if job is None:
            job = self._jobs[(thing, job_id)] = _Job(thing, job_id)
        number = rt.get("execution_number")
        if job.execution_number is None and isinstance(number, int):
            job.execution_number = number
        return job

    async def report(self, offer: Offer, report: Report) -> None:
        job = self._job_for(offer)
        if job.closed:
            if report.finished:
                raise ReportRefused(f"job {job.job_id} of {job.thing} is already closed")
            return
        sig = (int(report.state), int(report.result))
        now = time.monotonic()
        if (
            not report.finished
            and sig == job.last_sig
            and now - job.last_progress_at < self.cfg.progress_interval_s
        ):
            return
        job.last_sig, job.last_progress_at = sig, now
        details = {
            "device": offer.device_id,
            "lwm2m_state": str(int(report.state)),
            "lwm2m_state_name": report.state.name,
            "lwm2m_result": str(int(report.result)),
            "lwm2m_result_name": report.result.name,
        }
        if report.detail:
            details["detail"] = report.detail[:1000]
        if report.progress is not None:
            details["progress"] = str(round(report.progress * 100))
        if not report.finished:
            await self._update(job, "IN_PROGRESS", details)
            return
        status = "SUCCEEDED" if report.result == UpdateResult.SUCCESS else "FAILED"
        await self._update(job, status, details)
        job.closed = True

    async def _update_quietly(self, job: _Job, status: str, details: dict[str, str]) -> None:
        """An update the gateway may lose (the job is offered again at the next poll)."""
        try:
            await self._update(job, status, details)
        except ReportNotDelivered as exc:
            log.warning("%s", exc)

    async def _update(self, job: _Job, status: str, details: dict[str, str]) -> None:
        """UpdateJobExecution; returns once accepted, else raises ReportNotDelivered."""
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
        if code == "InvalidStateTransition" and status != "IN_PROGRESS":
            state = data.get("executionState") or {}
            have = state.get("statusDetails") or {}
            if state.get("status") == status and have.get("lwm2m_result") == details.get("lwm2m_result"):
                log.info("job %s of %s already holds %s (an earlier delivery got through)",
                         job.job_id, job.thing, status)
                job.closed = True
                return
        if code in _TRANSIENT:
            raise ReportNotDelivered(f"job {job.job_id} update to {status} rejected for now: "
                                     f"{code} {message}")
        if code in ("InvalidStateTransition", "ResourceNotFound"):
            job.closed = True
        raise ReportRefused(f"job {job.job_id} of {job.thing}: update to {status} rejected: "
                            f"{code} {message}")


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
