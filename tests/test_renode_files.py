"""renode/ without Renode: cheap checks of the Robot suite's files (the suite itself runs for
real in tests/test_renode_suite.py).

The configs fit the gateway's schema and the firmware's flash layout, every keyword the suite
uses from its Python library exists, every config and firmware file it names exists, and the
launcher finds the shared folder the way README says.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from gateway import renode as rn
from gateway.config import SerialTransport, parse_config

RENODE = Path(__file__).resolve().parent.parent / "renode"
SUITE = RENODE / "smp_gateway.robot"
CONFIGS = sorted(p.name for p in RENODE.glob("*.yaml"))


def _suite():  # type: ignore[no-untyped-def]
    from robot.api import TestSuite

    return TestSuite.from_file_system(str(SUITE))


def test_suite_has_the_six_cases_with_their_tags() -> None:
    tags = {t.name: set(t.tags) for t in _suite().tests}
    assert len(tags) == 6, list(tags)
    for want in ({"upload", "swap"}, {"revert"}, {"resume"}, {"power-loss"}, {"refused-at-boot"},
                 {"refused"}):
        assert any(want <= t for t in tags.values()), (want, tags)


def test_suite_keywords_exist_in_its_library() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gateway_keywords", RENODE / "gateway_keywords.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    library = {getattr(f, "robot_name", None) for f in vars(mod).values() if callable(f)} - {None}
    text = SUITE.read_text()
    own = set(re.findall(r"^([A-Z][\w -]+?)\s*$", text.split("*** Keywords ***", 1)[1], re.M))
    # keywords the suite calls that neither it, Robot's libraries nor Renode define
    for name in ("Prepare Work Dir", "Publish Image", "Gateway Command", "Outcome Line",
                 "Report Should Be", "Upload Resumed From", "Wait For Upload Offset",
                 "Slot Should Hold", "Slot Should Be Empty", "Sign Image", "Make Key",
                 "File Word", "Firmware Dir"):
        assert name in library, name
        assert name in text, f"{name} is not used any more: drop it"
    assert {"Start Test Board", "Run Gateway Once", "Stop Gateway And Reset"} <= own


def test_suite_names_existing_configs_and_firmware_files() -> None:
    text = SUITE.read_text()
    used = set(re.findall(r"\b([\w-]+\.yaml)\b", text))
    assert used and used <= set(CONFIGS), (used, CONFIGS)
    for f in re.findall(r"\$\{FIRMWARE\}/([\w.-]+)", text):
        assert f in {"smp_svr-2.0.0.signed.bin", "smp_svr-3.0.0.signed.bin", "signing-key.pem",
                     "stm32f4_disco_mcuboot.resc"}, f
    # runtime files stay out of $TMPDIR/renode-* (Renode deletes those of dead processes)
    assert "/tmp/renode-" not in text


@pytest.mark.parametrize("name", CONFIGS)
def test_gateway_configs_match_the_schema(tmp_path: Path, name: str) -> None:
    # the suite copies the config into a work folder holding keys/ (Prepare Work Dir)
    shutil.copy(RENODE / name, tmp_path / "gateway.yaml")
    data = yaml.safe_load((tmp_path / "gateway.yaml").read_text())
    (tmp_path / "keys").mkdir()
    for k in data["trusted_keys"]:
        (tmp_path / k).write_text("placeholder\n")
    cfg = parse_config(data, tmp_path / "gateway.yaml")
    (dev,) = cfg.devices
    assert isinstance(dev.transport, SerialTransport)
    assert dev.transport.port == "uart.pty"  # $pty the suite gives the .resc, from cwd=work
    assert dev.slot_size == 256 * 1024  # ../shared/firmware/stm32f4_disco/README.md layout
    assert dev.hardware == "stm32f4_disco"
    t = dev.timeouts
    assert t.reset_s >= 150 and t.request_s >= 10  # 32-75 s swaps; a mid-swap reset doubles it
    assert cfg.source.kind == "local"
    assert (tmp_path / "keys" / "signing-key.pem").exists()
    if name == "gateway-app.yaml":
        assert dev.confirm == "app" and t.app_confirm_s < t.reset_s
    else:
        assert dev.confirm == "gateway"


def test_shared_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(rn.SHARED_ENV, str(tmp_path))
    assert rn.shared_dir() is None  # no renode/renode there
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "renode" / "renode"))):
        rn.firmware_dir("stm32f4_disco")
    (tmp_path / "renode").mkdir()
    (tmp_path / "renode" / "renode").write_text("#!/bin/sh\n")
    assert rn.shared_dir() == tmp_path.resolve()
    with pytest.raises(FileNotFoundError, match="firmware 'nope' not found"):
        rn.firmware_dir("nope")
    monkeypatch.delenv(rn.SHARED_ENV)
    path, why = rn.shared_candidate()
    assert path == (Path(rn.__file__).resolve().parents[2] / "shared").resolve()
    assert rn.SHARED_ENV in why


def test_machine_refuses_monitor_paths_with_spaces(tmp_path: Path) -> None:
    fw = tmp_path / "fw"
    fw.mkdir()
    (fw / "stm32f4_disco_mcuboot.resc").write_text("")
    m = rn.RenodeMachine(fw, tmp_path / "with space")
    with pytest.raises(ValueError, match="spaces"):
        m._script()
