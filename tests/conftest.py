"""Shared fixtures: imgtool-made keys/images and simulated devices on real sockets and PTYs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.demo import Bench, make_bench


@pytest.fixture
def bench_factory(tmp_path: Path) -> Callable[..., Bench]:
    """``bench_factory(udp=1, serial=0, device_kw={...})`` -> a Bench in tmp_path."""
    count = [0]

    def make(**kw: Any) -> Bench:
        count[0] += 1
        return make_bench(tmp_path / f"bench{count[0]}", **kw)

    return make
