"""AWS IoT MQTT-based file delivery (streams), the service side, written from the documentation.

Plays the AWS IoT streams service for the tests as an MQTT client of a real broker (mosquitto),
next to ``servers.aws_jobs.AwsJobs`` (the Jobs service). Written from these documents, not from
the gateway's code:

* Using AWS IoT MQTT-based file delivery in devices (GetStream / DescribeStream, topics,
  request and response keys, JSON or CBOR by the topic's last level):
  https://docs.aws.amazon.com/iot/latest/developerguide/mqtt-based-file-delivery-in-devices.html
* Reserved topics, "MQTT-based file delivery": ``$aws/things/{thing}/streams/{stream}/get/{fmt}``
  (request), ``.../data/{fmt}`` (one message per block), ``.../rejected/{fmt}`` (errors):
  https://docs.aws.amazon.com/iot/latest/developerguide/reserved-topics.html
* FreeRTOS OTA (aws/ota-for-aws-iot-embedded-sdk): ``source/include/ota_cbor_private.h`` (keys
  ``c`` client token, ``f`` file id, ``l`` block size, ``o`` block offset, ``b`` block bitmap,
  ``n`` number of blocks, ``i`` block id, ``p`` payload), ``source/ota_mqtt.c`` (GetStream with
  offset 0, the whole bitmap and ``n`` blocks; data on ``/data/cbor``), ``source/ota.c``
  (the bitmap: bit ``1 << (i % 8)`` of byte ``i >> 3`` - LSB first - is set while block ``i``
  is wanted; bits past the last block clear; a data block's ``l`` is its payload length, the
  remainder for the last block).

DescribeStream (same page, "Use DescribeStream to get stream data"): a request on
``.../describe/{fmt}`` (an optional ``c`` client token) is answered on ``.../description/{fmt}``
with ``c``, ``s`` stream version, ``d`` description and ``r``: the stream's files, each ``f`` file
id and ``z`` size in bytes; an unknown stream is answered ``NotFound`` on ``rejected``.

GetStream handling: the request must be a map (``InvalidCbor``/``InvalidJson`` otherwise); ``f``
a file of the stream (``NotFound``); ``l`` 256..131072 (``BlockSizeOutOfBounds``); ``o`` inside
the file (``OffsetOutOfBounds``); ``s``, when given, must be the stream's version
(``VersionMismatch``, the docs: "The device can specify the stream version in a GetStream
request to enforce a consistency check in case the stream has been updated unexpectedly").
With ``b``: bit k of the bitmap is block ``o + k``; the set
bits are sent in order, at most ``n`` of them. Without ``b``: blocks ``o .. o+n-1``. Errors go
to ``rejected`` as ``{"o": code, "m": message, "c": token}``. In JSON, ``b`` and ``p`` are base64.

Stream versions: ``versions[stream]`` (default 1); ``sizes[stream][fileid]`` overrides the
size DescribeStream reports (a stream that does not match the job). ``traffic`` counts the bytes
over the broker both ways (topic + payload of every message the service took or sent).

Fault knobs: ``lose(fileid, block, nth)`` -> True drops that data message (``nth``: how many
times the block was sent before); ``hold``: an Event; while cleared, requests are recorded but
not answered (a stalled service); ``after_block``: called after each block is sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import cbor2

MIN_BLOCK, MAX_BLOCK = 256, 131072


def wanted_blocks(bitmap: bytes, offset: int, total: int) -> list[int]:
    """The blocks a bitmap asks for: bit k (LSB first within each byte) is block offset + k."""
    out = []
    for k in range(len(bitmap) * 8):
        if bitmap[k // 8] >> (k % 8) & 1 and offset + k < total:
            out.append(offset + k)
    return out


@dataclass
class AwsStreams:
    port: int
    host: str = "127.0.0.1"
    streams: dict[str, dict[int, bytes]] = field(default_factory=dict)  # stream -> fileid -> data
    versions: dict[str, int] = field(default_factory=dict)  # stream -> version (default 1)
    sizes: dict[str, dict[int, int]] = field(default_factory=dict)  # DescribeStream overrides
    describes: list[dict[str, Any]] = field(default_factory=list)
    traffic: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0, "messages": 0})
    requests: list[dict[str, Any]] = field(default_factory=list)  # decoded GetStream requests
    sent: list[tuple[int, int]] = field(default_factory=list)  # (fileid, block) published
    lost: list[tuple[int, int]] = field(default_factory=list)  # (fileid, block) dropped
    lose: Callable[[int, int, int], bool] | None = None
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    after_block: Callable[[int, int], Any] | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    _client: aiomqtt.Client | None = None
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.hold.set()

    async def __aenter__(self) -> AwsStreams:
        self._task = asyncio.create_task(self._run())
        ready = asyncio.ensure_future(self._ready.wait())
        await asyncio.wait({self._task, ready}, return_when=asyncio.FIRST_COMPLETED)
        if not self._ready.is_set():
            ready.cancel()
            self._task.result()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        while True:  # reconnects (a broker restart in a test)
            try:
                async with aiomqtt.Client(self.host, self.port, identifier="aws-iot-streams") as c:
                    self._client = c
                    await c.subscribe("$aws/things/+/streams/+/get/+", qos=1)
                    await c.subscribe("$aws/things/+/streams/+/describe/+", qos=1)
                    self._ready.set()
                    async for msg in c.messages:
                        await self._handle(msg.topic.value, bytes(msg.payload))  # type: ignore[arg-type]
            except aiomqtt.MqttError:
                self._client = None
                await asyncio.sleep(0.1)

    async def wait_for(self, pred: Callable[[], bool], within_s: float = 30.0) -> None:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(pred)
        await asyncio.wait_for(until(), within_s)

    async def _publish(self, topic: str, raw: bytes) -> None:
        assert self._client is not None
        await self._client.publish(topic, raw, qos=1)
        self.traffic["out"] += len(topic.encode()) + len(raw)
        self.traffic["messages"] += 1

    async def _reject(self, base: str, fmt: str, code: str, message: str, token: Any) -> None:
        body: dict[str, Any] = {"o": code, "m": message}
        if isinstance(token, str):
            body["c"] = token
        raw = cbor2.dumps(body) if fmt == "cbor" else json.dumps(body).encode()
        await self._publish(f"{base}/rejected/{fmt}", raw)

    async def _describe(self, base: str, stream: str, fmt: str, payload: bytes) -> None:
        try:
            req = cbor2.loads(payload) if fmt == "cbor" else json.loads(payload) if payload else {}
        except Exception:
            await self._reject(base, fmt, "InvalidCbor" if fmt == "cbor" else "InvalidJson",
                               "request not decodable", None)
            return
        token = req.get("c") if isinstance(req, dict) else None
        self.describes.append({"stream": stream, "fmt": fmt, "c": token})
        files = self.streams.get(stream)
        if files is None:
            await self._reject(base, fmt, "NotFound", "no such stream", token)
            return
        sizes = {f: len(d) for f, d in files.items()} | self.sizes.get(stream, {})
        body: dict[str, Any] = {"s": self.versions.get(stream, 1), "d": f"stream {stream}",
                                "r": [{"f": f, "z": z} for f, z in sorted(sizes.items())]}
        if isinstance(token, str):
            body["c"] = token
        raw = cbor2.dumps(body) if fmt == "cbor" else json.dumps(body).encode()
        await self._publish(f"{base}/description/{fmt}", raw)

    async def _handle(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")  # $aws things {thing} streams {stream} get {fmt}
        if len(parts) != 7 or parts[5] not in ("get", "describe") or parts[6] not in ("cbor", "json"):
            return
        self.traffic["in"] += len(topic.encode()) + len(payload)
        self.traffic["messages"] += 1
        stream, fmt = parts[4], parts[6]
        base = "/".join(parts[:5])
        if parts[5] == "describe":
            await self._describe(base, stream, fmt, payload)
            return
        try:
            req = cbor2.loads(payload) if fmt == "cbor" else json.loads(payload)
        except Exception:
            await self._reject(base, fmt, "InvalidCbor" if fmt == "cbor" else "InvalidJson",
                               "request not decodable", None)
            return
        if not isinstance(req, dict):
            await self._reject(base, fmt, "InvalidRequest", "request must be a map", None)
            return
        token = req.get("c")
        bitmap = req.get("b")
        if fmt == "json" and isinstance(bitmap, str):
            bitmap = base64.b64decode(bitmap)
        files = self.streams.get(stream)
        f, size, off, n = req.get("f"), req.get("l"), req.get("o", 0), req.get("n", 1)
        rec = {"thing": parts[2], "stream": stream, "fmt": fmt, "c": token, "f": f, "l": size,
               "o": off, "n": n, "b": bitmap, "s": req.get("s")}
        self.requests.append(rec)
        async with self.changed:
            self.changed.notify_all()
        await self.hold.wait()
        if files is None or not isinstance(f, int) or f not in files:
            await self._reject(base, fmt, "NotFound", "no such stream or file", token)
            return
        if "s" in req and req["s"] != self.versions.get(stream, 1):
            await self._reject(base, fmt, "VersionMismatch", "stream version mismatch", token)
            return
        if not isinstance(size, int) or not MIN_BLOCK <= size <= MAX_BLOCK:
            await self._reject(base, fmt, "BlockSizeOutOfBounds", "block size out of bounds", token)
            return
        data = files[f]
        total = (len(data) + size - 1) // size
        if not isinstance(off, int) or not 0 <= off < total or not isinstance(n, int) or n < 1:
            await self._reject(base, fmt, "OffsetOutOfBounds", "offset out of bounds", token)
            return
        if bitmap is not None:
            if not isinstance(bitmap, bytes):
                await self._reject(base, fmt, "InvalidRequest", "bitmap must be bytes", token)
                return
            blocks = wanted_blocks(bitmap, off, total)[:n]
        else:
            blocks = list(range(off, min(total, off + n)))
        rec["blocks"] = blocks
        assert self._client is not None
        for i in blocks:
            chunk = data[i * size:(i + 1) * size]
            nth = self.sent.count((f, i)) + self.lost.count((f, i))
            if self.lose is not None and self.lose(f, i, nth):
                self.lost.append((f, i))
                continue
            body = {"c": token, "f": f, "l": len(chunk), "i": i,
                    "p": chunk if fmt == "cbor" else base64.b64encode(chunk).decode()}
            raw = cbor2.dumps(body) if fmt == "cbor" else json.dumps(body).encode()
            await self._publish(f"{base}/data/{fmt}", raw)
            self.sent.append((f, i))
            if self.after_block is not None:
                r = self.after_block(f, i)
                if asyncio.iscoroutine(r):
                    await r
        async with self.changed:
            self.changed.notify_all()
