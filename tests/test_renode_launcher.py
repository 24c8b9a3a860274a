"""gateway/renode.py on the real firmware: boots, answers SMP, resets keeping flash, stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.renode import RenodeMachine
from gateway.smp.session import SMPSession
from gateway.smp.transport import SerialTransport

pytestmark = pytest.mark.renode


async def test_launcher_boots_resets_keeping_flash_and_stops(stm32f4_disco: Path, tmp_path: Path) -> None:
    v3 = stm32f4_disco / "smp_svr-3.0.0.signed.bin"
    m = RenodeMachine(stm32f4_disco, tmp_path / "m", loads=[(v3, 0x08080000)])
    async with m:
        assert m.pty.is_symlink() and m.pty.resolve().parent == Path("/dev/pts")
        after = await m.wait_console("Swap type: none", timeout_s=30)
        async with SMPSession(SerialTransport(str(m.pty)), timeout_s=5) as s:
            slots = {st.slot: st for st in await s.image_state()}
        assert slots[0].version == "1.0.0" and slots[0].active and slots[0].confirmed
        assert slots[1].version == "3.0.0" and not slots[1].pending  # the extra load landed
        # mark 3.0.0 for test, then a monitor reset: MCUboot must find the pending trailer the
        # firmware wrote to flash before the reset (the flash survives, RAM does not)
        async with SMPSession(SerialTransport(str(m.pty)), timeout_s=5) as s:
            await s.image_test(bytes(slots[1].hash))
        await m.reset_keep_flash()
        after = await m.wait_console("Starting bootloader", timeout_s=60, after=after)
        await m.wait_console("Swap type: test", timeout_s=60, after=after)
        proc = m.proc  # stopped in mid-swap: the swap itself is renode/smp_gateway.robot's business
        assert proc is not None
    assert proc.returncode is not None  # stopped
    assert not m.fifo.exists()
