"""An AWS IoT Jobs service (device side, MQTT) written from AWS's published documentation.

Plays AWS IoT Jobs for the tests as an MQTT client of a real broker (mosquitto): it answers the
reserved request topics and publishes the notifications, with the execution state machine and
the checks AWS documents. It is written from the documentation, not from the gateway's code,
so that a test against it checks the gateway against what AWS says it does:

* Jobs device MQTT API (request/response topics and payloads, ``clientToken``/``timestamp``):
  https://docs.aws.amazon.com/iot/latest/developerguide/jobs-mqtt-api.html
* ErrorResponse and its codes (InvalidTopic, InvalidJson, InvalidRequest, InvalidStateTransition,
  ResourceNotFound, VersionMismatch, InternalError, RequestThrottled, TerminalStateReached;
  ``executionState`` only with InvalidStateTransition and VersionMismatch):
  https://docs.aws.amazon.com/iot/latest/developerguide/jobs-api.html#jobs-mqtt-error-response
* JobExecution / JobExecutionState / JobExecutionSummary data types:
  https://docs.aws.amazon.com/iot/latest/developerguide/jobs-mqtt-https-api.html and
  https://docs.aws.amazon.com/iot/latest/apireference/API_iot-jobs-data_JobExecutionState.html
  (``statusDetails``: keys 1-128 chars of ``[a-zA-Z0-9:_-]``, values 1-1024 chars, no control
  characters)
* Job execution states (QUEUED, IN_PROGRESS, SUCCEEDED, FAILED, TIMED_OUT, REJECTED, REMOVED,
  CANCELED; which are terminal; who moves an execution where):
  https://docs.aws.amazon.com/iot/latest/developerguide/iot-jobs-lifecycle.html
* ``notify`` (ListNotification) and ``notify-next`` (NextNotification), when each is sent:
  https://docs.aws.amazon.com/iot/latest/developerguide/jobs-comm-notifications.html
* CancelJob / CancelJobExecution (``force``: only then is an IN_PROGRESS execution canceled):
  https://docs.aws.amazon.com/iot/latest/apireference/API_CancelJob.html

Requests handled (``thing`` = the topic's thing name):

* ``$aws/things/{thing}/jobs/get`` - GetPendingJobExecutions: ``inProgressJobs``/``queuedJobs``.
* ``$aws/things/{thing}/jobs/start-next`` - StartNextPendingJobExecution: IN_PROGRESS first,
  then by creation; a QUEUED one becomes IN_PROGRESS with the request's ``statusDetails``; an
  IN_PROGRESS one is returned unchanged; no pending execution: no ``execution`` field.
* ``$aws/things/{thing}/jobs/{jobId}/get`` - DescribeJobExecution (``$next`` too;
  ``executionNumber``, ``includeJobDocument`` default true): an execution in a terminal state
  is answered ``TerminalStateReached``; none: ``ResourceNotFound``.
* ``$aws/things/{thing}/jobs/{jobId}/update`` - UpdateJobExecution: ``status`` must be
  IN_PROGRESS, FAILED, SUCCEEDED or REJECTED; a terminal execution answers
  ``InvalidStateTransition`` (with ``executionState``); ``expectedVersion`` that does not match
  answers ``VersionMismatch`` (with ``executionState``); ``executionNumber`` not the
  execution's: ``ResourceNotFound``; the accepted answer has ``executionState`` only with
  ``includeJobExecutionState: true`` and ``jobDocument`` only with ``includeJobDocument: true``.
  ``statusDetails`` given replaces the execution's (documented: "if not specified, the
  statusDetails are unchanged"; the docs do not say it merges, so a client must send the whole
  map it wants).

Operator side (the control plane, called by the tests): ``create_job`` (one execution per
(job, thing)), ``cancel_job``/``cancel_execution`` (``force`` for IN_PROGRESS), ``time_out``
(the in-progress timer expired), ``remove`` (the thing left the target group),
``delete_execution`` (gone: ResourceNotFound), ``retry`` (a new execution number after FAILED or
TIMED_OUT).

Fault knobs: ``drop[op]`` (count) - the next requests of ``op`` (``get``, ``start-next``,
``describe``, ``update``) are not answered and not applied; ``reject[op]`` (codes) - the next
requests of ``op`` are rejected with that code (``RequestThrottled``, ``InternalError``) and not
applied.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "TIMED_OUT", "REJECTED", "REMOVED", "CANCELED"})
PENDING = ("IN_PROGRESS", "QUEUED")
DEVICE_STATUSES = frozenset({"IN_PROGRESS", "FAILED", "SUCCEEDED", "REJECTED"})
_KEY_RE = re.compile(r"^[a-zA-Z0-9:_-]{1,128}$")
_RESPONSES = ("accepted", "rejected", "notify", "notify-next")


def _now() -> int:
    return int(time.time())


def details_problem(details: Any) -> str | None:
    """Why ``statusDetails`` breaks the documented constraints (None: it does not)."""
    if not isinstance(details, dict):
        return "statusDetails must be an object of string values"
    for k, v in details.items():
        if not _KEY_RE.match(k):
            return f"statusDetails key {k[:40]!r} must match [a-zA-Z0-9:_-]+, 1-128 characters"
        if not isinstance(v, str) or not 1 <= len(v) <= 1024:
            return f"statusDetails value of {k!r} must be a string of 1-1024 characters"
        if any(unicodedata.category(c).startswith("C") for c in v):
            return f"statusDetails value of {k!r} has a control character"
    return None


@dataclass
class Execution:
    job_id: str
    thing: str
    document: Any
    execution_number: int = 1
    status: str = "QUEUED"
    status_details: dict[str, str] = field(default_factory=dict)
    version_number: int = 1
    queued_at: int = field(default_factory=_now)
    started_at: int | None = None
    last_updated_at: int = field(default_factory=_now)
    updates: list[dict[str, Any]] = field(default_factory=list)  # accepted update requests
    history: list[str] = field(default_factory=lambda: ["QUEUED"])

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"jobId": self.job_id, "queuedAt": self.queued_at,
                               "lastUpdatedAt": self.last_updated_at,
                               "executionNumber": self.execution_number,
                               "versionNumber": self.version_number}
        if self.started_at is not None:
            out["startedAt"] = self.started_at
        return out

    def state(self) -> dict[str, Any]:
        return {"status": self.status, "statusDetails": dict(self.status_details),
                "versionNumber": self.version_number}

    def full(self, with_document: bool = True) -> dict[str, Any]:
        out = {**self.summary(), "thingName": self.thing, "status": self.status,
               "statusDetails": dict(self.status_details)}
        if with_document:
            out["jobDocument"] = self.document
        return out

    def finals(self) -> list[dict[str, Any]]:
        """The accepted device updates that put the execution in a terminal state."""
        return [u for u in self.updates if u.get("status") in TERMINAL]

    def set_status(self, status: str) -> None:
        self.status = status
        self.history.append(status)
        self.last_updated_at = _now()


@dataclass
class AwsJobs:
    """The service: ``async with AwsJobs(broker_port) as aws: await aws.create_job(...)``."""

    port: int
    host: str = "127.0.0.1"
    executions: dict[str, list[Execution]] = field(default_factory=dict)  # by thing
    requests: list[tuple[str, Any]] = field(default_factory=list)  # (topic, body) received
    drop: dict[str, int] = field(default_factory=dict)
    reject: dict[str, list[str]] = field(default_factory=dict)
    on_request: Callable[[str, str, Any], None] | None = None  # (op, thing, body), before handling
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _client: aiomqtt.Client | None = None
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> AwsJobs:
        self._task = asyncio.create_task(self._run())
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            self._task.result()  # raises why it could not start
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:  # reconnects after a broker restart (once it was up)
            try:
                async with aiomqtt.Client(self.host, self.port, identifier="aws-iot-jobs") as client:
                    self._client = client
                    await client.subscribe("$aws/things/+/jobs/#", qos=1)
                    self._ready.set()
                    async for msg in client.messages:
                        await self._handle(msg.topic.value, msg.payload)
            except aiomqtt.MqttError:
                if not self._ready.is_set():
                    raise
                await asyncio.sleep(0.1)

    # -- control plane (the operator) ----------------------------------------------------------
    def execution(self, thing: str, job_id: str) -> Execution | None:
        """The latest execution of ``job_id`` on ``thing``."""
        found = [e for e in self.executions.get(thing, []) if e.job_id == job_id]
        return found[-1] if found else None

    async def create_job(self, job_id: str, document: Any, things: list[str]) -> list[Execution]:
        """CreateJob: one QUEUED execution per target thing (a thing named twice gets one)."""
        out = []
        for thing in dict.fromkeys(things):
            if self.execution(thing, job_id) is None:
                async with self._notifying(thing):
                    ex = Execution(job_id, thing, document)
                    self.executions.setdefault(thing, []).append(ex)
            out.append(self.execution(thing, job_id))
        return [e for e in out if e is not None]

    async def cancel_execution(self, job_id: str, thing: str, force: bool = False) -> bool:
        """CancelJobExecution: QUEUED -> CANCELED; IN_PROGRESS only with ``force``."""
        ex = self.execution(thing, job_id)
        if ex is None or ex.status in TERMINAL or (ex.status == "IN_PROGRESS" and not force):
            return False
        async with self._notifying(thing):
            ex.set_status("CANCELED")
            ex.version_number += 1
        return True

    async def cancel_job(self, job_id: str, force: bool = False) -> None:
        """CancelJob: every QUEUED execution (and IN_PROGRESS ones with ``force``) canceled."""
        for thing in list(self.executions):
            await self.cancel_execution(job_id, thing, force)

    async def _operator_set(self, job_id: str, thing: str, status: str, only: tuple[str, ...]) -> bool:
        ex = self.execution(thing, job_id)
        if ex is None or ex.status not in only:
            return False
        async with self._notifying(thing):
            ex.set_status(status)
            ex.version_number += 1
        return True

    async def time_out(self, job_id: str, thing: str) -> bool:
        """The in-progress timer (or step timer) of the execution expired: TIMED_OUT."""
        return await self._operator_set(job_id, thing, "TIMED_OUT", ("IN_PROGRESS",))

    async def remove(self, job_id: str, thing: str) -> bool:
        """The thing is no longer a target (left a dynamic group): REMOVED."""
        return await self._operator_set(job_id, thing, "REMOVED", PENDING)

    async def delete_execution(self, job_id: str, thing: str) -> None:
        """DeleteJobExecution (force): the execution is gone (ResourceNotFound from now on)."""
        async with self._notifying(thing):
            self.executions[thing] = [e for e in self.executions.get(thing, [])
                                      if e.job_id != job_id]

    async def retry(self, job_id: str, thing: str) -> Execution | None:
        """Job execution retry: after FAILED/TIMED_OUT a new QUEUED execution (number + 1)."""
        ex = self.execution(thing, job_id)
        if ex is None or ex.status not in ("FAILED", "TIMED_OUT"):
            return None
        async with self._notifying(thing):
            new = Execution(job_id, thing, ex.document, execution_number=ex.execution_number + 1)
            self.executions[thing].append(new)
        return new

    async def wait_for(self, pred: Callable[[], bool], within_s: float = 30.0) -> None:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(pred)
        await asyncio.wait_for(until(), within_s)

    # -- notifications --------------------------------------------------------------------------
    def _pending(self, thing: str) -> list[Execution]:
        """Pending executions: IN_PROGRESS before QUEUED, then by creation (queuedAt)."""
        execs = [e for e in self.executions.get(thing, []) if e.status in PENDING]
        return sorted(execs, key=lambda e: (PENDING.index(e.status), e.queued_at))

    @contextlib.asynccontextmanager
    async def _notifying(self, thing: str) -> Any:
        """Around a change: ``notify`` when the pending list gained/lost an execution or one
        changed to a non-terminal status, ``notify-next`` when the first pending one changed."""
        before = [(e.job_id, e.execution_number, e.status) for e in self._pending(thing)]
        first = before[0][:2] if before else None
        yield
        after_execs = self._pending(thing)
        after = [(e.job_id, e.execution_number, e.status) for e in after_execs]
        assert self._client is not None
        base = f"$aws/things/{thing}/jobs"
        if after != before:
            jobs: dict[str, list[dict[str, Any]]] = {}
            for e in after_execs[:10]:
                jobs.setdefault(e.status, []).append(e.summary())
            await self._client.publish(f"{base}/notify",
                                       json.dumps({"timestamp": _now(), "jobs": jobs}), qos=1)
        now_first = after[0][:2] if after else None
        if now_first != first:
            msg: dict[str, Any] = {"timestamp": _now()}
            if after_execs:
                msg["execution"] = after_execs[0].full()
            await self._client.publish(f"{base}/notify-next", json.dumps(msg), qos=1)
        async with self.changed:
            self.changed.notify_all()

    # -- the device API -------------------------------------------------------------------------
    async def _answer(self, topic: str, verdict: str, body: dict[str, Any], token: Any) -> None:
        assert self._client is not None
        body = {**body, "timestamp": _now()}
        if isinstance(token, str):
            body["clientToken"] = token
        await self._client.publish(f"{topic}/{verdict}", json.dumps(body), qos=1)

    async def _error(self, topic: str, token: Any, code: str, message: str,
                     ex: Execution | None = None) -> None:
        body: dict[str, Any] = {"code": code, "message": message}
        if ex is not None and code in ("InvalidStateTransition", "VersionMismatch"):
            body["executionState"] = ex.state()
        await self._answer(topic, "rejected", body, token)

    async def _handle(self, topic: str, payload: Any) -> None:
        parts = topic.split("/")
        if len(parts) < 4 or parts[3] != "jobs" or parts[-1] in _RESPONSES:
            return  # a response or notification (ours), not a request
        thing = parts[2]
        rest = parts[4:]
        op = ("get" if rest == ["get"] else "start-next" if rest == ["start-next"]
              else "describe" if len(rest) == 2 and rest[1] == "get"
              else "update" if len(rest) == 2 and rest[1] == "update" else None)
        try:
            body = json.loads(bytes(payload).decode("utf-8")) if payload else {}
        except (ValueError, TypeError):
            self.requests.append((topic, None))
            await self._error(topic, None, "InvalidJson", "request is not UTF-8 JSON")
            return
        self.requests.append((topic, body))
        token = body.get("clientToken") if isinstance(body, dict) else None
        if op is None:
            await self._error(topic, token, "InvalidTopic", f"no Jobs API on {topic}")
            return
        if not isinstance(body, dict):
            await self._error(topic, None, "InvalidRequest", "request must be a JSON object")
            return
        if self.on_request is not None:
            self.on_request(op, thing, body)
        if self.drop.get(op, 0) > 0:
            self.drop[op] -= 1
            return
        if self.reject.get(op):
            await self._error(topic, token, self.reject[op].pop(0), "injected")
            return
        if op == "get":
            pend = self._pending(thing)
            await self._answer(topic, "accepted", {
                "inProgressJobs": [e.summary() for e in pend if e.status == "IN_PROGRESS"],
                "queuedJobs": [e.summary() for e in pend if e.status == "QUEUED"]}, token)
        elif op == "start-next":
            await self._start_next(topic, thing, body, token)
        elif op == "describe":
            await self._describe(topic, thing, rest[0], body, token)
        else:
            await self._update(topic, thing, rest[0], body, token)
        async with self.changed:
            self.changed.notify_all()

    async def _start_next(self, topic: str, thing: str, body: dict[str, Any], token: Any) -> None:
        details = body.get("statusDetails")
        if details is not None and (why := details_problem(details)):
            await self._error(topic, token, "InvalidRequest", why)
            return
        pend = self._pending(thing)
        if not pend:
            await self._answer(topic, "accepted", {}, token)
            return
        ex = pend[0]
        if ex.status == "QUEUED":
            async with self._notifying(thing):
                ex.set_status("IN_PROGRESS")
                ex.started_at = _now()
                ex.version_number += 1
                if details is not None:
                    ex.status_details = dict(details)
        await self._answer(topic, "accepted", {"execution": ex.full()}, token)

    def _find(self, thing: str, job_id: str, number: Any) -> Execution | None:
        if job_id == "$next":
            pend = self._pending(thing)
            return pend[0] if pend else None
        execs = [e for e in self.executions.get(thing, []) if e.job_id == job_id]
        if number is not None:
            execs = [e for e in execs if e.execution_number == number]
        return execs[-1] if execs else None

    async def _describe(self, topic: str, thing: str, job_id: str, body: dict[str, Any],
                        token: Any) -> None:
        number = body.get("executionNumber")
        if number is not None and not isinstance(number, int):
            await self._error(topic, token, "InvalidRequest", "executionNumber must be a number")
            return
        ex = self._find(thing, job_id, number)
        if ex is None:
            if job_id == "$next":
                await self._answer(topic, "accepted", {}, token)
            else:
                await self._error(topic, token, "ResourceNotFound", "no such job execution")
            return
        if ex.status in TERMINAL:
            await self._error(topic, token, "TerminalStateReached",
                              f"job execution {job_id} is {ex.status}")
            return
        with_doc = body.get("includeJobDocument", True) is not False
        await self._answer(topic, "accepted", {"execution": ex.full(with_doc)}, token)

    async def _update(self, topic: str, thing: str, job_id: str, body: dict[str, Any],
                      token: Any) -> None:
        status = body.get("status")
        details = body.get("statusDetails")
        number = body.get("executionNumber")
        expected = body.get("expectedVersion")
        if status not in DEVICE_STATUSES:
            await self._error(topic, token, "InvalidRequest",
                              f"status must be one of {sorted(DEVICE_STATUSES)}")
            return
        if details is not None and (why := details_problem(details)):
            await self._error(topic, token, "InvalidRequest", why)
            return
        if (number is not None and not isinstance(number, int)) or (
                expected is not None and not isinstance(expected, int | str)):
            await self._error(topic, token, "InvalidRequest", "bad executionNumber/expectedVersion")
            return
        ex = None if job_id == "$next" else self._find(thing, job_id, number)
        if ex is None:
            await self._error(topic, token, "ResourceNotFound", "no such job execution")
            return
        if ex.status in TERMINAL:
            await self._error(topic, token, "InvalidStateTransition",
                              f"job execution is {ex.status}", ex)
            return
        if expected is not None and str(expected) != str(ex.version_number):
            await self._error(topic, token, "VersionMismatch",
                              f"expected version {expected}, is {ex.version_number}", ex)
            return
        async with self._notifying(thing):
            if ex.status == "QUEUED":
                ex.started_at = _now()
            ex.set_status(status)
            ex.version_number += 1
            if details is not None:
                ex.status_details = dict(details)
            ex.updates.append(body)
        answer: dict[str, Any] = {}
        if body.get("includeJobExecutionState") is True:
            answer["executionState"] = ex.state()
        if body.get("includeJobDocument") is True:
            answer["jobDocument"] = ex.document
        await self._answer(topic, "accepted", answer, token)
