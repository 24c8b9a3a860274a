"""One real MCUboot device updated over LwM2M: the emulated STM32F4-Discovery (Renode, real
MCUboot swap-using-scratch + Zephyr smp_svr 1.0.0 from the shared firmware folder) behind the
gateway, the real Eclipse Wakaama server PUSHing the signed smp_svr 2.0.0 by Block1 and
executing Update. It ends with State 0 / Result 1 and the device itself reporting 2.0.0
active and confirmed - answered by the firmware over SMP, not by the gateway.

A Python-driven Renode launch (``gateway.renode.RenodeMachine``) and the daemon in-process:
the cheapest real run (one swap, ~35 s of it).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from daemon_support import serving
from lwm2m_server import Wakaama, wakaama_binary

from gateway.config import parse_config
from gateway.daemon import Gateway
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport

pytestmark = [pytest.mark.renode, pytest.mark.timeout(300)]

STATE, RESULT, FWVER = "/5/0/3", "/5/0/5", "/3/0/3"


async def test_renode_mcuboot_device_updated_by_lwm2m_push(stm32f4_disco: Path,
                                                            tmp_path: Path) -> None:
    from gateway.renode import RenodeMachine

    wakaama_binary()
    fw = stm32f4_disco
    t0 = time.monotonic()
    async with Wakaama() as server, RenodeMachine(fw, tmp_path / "renode") as m:
        cfg = parse_config({
            "gateway_id": "renode-gateway", "state_dir": str(tmp_path / "state"),
            "trusted_keys": [str(fw / "signing-key.pem")],
            "source": {"kind": "lwm2m", "server": server.url, "bind_host": "127.0.0.1",
                       "lifetime_s": 120, "poll_interval_s": 60, "request_timeout_s": 20},
            "devices": [{
                "id": "disco", "hardware": "stm32f4_disco", "slot_size": 262144,
                "confirm": "gateway", "health_check_s": 2,
                "transport": {"kind": "serial", "port": str(m.pty), "baud": 115200,
                              "line_length": 127},
                "timeouts": {"request_s": 10, "upload_first_chunk_s": 60, "reset_s": 180,
                             "connect_s": 30}}],
        }, tmp_path / "gateway.yaml")
        async with serving(Gateway(cfg), tolerant=True):
            c = await server.registered("disco", within=60)
            for uri in (STATE, RESULT):
                await server.observe(c, uri)
            mark = server.mark()
            img = fw / "smp_svr-2.0.0.signed.bin"
            assert (await server.write(c, "/5/0/0", f"@{img}", within=120)).code == "2.04"
            await server.notified(c, STATE, 2, 60, mark)  # every pre-flight check passed
            assert (await server.exec(c, "/5/0/2")).code == "2.04"
            await server.notified(c, RESULT, 1, 240, mark)
            await server.notified(c, STATE, 0, 10, mark)
            assert (await server.read(c, FWVER)).payload.endswith(b"2.0.0")
            states = server.values(c, STATE)
            assert states[-4:] == [1, 2, 3, 0], states
        # what the device itself says: 2.0.0 running, confirmed (it survives a reset)
        async with SMPSession(SerialTransport(str(m.pty)), timeout_s=5) as s:
            slots = {st.slot: st for st in await s.image_state()}
        assert slots[0].version == "2.0.0" and slots[0].active and slots[0].confirmed, slots
        assert "Swap type: test" in m.console_text()
    print(f"\nLwM2M PUSH to the Renode MCUboot device: {time.monotonic() - t0:.0f}s wall")
