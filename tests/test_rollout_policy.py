"""The staged-rollout decisions (gateway/rollout.py) on their own: canaries, soak, halt, resume,
persistence. The end-to-end rollout over simulated devices is in tests/test_fleet_ops.py."""

from __future__ import annotations

from pathlib import Path

from gateway.config import RolloutConfig
from gateway.opstate import OpState
from gateway.rollout import RolloutManager, canary_count


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_canary_count() -> None:
    assert canary_count(3, 100) == 3
    assert canary_count("10%", 20) == 2
    assert canary_count("1%", 20) == 1
    assert canary_count("100%", 7) == 7


async def test_canaries_then_soak_then_open(tmp_path: Path) -> None:
    clock = Clock()
    checked: list[str] = []

    async def verify(unit: str, artifact: str) -> str | None:
        checked.append(unit)
        return None

    ops = OpState(tmp_path / "fleet.sqlite")
    m = RolloutManager(RolloutConfig(canary=2, wait_s=60, max_failure_pct=10), ops, lambda: 20,
                       verify=verify, clock=clock)
    assert (await m.admit("device:a", "art")).role == "canary"
    assert (await m.admit("device:b", "art")).role == "canary"
    d = await m.admit("device:c", "art")
    assert not d.go and "waiting for the canaries" in d.reason
    m.finished("device:a", "art", True)
    assert not (await m.admit("device:c", "art")).go
    m.finished("device:b", "art", True)
    d = await m.admit("device:c", "art")
    assert not d.go and d.retry_in_s == 60
    clock.t += 61
    d = await m.admit("device:c", "art")  # never waits: the check is settle's (no session held)
    assert not d.go and "checked once more" in d.reason and checked == []
    await m.settle()
    assert (await m.admit("device:c", "art")).go
    assert sorted(checked) == ["device:a", "device:b"]
    # persisted: a new manager (restart) knows the wave is open
    m2 = RolloutManager(RolloutConfig(canary=2, wait_s=60), ops, lambda: 20, clock=clock)
    assert m2.waves["art"].state == "open"
    assert (await m2.admit("device:z", "art")).go
    ops.close()


async def test_failing_canaries_halt_and_nobody_else_starts(tmp_path: Path) -> None:
    m = RolloutManager(RolloutConfig(canary="10%", wait_s=0, max_failure_pct=0), None, lambda: 20)
    assert (await m.admit("device:a", "art")).go
    assert (await m.admit("device:b", "art")).go
    m.finished("device:a", "art", False, "rolled-back: crashed on boot")
    w = m.waves["art"]
    assert w.state == "halted" and "device:a: rolled-back" in w.reason
    for u in ("device:c", "device:d"):
        d = await m.admit(u, "art")
        assert not d.go and "halted" in d.reason
    # the canary admitted before the halt still finishes its own update
    assert (await m.admit("device:b", "art")).go
    assert m.resume("art")
    assert (await m.admit("device:c", "art")).go


async def test_a_failed_canary_within_threshold_is_replaced(tmp_path: Path) -> None:
    m = RolloutManager(RolloutConfig(canary=1, wait_s=0, max_failure_pct=50), None, lambda: 10)
    assert (await m.admit("device:a", "art")).go
    assert not (await m.admit("device:b", "art")).go
    m.finished("device:a", "art", False, "link lost")  # 1 of 1 started = 100 % > 50 %: halted
    assert m.waves["art"].state == "halted"
    m2 = RolloutManager(RolloutConfig(canary=2, wait_s=0, max_failure_pct=50), None, lambda: 10)
    for u in ("device:a", "device:b"):
        assert (await m2.admit(u, "x")).go
    m2.finished("device:a", "x", True)
    m2.finished("device:b", "x", False, "link lost")  # 1 of 2 = 50 %: not above the threshold
    assert m2.waves["x"].state == "canary"
    assert (await m2.admit("device:c", "x")).role == "canary"  # replaces the failed canary
    m2.finished("device:c", "x", True)
    assert m2.waves["x"].state == "soak"
    assert (await m2.admit("device:d", "x")).go  # wait_s = 0: open at once


async def test_unhealthy_canary_after_soak_halts(tmp_path: Path) -> None:
    clock = Clock()

    async def verify(unit: str, artifact: str) -> str | None:
        return "runs 1.0.0 again (reverted)" if unit == "device:b" else None

    m = RolloutManager(RolloutConfig(canary=2, wait_s=5), None, lambda: 4, verify=verify, clock=clock)
    for u in ("device:a", "device:b"):
        await m.admit(u, "art")
        m.finished(u, "art", True)
    clock.t += 6
    await m.settle()
    d = await m.admit("device:c", "art")
    assert not d.go and "unhealthy" in d.reason and "device:b" in d.reason
