"""Configuration of the device simulator (pydantic v2, loadable from YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# Values of MCUboot's ``MCUBOOT_MODE_*`` as Zephyr's os_mgmt bootloader-info reports them
# (zephyr subsys/mgmt/mcumgr/grp/os_mgmt/src/os_mgmt.c maps CONFIG_MCUBOOT_BOOTLOADER_MODE_*
# to these; numbers from mcuboot boot/bootutil/include/bootutil/boot_status.h, mirrored by
# smp.os_management.MCUbootMode).
MCUBOOT_MODES: dict[str, int] = {
    "single-app": 0,
    "swap-using-scratch": 1,
    "overwrite-only": 2,
    "swap-using-move": 3,
    "direct-xip": 4,
    "direct-xip-with-revert": 5,
    "ram-load": 6,
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UdpTransportConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0 = ephemeral; the bound port is reported


class SerialTransportConfig(_Model):
    link: Path | None = None  # optional stable symlink to the PTY slave
    baud: int | None = Field(default=None, gt=0)  # paces both directions at baud/10 bytes/s


class BleTransportConfig(_Model):
    """SMP over BLE: a Bumble GATT peripheral (gateway/sim/ble.py)."""

    name: str | None = None  # advertised name, CONFIG_BT_DEVICE_NAME (default: the device id)
    address: str | None = None  # random static BD_ADDR (default: derived from the device id)
    hci: str = "link:smp-sim"  # bumble HCI transport; link:NAME = in-process virtual link NAME
    mtu: int = Field(default=498, ge=23, le=517)  # largest ATT MTU accepted (CONFIG_BT_L2CAP_TX_MTU)
    reassembly: bool = True  # CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY
    advertising_interval_ms: float = Field(default=50.0, ge=20)


class LinkConfig(_Model):
    """Link emulation. Every direction is a FIFO pipe: serialization delay accumulates."""

    latency_s: float = Field(default=0.0, ge=0)  # one-way latency, each direction
    request_latency_s: float | None = Field(default=None, ge=0)  # overrides latency_s
    response_latency_s: float | None = Field(default=None, ge=0)  # overrides latency_s
    bandwidth_bps: float | None = Field(default=None, gt=0)  # bytes/s per direction
    request_loss: float = Field(default=0.0, ge=0, le=1)  # datagram/frame loss probability
    response_loss: float = Field(default=0.0, ge=0, le=1)
    duplicate: float = Field(default=0.0, ge=0, le=1)  # probability a frame is delivered twice
    reorder: float = Field(default=0.0, ge=0, le=1)  # probability a frame is held back
    reorder_delay_s: float = Field(default=0.05, ge=0)  # how long a reordered frame is held
    seed: int | None = None  # RNG seed (default: derived from the device id)

    @property
    def req_latency(self) -> float:
        return self.latency_s if self.request_latency_s is None else self.request_latency_s

    @property
    def rsp_latency(self) -> float:
        return self.latency_s if self.response_latency_s is None else self.response_latency_s


class ResponseFaultConfig(_Model):
    """A device that answers with broken SMP frames (buggy firmware / transport)."""

    kind: Literal["malformed-cbor", "wrong-seq", "oversized", "truncated", "wrong-group"]
    every: int = Field(default=5, ge=1)  # break every Nth response (of the selected group)
    count: int = Field(default=3, ge=0)  # at most this many (0 = unlimited)
    group: int | None = None  # only responses of this SMP group (None = any)
    size: int = Field(default=4096, ge=1)  # oversized: bytes of padding added


class SimDeviceConfig(_Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    udp: UdpTransportConfig | None = None
    serial: SerialTransportConfig | None = None
    ble: BleTransportConfig | None = None
    slot_size: int = Field(default=0x40000, gt=0)
    key: Path | None = None  # PEM the device's MCUboot trusts; None = no signature check
    initial_image: Path | None = None  # signed image provisioned (confirmed) in an empty flash
    mcuboot_mode: Literal[
        "swap-using-scratch", "swap-using-move"
    ] = "swap-using-scratch"  # swap modes only: that is what is modelled
    boot_time_s: float = Field(default=0.5, ge=0)
    reset_delay_s: float = Field(default=0.25, ge=0)  # CONFIG_MCUMGR_GRP_OS_RESET_MS = 250
    app_confirms_after_s: float | None = Field(default=None, ge=0)
    crash_on_boot_versions: list[str] = Field(default_factory=list)
    crash_after_s: float = Field(default=1.0, ge=0)
    hang_on_boot_versions: list[str] = Field(default_factory=list)
    # a hung image is reset by its watchdog after this long (None: hangs until power-cycled)
    hang_watchdog_s: float | None = Field(default=None, ge=0)
    reboot_during_upload_at: int | None = Field(default=None, ge=0)
    hardware: str = "sim_board"
    mcumgr_params_supported: bool = True
    bootloader_info_supported: bool = True
    os_info_supported: bool = True
    image_check: bool = True  # CONFIG_IMG_ENABLE_IMAGE_CHECK: "match" in the last response
    # Zephyr's Kconfig default for CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE is 384; 2475 is what
    # the smp_svr sample's Bluetooth overlay uses and what throughput-minded builds pick.
    buf_size: int = Field(default=2475, ge=64, le=65535)
    buf_count: int = Field(default=4, ge=1)
    request_processing_s: float = Field(default=0.0, ge=0)  # device time per request
    flash_write_bps: float | None = Field(default=None, gt=0)  # upload chunk write speed
    serial_line_length: int = Field(default=127, ge=8)  # MCUMGR_SERIAL_MAX_FRAME
    link: LinkConfig = Field(default_factory=LinkConfig)
    # --- fault injection (gateway/sim/faults.py) ---
    power_cut_during_swap: bool = False  # cut power once, mid-swap; MCUboot resumes at next boot
    swap_sector_size: int = Field(default=0x4000, ge=512)  # granularity of the modelled swap
    dead_after_reset: int | None = Field(default=None, ge=1)  # the Nth reset leaves it off
    unplug_during_upload_at: int | None = Field(default=None, ge=0)  # serial: PTY vanishes
    unplug_for_s: float = Field(default=1.0, ge=0)  # ...and comes back (same link path) later
    response_faults: list[ResponseFaultConfig] = Field(default_factory=list)
    img_mgmt_supported: bool = True  # False: image group answers ENOTSUP (no CONFIG_MCUMGR_GRP_IMG)

    @model_validator(mode="after")
    def _one_transport(self) -> SimDeviceConfig:
        if sum(t is not None for t in (self.udp, self.serial, self.ble)) != 1:
            raise ValueError(f"device {self.id}: configure exactly one of 'udp', 'serial' or 'ble'")
        return self

    @property
    def mcuboot_mode_number(self) -> int:
        return MCUBOOT_MODES[self.mcuboot_mode]


class SimConfig(_Model):
    state_dir: Path
    devices: list[SimDeviceConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_ids(self) -> SimConfig:
        ids = [d.id for d in self.devices]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"duplicate device ids: {sorted(dup)}")
        return self


def load_sim_config(path: str | Path) -> SimConfig:
    """Load a SimConfig from YAML; relative paths are taken relative to the file."""
    p = Path(path)
    raw = yaml.safe_load(p.read_text()) or {}
    cfg = SimConfig.model_validate(raw)
    base = p.resolve().parent

    def fix(x: Path | None) -> Path | None:
        return None if x is None or x.is_absolute() else base / x

    cfg.state_dir = fix(cfg.state_dir) or cfg.state_dir
    for d in cfg.devices:
        d.key = fix(d.key) or d.key
        d.initial_image = fix(d.initial_image) or d.initial_image
        if d.serial is not None and d.serial.link is not None:
            d.serial.link = fix(d.serial.link) or d.serial.link
    return cfg
