"""Configuration of the device simulator (pydantic v2, loadable from YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.sim.presets import apply_preset

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
    "firmware-loader": 7,
}
# Modes the Zephyr 3.4-era os_mgmt.c maps to a number (its #if chain stops at
# DIRECT_XIP_WITH_REVERT; anything else answers -1); later trees add RAM_LOAD (6) and
# FIRMWARE_UPDATER (7).
MCUBOOT_MODES_ZEPHYR_3_4 = frozenset({"single-app", "swap-using-scratch", "overwrite-only",
                                      "swap-using-move", "direct-xip", "direct-xip-with-revert"})
McubootMode = Literal["swap-using-scratch", "swap-using-move", "overwrite-only", "direct-xip",
                      "direct-xip-with-revert", "ram-load", "single-app", "firmware-loader"]
SWAP_MODES = frozenset({"swap-using-scratch", "swap-using-move"})
# modes in which MCUboot picks the slot to run by version (no copy): img_mgmt's direct-XIP paths
XIP_MODES = frozenset({"direct-xip", "direct-xip-with-revert", "ram-load"})


BOOT_MAX_ALIGN_LIMIT = 8  # MCUboot's BOOT_MAX_ALIGN: larger write blocks are not modelled


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UdpTransportConfig(_Model):
    host: str = "127.0.0.1"
    port: int = Field(default=0, ge=0, le=65535)  # 0 = ephemeral; the bound port is reported


class SerialTransportConfig(_Model):
    """SMP over a serial line (a PTY), received as Zephyr's transports receive it.

    ``transport: uart`` = SMP on its own UART (``overlay-serial.conf``: drivers/console/
    uart_mcumgr.c + smp_uart.c): the UART ISR puts each line in one of ``rx_buf_count`` RX
    buffers of ``rx_buf_size`` bytes (CONFIG_UART_MCUMGR_RX_BUF_COUNT = 2 /
    CONFIG_UART_MCUMGR_RX_BUF_SIZE = 128, the Kconfig defaults, also read from the Renode
    build's ``_k_mem_slab_buf_uart_mcumgr_slab``: 272 B = 2 x (128 + 8)); a line that finds
    no free buffer, or is longer than a buffer, is dropped. The buffers are freed by
    smp_uart.c's work item on the *system* work queue (priority -1, cooperative), which
    preempts the SMP work queue (priority 3), so they free up while a request is handled,
    ``rx_work_latency_s`` after the line ends, unless flash operations stall the CPU.

    ``transport: shell`` = SMP on the shell UART (``overlay-shell.conf``: smp_shell.c): the
    shell's UART ISR collects each line in one of ``rx_buf_count`` net_bufs of
    SMP_SHELL_RX_BUF_SIZE = 127 bytes (CONFIG_MCUMGR_TRANSPORT_SHELL_RX_BUF_COUNT = 2),
    longer lines are truncated; the lines are decoded by the shell thread
    (K_LOWEST_APPLICATION_THREAD_PRIO = 14), which cannot run while the SMP work queue
    (priority 3) handles a request: lines arriving then wait, and beyond ``rx_buf_count``
    they are lost. A frame larger than ``shell_mtu`` (CONFIG_MCUMGR_TRANSPORT_SHELL_MTU =
    256) gets no answer.
    """

    link: Path | None = None  # optional stable symlink to the PTY slave
    baud: int | None = Field(default=None, gt=0)  # paces both directions at baud/10 bytes/s
    transport: Literal["uart", "shell"] = "uart"
    rx_buf_count: int = Field(default=2, ge=1)
    rx_buf_size: int | None = Field(default=None, ge=8)  # None: 128 (uart) / 127 (shell)
    # rate at which bytes reach the device's UART ISR (None: baud/10, or all at once without
    # baud); with ``rx_work_latency_s`` it decides whether a line finds a free RX buffer
    # (see presets.py, renode-stm32f4-disco)
    rx_bytes_per_s: float | None = Field(default=None, gt=0)
    # rate at which the device's answers leave (None: baud/10, or unpaced)
    tx_bytes_per_s: float | None = Field(default=None, gt=0)
    rx_work_latency_s: float = Field(default=0.0, ge=0)
    # the RX buffers are freed only when the input pauses for rx_work_latency_s (Renode's
    # USART keeps the ISR busy while host bytes are queued; native_sim's polled shell UART
    # reads all queued bytes before the shell thread runs; see serial_rx.py)
    rx_free_when_idle: bool = False
    shell_mtu: int = Field(default=256, ge=16)

    @property
    def line_buf_size(self) -> int:
        if self.rx_buf_size is not None:
            return self.rx_buf_size
        return 128 if self.transport == "uart" else 127


class BleTransportConfig(_Model):
    """SMP over BLE: a Bumble GATT peripheral (gateway/sim/ble.py)."""

    name: str | None = None  # advertised name, CONFIG_BT_DEVICE_NAME (default: the device id)
    address: str | None = None  # random static BD_ADDR (default: derived from the device id)
    hci: str = "link:smp-sim"  # bumble HCI transport; link:NAME = in-process virtual link NAME
    mtu: int = Field(default=498, ge=23, le=517)  # largest ATT MTU accepted (CONFIG_BT_L2CAP_TX_MTU)
    reassembly: bool = True  # CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY
    # smp_bt.c (Zephyr 3.4): the reassembly of the next request holds a netbuf of the pool, so
    # a write finds none one request earlier than on UDP and is dropped silently (preset
    # ``zephyr-ble``); off: the pool is shared as on the other transports
    reassembly_netbuf: bool = False
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


class ExtraImageConfig(_Model):
    """Image N >= 1 of a multi-image device (CONFIG_UPDATEABLE_IMAGE_NUMBER > 1).

    Its slots are flash slots 2N (primary) and 2N+1 (secondary), as MCUboot's
    ``flash_area_id_from_multi_image_slot`` and Zephyr's ``slot2_partition``/``slot3_partition``
    number them. ``update`` is how MCUboot installs it:

    * ``swap``: like image 0 in the device's swap / overwrite mode (test, permanent, revert).
    * ``netcore``: an nRF5340 network core behind MCUboot's image access hooks
      (``boot_read_swap_state_primary_slot_hook``: the primary always reads as an empty
      trailer, so there is never a revert; ``boot_perform_update_hook``: the secondary is
      handed to the network core through PCD and the secondary's last sector - its trailer -
      is erased, the image bytes stay). The primary is the network core's own flash: the
      application cannot read it, so image state never lists it.
    """

    slot_size: int = Field(gt=0)  # the secondary slot (and the primary unless set)
    primary_slot_size: int | None = Field(default=None, gt=0)
    initial_image: Path | None = None  # provisioned into the primary of an empty flash
    update: Literal["swap", "netcore"] = "swap"


class SerialRecoveryConfig(_Model):
    """MCUboot serial recovery (``boot/boot_serial/src/boot_serial.c``): MCUboot's own SMP server.

    Served on the device's serial port while the bootloader runs (UART only, like
    CONFIG_MCUBOOT_SERIAL with ``zephyr,uart-mcumgr``). SMP version 1 behaviour: every error is
    ``{"rc": N}``, image group state read (list), upload (always into image N's *primary*
    slot: recovery has no test/confirm), OS reset; echo only with ``echo``. Entered:

    * at power-on while the recovery pin is held (``recovery_pin`` of the device /
      :meth:`SimDevice.set_recovery_pin`; CONFIG_BOOT_SERIAL_DETECT_PIN);
    * after an application ``os reset`` with ``{"boot_mode": 1}`` (``boot_mode``: MCUboot's
      CONFIG_BOOT_SERIAL_BOOT_MODE reading the retention boot mode that Zephyr's
      CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE wrote);
    * when an SMP frame arrives within ``wait_for_dfu_ms`` after any reset
      (CONFIG_BOOT_SERIAL_WAIT_FOR_DFU / _TIMEOUT);
    * when no bootable image is left (``no_application``: CONFIG_BOOT_SERIAL_NO_APPLICATION).
    It stays until an ``os reset`` (or a power cycle).
    """

    boot_mode: bool = True
    wait_for_dfu_ms: int | None = Field(default=None, ge=1)
    no_application: bool = True
    echo: bool = False  # CONFIG_BOOT_MGMT_ECHO
    img_grp_hash: bool = True  # CONFIG_BOOT_SERIAL_IMG_GRP_HASH (default y): "hash" in the list
    mcumgr_params: bool = False  # CONFIG_BOOT_SERIAL_MCUMGR_PARAMS (newer MCUboot only)
    max_receive_size: int = Field(default=1024, ge=128)  # CONFIG_BOOT_SERIAL_MAX_RECEIVE_SIZE


class SimDeviceConfig(_Model):
    """One simulated device. ``preset: NAME`` (gateway/sim/presets.py) fills every field the
    device does not set itself; the plain defaults below are a stock ``smp_svr`` (Zephyr 3.4
    Kconfig defaults) on a generic Cortex-M4 with 4 KiB flash pages (nRF52840 timings).

    Bootloader mode and layout (MCUboot and the application are built for the same mode):

    * ``mcuboot_mode``: ``swap-using-scratch`` | ``swap-using-move`` | ``overwrite-only`` |
      ``direct-xip`` | ``direct-xip-with-revert`` | ``ram-load`` | ``single-app`` |
      ``firmware-loader`` (CONFIG_BOOT_* on the MCUboot side and
      CONFIG_MCUBOOT_BOOTLOADER_MODE_* on the application side).
    * ``slot_size`` is image 0's secondary slot (what imgtool's ``--slot-size`` is given),
      ``primary_slot_size`` its primary when larger (swap using move: one sector more;
      firmware loader: slot 1 is the loader's), ``flash_offsets`` every slot's flash offset
      (direct-XIP's ROM_FIXED check), ``extra_images`` images 1..N-1 (slots 2N / 2N+1, each
      ``update: swap | netcore``, ``initial_image`` provisioned into its primary),
      ``loader_image`` the firmware loader provisioned into slot 1.
    * MCUboot build: ``key`` (signature), ``hash_algorithm``, ``encryption_key``,
      ``downgrade_prevention`` (overwrite-only), ``ram_load_region``, ``serial_recovery``
      (``SerialRecoveryConfig``) with ``recovery_pin`` held at power-on.
    * Application build (Zephyr img_mgmt / os_mgmt Kconfig): ``allow_confirm_non_active_image_*``,
      ``allow_erase_pending``, ``reject_direct_xip_mismatched_slot``, ``os_reset_boot_mode``,
      ``bootloader_no_downgrade``, ``bootloader_info_era``; ``app_smp_dead``: the application
      never answers SMP.
    """

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    preset: str | None = None
    udp: UdpTransportConfig | None = None
    serial: SerialTransportConfig | None = None
    ble: BleTransportConfig | None = None
    slot_size: int = Field(default=0x40000, gt=0)  # image 0's secondary (and primary unless set)
    # MCUboot trailer geometry (gateway/sim/flash.py): the flash write block
    # (BOOT_WRITE_SZ) and CONFIG_BOOT_MAX_IMG_SECTORS; defaults = imgtool's (8, 128)
    boot_write_align: int = Field(default=8, ge=1, le=BOOT_MAX_ALIGN_LIMIT)
    boot_max_img_sectors: int = Field(default=128, ge=1)
    key: Path | None = None  # PEM the device's MCUboot trusts; None = no signature check
    initial_image: Path | None = None  # signed image provisioned (confirmed) in an empty flash
    # --- MCUboot mode and flash layout (gateway/sim/boot.py, gateway/sim/img_state.py) ---
    mcuboot_mode: McubootMode = "swap-using-scratch"
    # image 0's primary slot when it differs from ``slot_size`` (the secondary): swap using
    # move needs one sector more; firmware-loader's slot 1 is the loader's own slot
    primary_slot_size: int | None = Field(default=None, gt=0)
    # flash offset of every slot (slot0, slot1, slot2, ...): what MCUboot compares with a
    # ROM_FIXED image's load address in direct-XIP and what REJECT_DIRECT_XIP_MISMATCHED_SLOT
    # checks; None: packed from 0x10000 on in slot order
    flash_offsets: list[int] | None = None
    extra_images: list[ExtraImageConfig] = Field(default_factory=list)  # images 1..N-1
    # firmware-loader mode: the loader application provisioned into slot 1 (it runs Zephyr's
    # img_mgmt itself and writes the new application into slot 0)
    loader_image: Path | None = None
    # MCUboot build options
    hash_algorithm: Literal["sha256", "sha384", "sha512"] = "sha256"  # the hash TLV both use
    downgrade_prevention: bool = False  # CONFIG_BOOT_DOWNGRADE_PREVENTION (overwrite-only)
    encryption_key: Path | None = None  # MCUboot's private key for encrypted images
    # RAM-load: the executable RAM region an image's load address must fall in
    # (IMAGE_EXECUTABLE_RAM_START / _SIZE)
    ram_load_region: tuple[int, int] = (0x20000000, 0x40000)
    serial_recovery: SerialRecoveryConfig | None = None
    recovery_pin: bool = False  # the serial-recovery / firmware-loader entry pin is held
    # application (Zephyr img_mgmt / os_mgmt) build options
    allow_confirm_non_active_image_secondary: bool = True  # ..._IMG_ALLOW_CONFIRM_NON_ACTIVE_IMAGE_SECONDARY
    allow_confirm_non_active_image_any: bool = False  # ..._IMG_ALLOW_CONFIRM_NON_ACTIVE_IMAGE_ANY
    allow_erase_pending: bool = False  # CONFIG_MCUMGR_GRP_IMG_ALLOW_ERASE_PENDING
    reject_direct_xip_mismatched_slot: bool = False  # ..._IMG_REJECT_DIRECT_XIP_MISMATCHED_SLOT
    os_reset_boot_mode: bool = False  # CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE ("boot_mode" key)
    # CONFIG_MCUBOOT_BOOTLOADER_NO_DOWNGRADE; None: what the mode selects in Zephyr's
    # Kconfig.mcuboot (direct-XIP, direct-XIP with revert, RAM load)
    bootloader_no_downgrade: bool | None = None
    # which os_mgmt.c answers bootloader info: "zephyr-3.4" (mode -1 for RAM load / firmware
    # loader; never "no-downgrade": that tree tests IS_ENABLED(MCUBOOT_BOOTLOADER_NO_DOWNGRADE)
    # without the CONFIG_ prefix) or "current" (every mode, "no-downgrade": true when set)
    bootloader_info_era: Literal["zephyr-3.4", "current"] = "current"
    app_smp_dead: bool = False  # the application boots but never answers SMP (any version)
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
    # What the stock smp_svr (prj.conf + a transport overlay) answers: MCUmgr parameters,
    # OS info and bootloader info are off (CONFIG_MCUMGR_GRP_OS_MCUMGR_PARAMS / _INFO /
    # _BOOTLOADER_INFO default n) and answer ENOTSUP; no "match" in the last upload answer
    # (CONFIG_IMG_ENABLE_IMAGE_CHECK default n). Checked on the Renode build (see presets).
    mcumgr_params_supported: bool = False
    bootloader_info_supported: bool = False
    os_info_supported: bool = False
    image_check: bool = False  # CONFIG_IMG_ENABLE_IMAGE_CHECK: "match" in the last response
    # zcbor (Zephyr's encoder) writes indefinite-length maps/arrays unless CONFIG_ZCBOR_CANONICAL
    cbor: Literal["zcbor", "canonical"] = "zcbor"
    # CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE / _COUNT Kconfig defaults (the smp_svr Bluetooth
    # overlay uses 2475; throughput-minded builds pick large buffers)
    buf_size: int = Field(default=384, ge=64, le=65535)
    buf_count: int = Field(default=4, ge=1)
    # --- device time (see presets.py for where each number comes from) ---
    request_processing_s: float = Field(default=0.001, ge=0)  # CPU time per request
    # flash programming speed of upload data; img_mgmt writes through stream_flash, which
    # buffers CONFIG_IMG_BLOCK_BUF_SIZE (512) bytes and programs a full block at a time.
    # Default: nRF52840 NVMC, 41 us per 32-bit word (product spec) = ~97 kB/s.
    flash_write_bps: float | None = Field(default=97_000, gt=0)
    flash_write_block: int = Field(default=512, ge=1)  # CONFIG_IMG_BLOCK_BUF_SIZE
    flash_sector_size: int = Field(default=4096, ge=256)  # erase unit of the slot's flash
    flash_erase_sector_s: float = Field(default=0.085, ge=0)  # nRF52840 t_ERASEPAGE (max)
    # CONFIG_IMG_ERASE_PROGRESSIVELY (default n): erase sector by sector while writing
    # instead of erasing the image area (and the trailer sector) at the first chunk
    erase_progressively: bool = False
    # the CPU executes from the flash it programs: during an erase/write it is halted (no
    # ISR, no thread), so UART bytes arriving then overrun the 1-byte receive register
    flash_stalls_cpu: bool = True
    # wall time MCUboot adds to a boot that swaps or reverts
    swap_time_s: float | None = Field(default=None, ge=0)  # None: from the flash timings
    # factor applied to boot_time_s and swap_time_s (e.g. 0.01 to run a Renode preset fast)
    time_scale: float = Field(default=1.0, gt=0)
    serial_line_length: int = Field(default=127, ge=8)  # MCUMGR_SERIAL_MAX_FRAME
    link: LinkConfig = Field(default_factory=LinkConfig)
    # --- fault injection (gateway/sim/faults.py) ---
    power_cut_during_swap: bool = False  # cut power once, mid-swap / mid-copy; MCUboot resumes
    # cut power once while img_mgmt writes a trailer (state write): see faults.py
    power_cut_during_trailer_write: Literal["torn-magic", "after-magic"] | None = None
    swap_sector_size: int = Field(default=0x4000, ge=512)  # granularity of the modelled swap
    dead_after_reset: int | None = Field(default=None, ge=1)  # the Nth reset leaves it off
    unplug_during_upload_at: int | None = Field(default=None, ge=0)  # serial: PTY vanishes
    unplug_for_s: float = Field(default=1.0, ge=0)  # ...and comes back (same link path) later
    response_faults: list[ResponseFaultConfig] = Field(default_factory=list)
    img_mgmt_supported: bool = True  # False: image group answers ENOTSUP (no CONFIG_MCUMGR_GRP_IMG)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            return apply_preset(str(data["preset"]), data)
        return data

    @model_validator(mode="after")
    def _one_transport(self) -> SimDeviceConfig:
        if sum(t is not None for t in (self.udp, self.serial, self.ble)) != 1:
            raise ValueError(f"device {self.id}: configure exactly one of 'udp', 'serial' or 'ble'")
        return self

    @model_validator(mode="after")
    def _swap_fits_status(self) -> SimDeviceConfig:
        sectors = -(-self.slot_size // self.swap_sector_size)
        if sectors > self.boot_max_img_sectors:
            raise ValueError(
                f"device {self.id}: slot_size / swap_sector_size = {sectors} sectors, more than "
                f"boot_max_img_sectors ({self.boot_max_img_sectors}) MCUboot can track: raise "
                "swap_sector_size or boot_max_img_sectors")
        return self

    @model_validator(mode="after")
    def _layout_fits_mode(self) -> SimDeviceConfig:
        n = len(self.slot_sizes)
        if self.flash_offsets is not None and len(self.flash_offsets) != n:
            raise ValueError(f"device {self.id}: flash_offsets has {len(self.flash_offsets)} "
                             f"entries, the layout has {n} slots (2 per image)")
        if self.extra_images and self.mcuboot_mode not in (*SWAP_MODES, "overwrite-only"):
            raise ValueError(f"device {self.id}: extra_images (multi-image) need a swap or "
                             f"overwrite-only mcuboot_mode, not {self.mcuboot_mode!r} (Zephyr's "
                             "img_mgmt: 'Multi image does not support DirectXIP currently')")
        if self.mcuboot_mode in ("single-app", "firmware-loader") and self.extra_images:
            raise ValueError(f"device {self.id}: {self.mcuboot_mode} has one image")
        if self.mcuboot_mode == "single-app" and self.serial_recovery is None:
            raise ValueError(f"device {self.id}: single-app can only be updated through MCUboot "
                             "serial recovery: add a serial_recovery section")
        if self.serial_recovery is not None and self.serial is None:
            raise ValueError(f"device {self.id}: serial_recovery needs a serial transport "
                             "(MCUboot's boot_serial speaks SMP on a UART)")
        return self

    @property
    def mcuboot_mode_number(self) -> int:
        return MCUBOOT_MODES[self.mcuboot_mode]

    @property
    def image_count(self) -> int:
        """CONFIG_UPDATEABLE_IMAGE_NUMBER (= CONFIG_MCUMGR_GRP_IMG_UPDATABLE_IMAGE_NUMBER)."""
        return 1 + len(self.extra_images)

    @property
    def slot_sizes(self) -> list[int]:
        """Size of every flash slot in MCUboot's order (image 0 primary, secondary, image 1...).

        single-app has no secondary slot at all (MCUBOOT_SINGLE_APPLICATION_SLOT)."""
        first = self.primary_slot_size or self.slot_size
        if self.mcuboot_mode == "single-app":
            return [first]
        sizes = [first, self.slot_size]
        for img in self.extra_images:
            sizes += [img.primary_slot_size or img.slot_size, img.slot_size]
        return sizes

    @property
    def slot_offsets(self) -> list[int]:
        if self.flash_offsets is not None:
            return list(self.flash_offsets)
        out, off = [], 0x10000
        for size in self.slot_sizes:
            out.append(off)
            off += size
        return out

    @property
    def no_downgrade(self) -> bool:
        if self.bootloader_no_downgrade is not None:
            return self.bootloader_no_downgrade
        return self.mcuboot_mode in XIP_MODES


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
        d.loader_image = fix(d.loader_image) or d.loader_image
        d.encryption_key = fix(d.encryption_key) or d.encryption_key
        for img in d.extra_images:
            img.initial_image = fix(img.initial_image) or img.initial_image
        if d.serial is not None and d.serial.link is not None:
            d.serial.link = fix(d.serial.link) or d.serial.link
    return cfg


def check_files(cfg: SimConfig) -> None:
    """Raise ``ValueError`` naming the first missing file and its key (before any start)."""
    for i, d in enumerate(cfg.devices):
        files = [("key", d.key), ("initial_image", d.initial_image),
                 ("loader_image", d.loader_image), ("encryption_key", d.encryption_key)]
        files += [(f"extra_images[{n}].initial_image", img.initial_image)
                  for n, img in enumerate(d.extra_images)]
        for name, f in files:
            if f is not None and not f.is_file():
                raise ValueError(f"devices[{i}] ({d.id}).{name}: no such file: {f}")
