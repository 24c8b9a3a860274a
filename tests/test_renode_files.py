"""renode/ without Renode: the Robot suite dry-runs, and the configs fit the gateway's schema and CLI.

Renode cannot be installed on CI machines, so the emulated STM32F4-Discovery test itself
(``renode-test renode/smp_gateway.robot``) runs by hand; this keeps its files honest.
"""

from __future__ import annotations

import itertools
import re
import shutil
from pathlib import Path

import pytest
import yaml

from gateway import cli
from gateway.config import SerialTransport, parse_config
from gateway.sources.local import load_manifest

RENODE = Path(__file__).resolve().parent.parent / "renode"
SLOT_SIZE = 256 * 1024


def _robot_dryrun(suite: Path, out: Path) -> tuple[int, str]:
    import robot  # robotframework, from the test extra

    log = out / "console.txt"
    with open(log, "w") as stdout:
        rc = robot.run(str(suite), dryrun=True, output="NONE", report="NONE", log="NONE",
                       variable=[f"RENODEKEYWORDS:{RENODE / 'dryrun_keywords.resource'}"],
                       stdout=stdout, stderr=stdout)
    return rc, log.read_text()


def test_robot_suite_dry_runs(tmp_path: Path) -> None:
    rc, text = _robot_dryrun(RENODE / "smp_gateway.robot", tmp_path)
    assert rc == 0, text
    assert "2 tests, 2 passed, 0 failed" in text


def _configs() -> list[Path]:
    return [RENODE / "gateway.yaml", RENODE / "gateway-app.yaml"]


@pytest.mark.parametrize("name", ["gateway.yaml", "gateway-app.yaml"])
def test_gateway_configs_match_the_schema(tmp_path: Path, name: str) -> None:
    # the key is made when the images are built (README): a placeholder stands in for it
    root = tmp_path / "renode"
    root.mkdir()
    shutil.copy(RENODE / name, root / name)
    (root / "work" / "keys").mkdir(parents=True)
    (root / "work" / "keys" / "signing.pem").write_text("placeholder\n")
    cfg = parse_config(yaml.safe_load((root / name).read_text()), root / name)
    (dev,) = cfg.devices
    assert isinstance(dev.transport, SerialTransport)
    # the PTY Renode creates (resc default, relative to the repository root; the Robot suite
    # passes ${CURDIR}/work/uart.pty) is the port the gateway opens from renode/
    assert dev.transport.port == "work/uart.pty"
    assert dev.slot_size == SLOT_SIZE
    t = dev.timeouts
    assert t.reset_s >= 120 and t.request_s >= 10  # ~35 s swaps, ~4.5 kB/s emulated UART
    assert cfg.source.kind == "local"
    assert cfg.source.path == (root / "work" / "updates").resolve()  # type: ignore[union-attr]
    if name == "gateway-app.yaml":
        assert dev.confirm == "app" and t.app_confirm_s < t.reset_s
    else:
        assert dev.confirm == "gateway"


def test_robot_suite_uses_the_cli_as_it_is() -> None:
    text = (RENODE / "smp_gateway.robot").read_text()
    calls = re.findall(r"Run Gateway {2,}(.+)", text)
    assert calls
    for call in calls:
        args = [a.replace("${CURDIR}", str(RENODE)) for a in re.split(r" {2,}", call.strip())]
        ns = cli._parser().parse_args(args)
        assert Path(ns.config).name in {p.name for p in _configs()}
        assert (RENODE / Path(ns.config).name).is_file()
    assert "${GATEWAY}              smp-gateway" in text
    assert re.search(r'^smp-gateway = "gateway\.cli:main"',
                     (RENODE.parent / "pyproject.toml").read_text(), re.M)


def test_robot_manifest_is_a_valid_local_source(tmp_path: Path) -> None:
    text = (RENODE / "smp_gateway.robot").read_text()
    m = re.search(r"\.\.\.\s+(images: .*)\\n$", text, re.M)
    assert m, "Publish Image's manifest line not found"
    (tmp_path / "manifest.yaml").write_text(m.group(1).replace("${version}", "2.0.0") + "\n")
    (entry,) = load_manifest(tmp_path).images
    assert entry.file == "smp_svr-2.0.0.signed.bin"
    assert entry.hardware == "stm32f4_disco"


def _partitions() -> dict[str, tuple[int, int]]:
    text = (RENODE / "zephyr" / "partitions.overlay").read_text()
    out = {}
    for label, off, size_k in re.findall(
            r'label = "([\w-]+)";\s*reg = <0x([0-9a-fA-F]+) DT_SIZE_K\((\d+)\)>', text):
        out[label] = (int(off, 16), int(size_k) * 1024)
    return out


def test_flash_layout_agrees_across_files() -> None:
    parts = _partitions()
    assert set(parts) == {"mcuboot", "image-0", "image-1", "image-scratch"}
    # Renode's STM32F4 flash model has wrong sizes for sectors 4-5 (0x10000-0x3FFFF):
    # everything MCUboot erases for a swap lives in sector 6 and up
    for label in ("image-0", "image-1", "image-scratch"):
        assert parts[label][0] >= 0x40000, label
    assert parts["image-0"][1] == parts["image-1"][1] == SLOT_SIZE
    spans = sorted(parts.values())
    for (a, alen), (b, _) in itertools.pairwise(spans):
        assert a + alen <= b, "partitions overlap"
    assert spans[-1][0] + spans[-1][1] <= 0x100000  # 1 MiB of flash
    resc = (RENODE / "stm32f4_disco_mcuboot.resc").read_text()
    loads = dict(re.findall(r"sysbus LoadBinary \$(\w+) (0x[0-9a-fA-F]+)", resc))
    assert int(loads["erased"], 16) == int(loads["mcuboot"], 16) == 0x08000000
    assert int(loads["app"], 16) == 0x08000000 + parts["image-0"][0]
    assert resc.index("LoadBinary $erased") < resc.index("LoadBinary $mcuboot")  # erased first
    assert "cpu VectorTableOffset 0x08000000" in resc.split("macro reset", 1)[1]
    assert "CreateUartPtyTerminal" in resc and "connector Connect sysbus.usart2" in resc


def test_resc_variables_are_the_ones_the_suite_sets() -> None:
    resc = (RENODE / "stm32f4_disco_mcuboot.resc").read_text()
    robot_text = (RENODE / "smp_gateway.robot").read_text()
    defaults = set(re.findall(r"^\$(\w+)\?=", resc, re.M))
    set_by_suite = set(re.findall(r"Execute Command\s+\$(\w+)=", robot_text))
    assert set_by_suite <= defaults
    assert {"repl", "erased", "mcuboot", "app", "pty"} <= set_by_suite
    assert re.search(r'^\$pty\?="renode/work/uart\.pty"$', resc, re.M)
    # no working file under /tmp/renode-* (Renode deletes those of dead processes)
    for f in RENODE.rglob("*"):
        if f.is_file() and f.suffix in {".resc", ".robot", ".yaml", ".repl"}:
            assert not re.search(r"[@\"'=]\s*/tmp/renode-", f.read_text()), f
    repl = (RENODE / "stm32f4_disco_offline.repl").read_text()
    assert "ApplySVD" not in repl.split("sysbus:", 1)[1]  # offline: the SVD download is dropped
