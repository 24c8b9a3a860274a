"""AWS IoT OTA MQTT streams: download throughput against block size and blocks per request.

The gateway's aws_ota source downloads one file over MQTT streams (DescribeStream, then
GetStream rounds with the block bitmap) from the streams responder of the tests
(``tests/servers/aws_streams.py``, written from AWS's "MQTT-based file delivery" docs) through a
real mosquitto on loopback. Block sizes stay in AWS's documented range (256 bytes .. 128 KiB);
blocks per request are the ``n`` of a GetStream. "broker bytes per image byte" counts every
message the service took and sent, both ways (topic + CBOR payload), per byte of the file -
the MQTT fixed header/packet id (2-5 bytes a message) and PUBACKs are not in it.

    PYTHONPATH=$PWD python benchmarks/aws_ota_stream.py [--size 262144] [--write-docs]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, table, update_doc

sys.path.insert(0, str(ROOT / "tests"))

from fleet_servers.mosquitto import mosquitto
from servers.aws_jobs import AwsJobs
from servers.aws_streams import AwsStreams

from gateway.sources.aws_ota import AwsOtaSource
from gateway.sources.base import DeviceView
from gateway.sources.settings import AwsOtaSourceConfig

BLOCKS = (256, 1024, 4096, 16384, 65536)
PER_REQUEST = (1, 4, 16, 31)
THING = "bench-gateway"


async def one(tmp: Path, data: bytes, block: int, n: int) -> tuple[float, float, int]:
    """(seconds, broker bytes per file byte, GetStream requests) of one download."""
    async with mosquitto(tmp) as port, AwsJobs(port) as aws, AwsStreams(port) as st:
        st.streams["AFR_OTA-b"] = {1: data}
        doc = {"afr_ota": {"protocols": ["MQTT"], "streamname": "AFR_OTA-b",
                           "files": [{"fileid": 1, "filesize": len(data), "filepath": "/a"}]}}
        await aws.create_job(f"b{block}-{n}", doc, [THING])
        cfg = AwsOtaSourceConfig.model_validate(
            {"host": "127.0.0.1", "port": port, "tls": False, "client_id": "gw",
             "routes": [{"fileid": 1, "device": "a"}], "block_size": block,
             "blocks_per_request": n, "block_timeout_s": 2, "progress_interval_s": 3600})
        state = tmp / f"state-{block}-{n}"
        src = AwsOtaSource(cfg, state, gateway_id=THING, devices=[("a", None)])
        try:
            offer = await src.check(DeviceView("a", "nrf"))
            assert offer is not None
            t0 = time.perf_counter()
            path = await src.fetch(offer, None)
            took = time.perf_counter() - t0
            assert path.read_bytes() == data
        finally:
            await src.close()
            shutil.rmtree(state, ignore_errors=True)
        per_byte = (st.traffic["in"] + st.traffic["out"]) / len(data)
        return took, per_byte, len(st.requests)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=256 * 1024)
    ap.add_argument("--write-docs", action="store_true")
    args = ap.parse_args()
    data = os.urandom(args.size)
    rows = []
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        for block in BLOCKS:
            for n in PER_REQUEST:
                took, per_byte, reqs = await one(Path(d), data, block, n)
                rows.append([str(block), str(n), str(reqs), f"{took:.2f}",
                             f"{args.size / took / 1024:.0f}", f"{per_byte:.3f}"])
                print(" | ".join(rows[-1]), flush=True)
    load1 = os.getloadavg()[0]
    text = table(rows, ["block size", "blocks/request", "GetStream requests", "seconds",
                        "KiB/s", "broker bytes per image byte"])
    text += (f"\n\nFile {args.size // 1024} KiB of random bytes, CBOR, QoS 1, loopback mosquitto; "
             f"load average {load0:.1f} at the start, {load1:.1f} at the end (2 cores shared "
             "with other work).")
    print(text)
    if args.write_docs:
        update_doc("aws-ota-stream", text)


if __name__ == "__main__":
    asyncio.run(main())
