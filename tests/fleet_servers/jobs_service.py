"""A small AWS IoT Jobs service over MQTT (aiomqtt), playing AWS's role for the tests.

Per thing: a queue of jobs; answers ``$aws/things/{thing}/jobs/start-next`` on ``/accepted``
(with ``execution`` when a job is QUEUED or IN_PROGRESS, moving it to IN_PROGRESS) and
``.../jobs/{jobId}/update`` on ``/accepted`` or ``/rejected`` (InvalidStateTransition once the
job is terminal - with the execution's ``executionState``, as AWS sends it - ResourceNotFound
for unknown jobs or another ``executionNumber``); publishes ``notify-next`` when a job is added.
Records every update it accepted (``Job.updates``; ``Job.finals()`` the terminal ones).

Fault knob ``final_faults`` for the next terminal updates (SUCCEEDED/FAILED/REJECTED): an error
code (e.g. ``"InternalError"``) rejects it with that code without applying it; ``"drop"``
applies it and never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt

TERMINAL = {"SUCCEEDED", "FAILED", "REJECTED", "CANCELED", "REMOVED", "TIMED_OUT"}


@dataclass
class Job:
    job_id: str
    thing: str
    document: dict[str, Any]
    status: str = "QUEUED"
    version: int = 1
    status_details: dict[str, str] = field(default_factory=dict)
    updates: list[dict[str, Any]] = field(default_factory=list)
    execution_number: int = 1

    def finals(self) -> list[dict[str, Any]]:
        """The terminal updates this service accepted (the outcome; exactly one is expected)."""
        return [u for u in self.updates if u["status"] in TERMINAL]


@dataclass
class JobsService:
    port: int
    jobs: dict[str, list[Job]] = field(default_factory=dict)
    start_next_requests: list[dict[str, Any]] = field(default_factory=list)
    final_faults: list[str] = field(default_factory=list)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _client: aiomqtt.Client | None = None
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> JobsService:
        self._task = asyncio.create_task(self._run())
        await self._ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        async with aiomqtt.Client("127.0.0.1", self.port, identifier="jobs-service") as client:
            self._client = client
            await client.subscribe("$aws/things/+/jobs/start-next", qos=1)
            await client.subscribe("$aws/things/+/jobs/+/update", qos=1)
            await client.subscribe("$aws/things/+/jobs/+/get", qos=1)
            self._ready.set()
            async for msg in client.messages:
                await self._handle(msg.topic.value, json.loads(msg.payload))  # type: ignore[arg-type]

    async def add_job(self, thing: str, job_id: str, document: dict[str, Any]) -> Job:
        job = Job(job_id, thing, document)
        self.jobs.setdefault(thing, []).append(job)
        assert self._client is not None
        await self._client.publish(
            f"$aws/things/{thing}/jobs/notify-next",
            json.dumps({"timestamp": int(time.time()), "execution": self._execution(job)}),
            qos=1,
        )
        return job

    async def wait_for(self, pred: Any) -> None:
        async with self.changed:
            await self.changed.wait_for(pred)

    @staticmethod
    def _execution(job: Job) -> dict[str, Any]:
        return {
            "jobId": job.job_id,
            "thingName": job.thing,
            "jobDocument": job.document,
            "status": job.status,
            "statusDetails": job.status_details,
            "queuedAt": 0,
            "lastUpdatedAt": int(time.time()),
            "versionNumber": job.version,
            "executionNumber": job.execution_number,
        }

    async def _handle(self, topic: str, body: dict[str, Any]) -> None:
        assert self._client is not None
        parts = topic.split("/")
        thing = parts[2]
        token = body.get("clientToken")
        if parts[-1] == "start-next":
            self.start_next_requests.append(body)
            job = next((j for j in self.jobs.get(thing, []) if j.status not in TERMINAL), None)
            answer: dict[str, Any] = {"timestamp": int(time.time()), "clientToken": token}
            if job is not None:
                if job.status == "QUEUED":
                    job.status = "IN_PROGRESS"
                    job.version += 1
                job.status_details.update(body.get("statusDetails") or {})
                answer["execution"] = self._execution(job)
            await self._client.publish(topic + "/accepted", json.dumps(answer), qos=1)
        elif parts[-1] == "get" and parts[4] == "$next":  # DescribeJobExecution of $next
            pending = [j for j in self.jobs.get(thing, []) if j.status not in TERMINAL]
            job = next((j for j in pending if j.status == "IN_PROGRESS"),
                       pending[0] if pending else None)
            answer = {"timestamp": int(time.time()), "clientToken": token}
            if job is not None:
                answer["execution"] = self._execution(job)
            await self._client.publish(topic + "/accepted", json.dumps(answer), qos=1)
        elif parts[-1] == "get":  # DescribeJobExecution
            job = next((j for j in self.jobs.get(thing, []) if j.job_id == parts[4]), None)
            if job is None or job.status == "REMOVED":
                await self._reject(topic, token, "ResourceNotFound", "no such job execution")
            else:
                await self._client.publish(topic + "/accepted", json.dumps(
                    {"timestamp": int(time.time()), "clientToken": token,
                     "execution": self._execution(job)}), qos=1)
        elif parts[-1] == "update":
            job_id = parts[4]
            job = next((j for j in self.jobs.get(thing, []) if j.job_id == job_id), None)
            number = body.get("executionNumber")
            fault = (self.final_faults.pop(0) if body.get("status") in TERMINAL and self.final_faults
                     else None)
            if job is None or (number is not None and number != job.execution_number):
                await self._reject(topic, token, "ResourceNotFound", "no such job execution")
            elif job.status in TERMINAL:
                await self._reject(topic, token, "InvalidStateTransition", f"job is {job.status}",
                                   {"status": job.status, "statusDetails": job.status_details,
                                    "versionNumber": job.version})
            elif fault is not None and fault != "drop":
                await self._reject(topic, token, fault, "injected fault")
            elif body.get("status") not in ("IN_PROGRESS", "SUCCEEDED", "FAILED", "REJECTED") or not all(
                isinstance(v, str) for v in (body.get("statusDetails") or {}).values()
            ):
                await self._reject(topic, token, "InvalidRequest", "bad status or statusDetails")
            else:
                job.status = body["status"]
                job.version += 1
                job.status_details.update(body.get("statusDetails") or {})
                job.updates.append(body)
                if fault == "drop":
                    async with self.changed:
                        self.changed.notify_all()
                    return
                await self._client.publish(
                    topic + "/accepted",
                    json.dumps(
                        {
                            "timestamp": int(time.time()),
                            "clientToken": token,
                            "executionState": {
                                "status": job.status,
                                "versionNumber": job.version,
                                "statusDetails": job.status_details,
                            },
                        }
                    ),
                    qos=1,
                )
        async with self.changed:
            self.changed.notify_all()

    async def _reject(self, topic: str, token: Any, code: str, message: str,
                      state: dict[str, Any] | None = None) -> None:
        assert self._client is not None
        body: dict[str, Any] = {"code": code, "message": message, "clientToken": token,
                                "timestamp": int(time.time())}
        if state is not None:
            body["executionState"] = state
        await self._client.publish(topic + "/rejected", json.dumps(body), qos=1)
