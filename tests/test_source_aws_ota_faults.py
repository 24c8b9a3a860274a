"""AWS IoT OTA over MQTT streams under faults and hostile input: the broker restarted and the
gateway SIGKILLed mid-stream (resumed by the bitmap: no block asked twice beyond the request in
flight, counted from the streams responder's own log), DescribeStream not matching the job
(REJECTED, nothing downloaded), the "accepted v<version>" reason after a restart, and a hostile
stream (blocks out of range, wrong file id, oversized, forged duplicates, a flood; a stream that
never completes) - bounded in time and memory, the image still checked by its signatures.

Same harness as ``test_source_aws_ota.py``: real mosquitto, the Jobs and Streams responders
written from AWS's documentation, simulator devices, imgtool-signed images.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import cbor2
import pytest
import yaml
from daemon_support import gateway_bin
from fleet_servers.mosquitto import Mosquitto, mosquitto
from servers.aws_jobs import AwsJobs
from servers.aws_streams import AwsStreams, wanted_blocks
from test_conformance_aws_jobs import active
from test_source_aws_ota import BLOCK, THING, codesign, gw_cfg, ota_doc, ota_file, run_gw

from gateway.daemon import Gateway
from gateway.sim.simulator import Simulator

STREAM = "AFR_OTA-s1"


def signed_bench(bench_factory: Any, tmp: Path, image_kb: int) -> tuple[Any, bytes, Any, Path]:
    """A bench with one UDP device, its 2.0.0 image, and a code-signing key and its store."""
    bench = bench_factory(udp=1, serial=0, image_size=image_kb * 1024)
    key, store = codesign(tmp)
    return bench, bench.images["2.0.0"].read_bytes(), key, store


@asynccontextmanager
async def ota_servers(port: int, bench: Any,
                      img: bytes) -> AsyncIterator[tuple[AwsJobs, AwsStreams, Simulator]]:
    """The Jobs and Streams responders on the broker at ``port`` (stream STREAM serving
    ``img`` as file 1) and the bench's simulator."""
    async with (AwsJobs(port) as aws, AwsStreams(port) as st, Simulator(bench.sim_cfg) as sim):
        st.streams[STREAM] = {1: img}
        yield aws, st, sim


def refetched(st: AwsStreams) -> set[int]:
    return {i for (_f, i), c in Counter(st.sent).items() if c > 1}


def stream_files(bench: Any) -> list[str]:
    root = bench.root / "gateway-state" / "aws_ota"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


async def test_broker_restart_mid_stream_resumes_by_bitmap(bench_factory: Any, tmp_path: Path) -> None:
    bench, img, key, store = signed_bench(bench_factory, tmp_path, 120)
    total = (len(img) + BLOCK - 1) // BLOCK
    broker = Mosquitto(tmp_path)
    await broker.start()
    restarted: list[int] = []
    try:
        async with ota_servers(broker.port, bench, img) as (aws, st, sim):

            async def restart(_f: int, _i: int) -> None:
                if len(st.sent) == 12 and not restarted:  # mid-request 2 (8 blocks a request)
                    restarted.append(len(st.requests) - 1)
                    await broker.kill()
                    await broker.start()

            st.after_block = restart
            (ex,) = await aws.create_job("ota-br", ota_doc([ota_file(1, img, key)]), [THING])
            cfg = gw_cfg(bench, sim, broker.port, store, blocks_per_request=8,
                         block_timeout_s=0.5, request_timeout_s=5)
            res = await run_gw(cfg, within_s=90)
            assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
    finally:
        await broker.kill()
    (at,) = restarted
    in_flight = set(st.requests[at]["blocks"])
    again = refetched(st)
    # only blocks of the request in flight when the broker went away were asked again
    assert again <= in_flight, (again, in_flight)
    assert sorted(set(i for _f, i in st.sent)) == list(range(total))
    first_after = next(r for r in st.requests[at + 1:] if r.get("blocks"))
    assert not set(wanted_blocks(first_after["b"], 0, total)) & set(range(8))
    assert ex.status == "SUCCEEDED" and ex.updates[-1]["statusDetails"]["reason"] == "accepted v2.0.0"


async def test_gateway_sigkill_mid_stream_resumes_by_bitmap(bench_factory: Any, tmp_path: Path) -> None:
    bench, img, key, store = signed_bench(bench_factory, tmp_path, 120)
    total = (len(img) + BLOCK - 1) // BLOCK
    killed: list[int] = []
    async with mosquitto(tmp_path) as port, ota_servers(port, bench, img) as (aws, st, sim):
        (ex,) = await aws.create_job("ota-kill", ota_doc([ota_file(1, img, key)]), [THING])
        cfg = gw_cfg(bench, sim, port, store, blocks_per_request=8, block_timeout_s=1)
        data = bench.gateway_dict(sim)
        data["source"] = cfg.source.model_dump(mode="json", exclude_none=True)
        path = bench.root / "gateway-aws.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        proc = await asyncio.create_subprocess_exec(
            *gateway_bin(), "run", "--once", "--config", str(path),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)

        def kill(_f: int, _i: int) -> None:
            if len(st.sent) == 12 and not killed:  # mid-request 2: no cleanup, no flush
                killed.append(len(st.requests) - 1)
                os.kill(proc.pid, signal.SIGKILL)

        st.after_block = kill
        assert await asyncio.wait_for(proc.wait(), 60) == -signal.SIGKILL
        assert sim.devices["udp-1"].counters["upload_bytes_received"] == 0
        st.after_block = None
        res = await run_gw(gw_cfg(bench, sim, port, store, blocks_per_request=8))
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
    (at,) = killed
    in_flight = set(st.requests[at]["blocks"])
    again = refetched(st)
    assert again <= in_flight and len(again) <= 8, (again, in_flight)
    assert sorted(set(i for _f, i in st.sent)) == list(range(total))
    restart = st.requests[at + 1]  # the restarted gateway's first request: the saved bitmap
    assert not set(wanted_blocks(restart["b"], 0, total)) & set(range(8))
    assert ex.status == "SUCCEEDED" and ex.updates[-1]["statusDetails"]["reason"] == "accepted v2.0.0"
    assert stream_files(bench) == []  # taken by the server: the download is gone


@pytest.mark.parametrize("sizes,why", [({1: 123}, "the job says"), ({}, "has no file 1")])
async def test_describe_stream_mismatch_rejected_nothing_downloaded(
        bench_factory: Any, tmp_path: Path, sizes: dict[int, int], why: str) -> None:
    bench, img, key, store = signed_bench(bench_factory, tmp_path, 16)
    async with mosquitto(tmp_path) as port, ota_servers(port, bench, img) as (aws, st, sim):
        st.streams[STREAM] = {1: img} if sizes else {2: img}
        st.sizes[STREAM] = sizes
        (ex,) = await aws.create_job("ota-d", ota_doc([ota_file(1, img, key)]), [THING])
        await run_gw(gw_cfg(bench, sim, port, store))
        assert sim.devices["udp-1"].counters["upload_bytes_received"] == 0
    assert len(st.describes) == 1 and st.requests == []  # described, never a GetStream
    assert ex.status == "REJECTED", [u["status"] for u in ex.updates]
    reason = ex.updates[-1]["statusDetails"]["reason"]
    assert reason.startswith("rejected") and why in reason, reason
    assert stream_files(bench) == []


async def test_restarted_gateway_reports_accepted_version(bench_factory: Any, tmp_path: Path) -> None:
    """The final SUCCEEDED is not taken before the gateway goes away; the next process (no
    memory of the download) reports it with the version the device runs."""
    bench, img, key, store = signed_bench(bench_factory, tmp_path, 16)
    async with mosquitto(tmp_path) as port, ota_servers(port, bench, img) as (aws, _st, sim):
        update = aws._update
        mute = [True]

        async def no_final(topic: str, thing: str, job_id: str, body: dict[str, Any],
                           token: Any) -> None:
            if mute[0] and body.get("status") == "SUCCEEDED":
                return  # lost: no answer, not applied
            await update(topic, thing, job_id, body, token)

        aws._update = no_final  # type: ignore[method-assign]
        (ex,) = await aws.create_job("ota-r", ota_doc([ota_file(1, img, key)]), [THING])
        await run_gw(gw_cfg(bench, sim, port, store, request_timeout_s=1))
        assert active(sim.devices["udp-1"]) == ("2.0.0", True)
        assert ex.status == "IN_PROGRESS"
        mute[0] = False
        await run_gw(gw_cfg(bench, sim, port, store, request_timeout_s=1))
    assert ex.status == "SUCCEEDED", [u["status"] for u in ex.updates]
    assert ex.updates[-1]["statusDetails"]["reason"] == "accepted v2.0.0"
    assert sim.devices["udp-1"].counters["upload_bytes_received"] < 2 * len(img)  # uploaded once


async def test_hostile_stream_messages_bounded(bench_factory: Any, tmp_path: Path) -> None:
    """Every data block is followed by hostile messages on the data topic: a block id out of
    range, another file id, an oversized payload, a forged copy of an already received block,
    and a flood of unrequested copies. The download completes with the real image (the forged
    copy is never written), within bounded queues."""
    bench, img, key, store = signed_bench(bench_factory, tmp_path, 48)
    async with mosquitto(tmp_path) as port, ota_servers(port, bench, img) as (aws, st, sim):
        topic = f"$aws/things/{THING}/streams/{STREAM}/data/cbor"

        async def hostile(_f: int, i: int) -> None:
            assert st._client is not None
            bad = [{"f": 1, "i": 10_000, "l": BLOCK, "p": bytes(BLOCK)},
                   {"f": 7, "i": i, "l": BLOCK, "p": b"X" * BLOCK},
                   {"f": 1, "i": i, "l": 3 * BLOCK, "p": b"Y" * 3 * BLOCK},
                   {"f": 1, "i": i, "l": BLOCK, "p": b"Z" * BLOCK}]  # forged: block i is in
            bad += [{"f": 1, "i": i, "l": BLOCK, "p": img[i * BLOCK:(i + 1) * BLOCK]}] * 40
            for m in bad:
                await st._client.publish(topic, cbor2.dumps(m), qos=0)

        st.after_block = hostile
        (ex,) = await aws.create_job("ota-h", ota_doc([ota_file(1, img, key)]), [THING])
        gw = Gateway(gw_cfg(bench, sim, port, store, blocks_per_request=4))
        try:
            res = await asyncio.wait_for(gw.run_once(), 60)
        finally:
            gw.close()
        assert active(sim.devices["udp-1"]) == ("2.0.0", True), res.outcomes
    stats = gw.source.stream_stats  # type: ignore[attr-defined]
    assert stats["bad"] > 0 and stats["duplicates"] > 0, stats
    assert ex.status == "SUCCEEDED"


async def test_stream_that_never_completes_is_bounded(bench_factory: Any, tmp_path: Path) -> None:
    """A service that trickles blocks (always progress, never done) and one that stops
    answering: the attempt ends within its bounds, the partial download kept for a resume."""
    bench, img, key, store = signed_bench(bench_factory, tmp_path, 64)
    async with mosquitto(tmp_path) as port, ota_servers(port, bench, img) as (aws, st, sim):

        async def trickle(_f: int, _i: int) -> None:
            await asyncio.sleep(0.15)  # the slow service under test, not a wait for the code
            if len(st.sent) >= 6:
                st.hold.clear()  # then silence

        st.after_block = trickle
        (ex,) = await aws.create_job("ota-t", ota_doc([ota_file(1, img, key)]), [THING])
        t0 = time.monotonic()
        res = await run_gw(gw_cfg(bench, sim, port, store, stream_deadline_s=0.6,
                                  block_timeout_s=0.3))
        took = time.monotonic() - t0
        assert sim.devices["udp-1"].counters["upload_bytes_received"] == 0
    assert took < 10, took
    (out,) = res.outcomes.values()
    assert "not complete within 0.6s" in out.detail, out.detail
    assert any(n.endswith(".bitmap") for n in stream_files(bench))  # kept for a resume
    assert ex.status == "FAILED" and "not complete" in ex.updates[-1]["statusDetails"]["reason"]
