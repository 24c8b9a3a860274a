"""Gateway configuration: YAML file -> typed, validated pydantic models.

Owns the schema of ``smp-gateway``'s YAML (gateway identity, state directory, trusted keys,
update source, devices) and turns every validation problem into one ``ConfigError`` that
names the file, the key path and what was expected. Unknown keys are errors.
Relative paths in the file are resolved against the file's directory.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from gateway.maintenance import check_window
from gateway.schema import ConfigError, Model, Secret, SecretRef
from gateway.sources.settings import (
    AwsOtaSourceConfig,
    AzureIotHubSourceConfig,
    HawkbitSourceConfig,
    LatestReleaseSourceConfig,
    Lwm2mSourceConfig,
    MqttJobsSourceConfig,
    RdfmSourceConfig,
    azure_key_owners,
)

# re-exported: ``gateway.config.ConfigError`` / ``Model`` / ``Secret`` / ``SecretRef`` are public
__all__ = ["ConfigError", "Model", "Secret", "SecretRef"]


class UdpTransport(Model):
    kind: Literal["udp"] = "udp"
    host: str
    port: int = Field(1337, ge=1, le=65535)
    mtu: int = Field(1500, ge=64, le=65535, description="link MTU; IP+UDP headers are subtracted")


class SerialTransport(Model):
    kind: Literal["serial"] = "serial"
    port: str = Field(description="serial device, e.g. /dev/ttyACM0")
    baud: int = Field(115200, gt=0)
    line_length: int = Field(
        127, ge=8, le=8192, description="CONFIG_UART_MCUMGR_RX_BUF_SIZE: max bytes per framed line"
    )
    mtu: int | None = Field(
        None, ge=64, le=65535,
        description="cap on one SMP packet before base64 (default: the device's buf_size)",
    )
    shell: bool = Field(
        False, description="SMP over the Zephyr shell UART (CONFIG_MCUMGR_TRANSPORT_SHELL): "
                           "uploads start at the shell MTU (256) within its 2 line buffers",
    )


class BleTransport(Model):
    """SMP over the MCUmgr GATT service (see docs/ble.md and gateway/smp/ble.py)."""

    kind: Literal["ble"] = "ble"
    address: str | None = Field(None, description="BD_ADDR, e.g. C4:12:34:56:78:9A")
    name: str | None = Field(None, description="advertised name (CONFIG_BT_DEVICE_NAME)")
    adapter: str = Field(
        "hci0", min_length=1,
        description="BlueZ adapter (bleak); with bumble a label: the per-adapter cap and the "
                    "serialised scans are keyed by it",
    )
    backend: Literal["bleak", "bumble"] = Field(
        "bleak", description="bleak: BlueZ over D-Bus; bumble: Google's Bumble stack on an HCI transport"
    )
    hci: str | None = Field(
        None, min_length=1,
        description="bumble HCI transport, e.g. usb:0, hci-socket:0, tcp-client:127.0.0.1:9000, "
                    "serial:/dev/ttyACM0,1000000 (link:NAME = in-process virtual link, for tests)",
    )
    scan_timeout_s: float = Field(
        10.0, gt=0, description="how long to wait for the device's advertisement (also after a reset)"
    )
    connect_timeout_s: float = Field(10.0, gt=0, description="LE connection and GATT discovery")
    mtu: int = Field(498, ge=23, le=517, description="ATT MTU to ask for (bumble; BlueZ negotiates itself)")
    reassembly: bool = Field(
        True, description="the device reassembles SMP packets split over several writes "
                          "(CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY); off: one packet <= MTU-3 per write",
    )

    @model_validator(mode="after")
    def _addr_or_name(self) -> BleTransport:
        if not self.address and not self.name:
            raise ValueError("give the device's address or its advertised name")
        if self.backend == "bumble" and not self.hci:
            raise ValueError("backend bumble needs 'hci': the HCI transport of the controller, "
                             "e.g. usb:0 or hci-socket:0")
        return self


TransportConfig = Annotated[
    UdpTransport | SerialTransport | BleTransport, Field(discriminator="kind")
]


class Timeouts(Model):
    request_s: float = Field(5.0, gt=0, description="one SMP request/response")
    upload_first_chunk_s: float = Field(
        30.0, gt=0, description="first upload chunk (the device may erase the slot first)"
    )
    reset_s: float = Field(
        60.0, gt=0, description="how long a device may take to come back after a reset (swap)"
    )
    app_confirm_s: float = Field(
        120.0, gt=0, description="policy 'app': how long the application has to confirm itself"
    )
    connect_s: float = Field(10.0, gt=0)
    upload_min_rate_bps: float = Field(
        256.0, gt=0, description="floor rate of an upload: one that takes longer than "
        "upload_first_chunk_s + 10 s + image size / this fails (a device that answers but "
        "makes no progress must not hold its lock forever)")
    attempt_s: float | None = Field(
        None, gt=0, description="bound on one whole update attempt (read, upload, reset, "
        "health check, confirm); default: the upload's bound + 3 x reset_s + app_confirm_s "
        "+ 300 s")


McubootModeName = Literal["swap-using-scratch", "swap-using-move", "swap-using-offset",
                          "overwrite-only", "direct-xip", "direct-xip-with-revert", "ram-load",
                          "single-app", "single-slot-ram-load", "firmware-loader"]


class ImageRule(Model):
    """How one MCUboot image of a multi-image device is installed (gateway/bootmodes/imageset.py)."""

    mark: Literal["test", "permanent"] | None = Field(
        None, description="test: test-boot then confirm by hash (needs the device's "
                          "CONFIG_MCUMGR_GRP_IMG_ALLOW_CONFIRM_NON_ACTIVE_IMAGE_ANY); permanent: "
                          "installed for good at the reset. Default: test for image 0, permanent "
                          "for the others (img_mgmt confirms only the running image)")
    netcore: bool = Field(False, description="an nRF5340 network core: no revert, never test-"
                                             "marked, its primary cannot be read back. Only this "
                                             "setting makes an image a network core (an "
                                             "artifact's cpunet board is only cross-checked); "
                                             "never image 0")
    slot_size: int | None = Field(None, gt=0, description="this image's secondary slot size")


class RecoveryConfig(Model):
    """Updating through MCUboot itself: serial recovery (single-slot devices; the last resort for
    a device whose application no longer answers) or a firmware-loader application."""

    enabled: bool = Field(False, description="allow the gateway to use it for this device")
    entry: Literal["boot_mode", "present"] = Field(
        "boot_mode", description="boot_mode: the application's os reset with boot_mode=1 "
        "(CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE) starts MCUboot's recovery / the loader; present: "
        "only when the device already answers from recovery (recovery pin held, no application)")
    last_resort: bool = Field(False, description="re-flash the last image this gateway confirmed "
                                                 "when the application no longer answers SMP but "
                                                 "MCUboot's serial recovery does")


class SmpHealthCheck(Model):
    """An SMP request the new image must answer (with ``expect_contains`` in its answer)."""

    group: int = Field(ge=0, le=0xFFFF, description="SMP group id (0 = os_mgmt)")
    command: int = Field(ge=0, le=0xFF, description="SMP command id (os info: group 0 command 7)")
    op: Literal["read", "write"] = "read"
    body: dict[str, Any] = Field(default_factory=dict, description="request body (CBOR map)")
    expect_contains: str | None = Field(
        None, description="text the answer (its values, as text) must contain; unset: any "
                          "success answer passes")


class HealthCheckHook(Model):
    """A user-defined health check that must pass before the gateway confirms (after
    ``health_check_s``): a command (exit 0 = healthy; SMPGW_DEVICE_ID, SMPGW_VERSION,
    SMPGW_TRANSPORT, SMPGW_ADDRESS, SMPGW_IMAGE_HASH in its environment) or an SMP request."""

    command: list[str] | None = Field(None, min_length=1, description="argv, no shell")
    smp: SmpHealthCheck | None = None
    timeout_s: float = Field(30.0, gt=0, le=3600, description="killed (= failed) after this")
    max_output_bytes: int = Field(4096, ge=0, le=1 << 20,
                                  description="output kept for the outcome; the rest is discarded")

    @model_validator(mode="after")
    def _one_kind(self) -> HealthCheckHook:
        if (self.command is None) == (self.smp is None):
            raise ValueError("health_check: give exactly one of command: [...] or smp: {...}")
        return self


class DeviceConfig(Model):
    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:@-]+$")
    transport: TransportConfig
    hardware: str = Field(min_length=1, description="hardware type the images must target")
    image: int = Field(0, ge=0, le=7, description="MCUboot image number (multi-image devices)")
    slot_size: int | None = Field(
        None, gt=0, description="secondary slot size in bytes; images larger are refused"
    )
    flash_write_align: Literal[1, 2, 4, 8, 16, 32] = Field(
        8, description="flash write block of the slots (imgtool sign --align): with "
                       "max_img_sectors it sizes MCUboot's trailer at the end of the slot")
    max_img_sectors: int = Field(
        128, ge=1, le=65536, description="CONFIG_BOOT_MAX_IMG_SECTORS of the device's MCUboot "
                                         "(imgtool --max-sectors): the swap status in the trailer")
    confirm: Literal["gateway", "app"] = "gateway"
    health_check_s: float = Field(
        3.0, ge=0, description="policy 'gateway': the new image must keep answering this long"
    )
    health_check: HealthCheckHook | None = Field(
        None, description="policy 'gateway': a hook (command or SMP request) that must pass "
                          "after health_check_s before the image is confirmed; failing = reverted")
    allow_downgrade: bool = False
    allow_unsigned: bool = False
    group: str | None = Field(None, description="devices that must change version together")
    timeouts: Timeouts = Timeouts()
    window: int | None = Field(
        None, ge=1, le=64, description="max upload chunks in flight (default: buf_count - 1)"
    )
    chunk_size: int | None = Field(None, ge=32, description="cap on data bytes per upload chunk")
    maintenance: list[str] | None = Field(
        None, description="names of the maintenance_windows in which this device may be reset "
                          "(default: all of them; [] = any time)")
    mcuboot_mode: McubootModeName | None = Field(
        None, description="the device's MCUboot mode when it does not report it (bootloader info "
                          "ENOTSUP, as the stock smp_svr); a reported mode that differs is refused")
    slot_offsets: list[int] | None = Field(
        None, min_length=2, max_length=2,
        description="direct-XIP: flash offsets of slot 0 and slot 1 (imgtool --rom-fixed values)")
    images: dict[int, ImageRule] = Field(
        default_factory=dict, description="multi-image devices: rules per MCUboot image number")
    recovery: RecoveryConfig | None = None

    @model_validator(mode="after")
    def _image0_is_no_network_core(self) -> DeviceConfig:
        rule = self.images.get(0)
        if rule is not None and rule.netcore:
            raise ValueError("images: {0: {netcore: true}}: image 0 is the application that "
                             "answers SMP and the one image whose test boot can be confirmed; a "
                             "network core (installed for good, no revert) is never image 0 "
                             "(nRF Connect SDK: image 1)")
        return self


# -- fleet operations: device templates, discovery, rollout, maintenance windows, control ----
_TEMPLATE_TRANSPORT_KEYS = {
    "serial": {"baud", "line_length", "mtu", "shell"},
    "udp": {"port", "mtu"},
    "ble": {"adapter", "backend", "hci", "scan_timeout_s", "connect_timeout_s", "mtu", "reassembly"},
}


class TemplateMatch(Model):
    """What a discovered device must look like for a template to apply (all given rules must hold).

    Globs are ``fnmatch`` patterns; ``usb_vid_pid`` entries are ``VVVV:PPPP`` in hex (``*`` for
    any product). USB attributes are read from udev/sysfs where the port has them.
    """

    transport: Literal["serial", "udp", "ble"] | None = None
    path: str | None = Field(None, description="glob on the serial port path (symlink or tty)")
    by_id: str | None = Field(None, description="glob on the /dev/serial/by-id name")
    usb_vid_pid: list[str] | None = Field(None, description='e.g. ["2fe3:0100", "1366:*"]')
    usb_serial: str | None = Field(None, description="glob on the USB serial number")
    host: str | None = Field(None, description="UDP: an address, a CIDR range or a glob")
    ble_name: str | None = Field(None, description="glob on the advertised name")
    board: str | None = Field(None, description="glob on the board the device reports (os info i)")
    node: str | None = Field(None, description="glob on the node name the device reports (os info n)")
    hwid: str | None = Field(None, description="glob on the hardware id the device reports")

    @field_validator("usb_vid_pid")
    @classmethod
    def _vid_pid(cls, v: list[str] | None) -> list[str] | None:
        for item in v or []:
            if not re.fullmatch(r"[0-9a-fA-F]{4}:([0-9a-fA-F]{4}|\*)", item):
                raise ValueError(f"{item!r} is not VVVV:PPPP (hex vendor and product id, or VVVV:*)")
        return [i.lower() for i in v] if v else v


class DeviceTemplate(Model):
    """Match rules -> the settings of every device they match (``device_templates:``).

    Any key of a ``devices:`` entry but ``id``/``transport`` may be given (``hardware`` defaults
    to the board the device reports); ``serial:``/``udp:``/``ble:`` hold transport options. They
    are checked at load time against the ``devices:`` schema.
    """

    model_config = {**Model.model_config, "extra": "allow"}

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:@-]+$")
    match: TemplateMatch = TemplateMatch()
    id: str | list[str] = Field(
        "{node}", description="device id rule(s): the first that the device's facts fill wins. "
        "Keys: node, board, hwid, usb_serial, usb_vid, usb_pid, by_id, port, host, udp_port, "
        "ble_address, ble_name, template")
    hardware: str | None = Field(None, min_length=1)
    group: str | None = Field(None, description="group name rule (same keys as id)")
    serial: dict[str, Any] = Field(default_factory=dict, description="baud, line_length, mtu")
    udp: dict[str, Any] = Field(default_factory=dict, description="port, mtu")
    ble: dict[str, Any] = Field(default_factory=dict, description="adapter, backend, hci, mtu...")

    @property
    def settings(self) -> dict[str, Any]:
        """The device settings the template sets (everything but match/id/name/transports)."""
        return dict(self.model_extra or {})

    @property
    def id_rules(self) -> list[str]:
        return [self.id] if isinstance(self.id, str) else list(self.id)


class SerialDiscovery(Model):
    paths: list[str] = Field(
        default_factory=lambda: ["/dev/serial/by-id/*", "/dev/ttyACM*", "/dev/ttyUSB*"],
        min_length=1, description="globs of serial ports to consider (symlinks are followed)")
    hotplug: Literal["auto", "udev", "poll"] = Field(
        "auto", description="udev (pyudev) events, polling, or udev where available")
    poll_s: float = Field(2.0, gt=0, description="polling period (also a safety net with udev)")


class UdpDiscovery(Model):
    hosts: list[str] = Field(default_factory=list,
                             description="addresses, host names or CIDR ranges to probe")
    port: int = Field(1337, ge=1, le=65535)
    mdns: bool = Field(False, description="also browse DNS-SD (mDNS) for mdns_service")
    mdns_service: str = Field("_mcumgr._udp.local.", description="DNS-SD service type")
    mdns_interfaces: list[str] = Field(default_factory=list,
                                       description="addresses of the interfaces to browse on (default: all)")
    probe_timeout_s: float = Field(1.0, gt=0)
    probe_rate: float = Field(500.0, gt=0, description="probe datagrams per second at most")
    max_hosts: int = Field(4096, ge=1, description="refuse CIDR ranges larger than this")

    @field_validator("hosts")
    @classmethod
    def _hosts(cls, v: list[str]) -> list[str]:
        for h in v:
            if "/" in h:
                try:
                    ipaddress.ip_network(h, strict=False)
                except ValueError as exc:
                    raise ValueError(f"{h!r} is not a CIDR range: {exc}") from None
        return v


class BleDiscovery(Model):
    adapter: str = Field("hci0", min_length=1)
    backend: Literal["bleak", "bumble"] = "bleak"
    hci: str | None = Field(None, description="bumble HCI transport (backend bumble)")
    service_uuid: bool = Field(True, description="match advertisements of the SMP service UUID")
    name: str | None = Field(None, description="glob on the advertised name (or-ed with the UUID)")
    scan_s: float = Field(5.0, gt=0, description="length of one scan")
    min_interval_s: float = Field(30.0, ge=0, description="at most one scan per adapter this often")

    @model_validator(mode="after")
    def _bumble(self) -> BleDiscovery:
        if self.backend == "bumble" and not self.hci:
            raise ValueError("backend bumble needs 'hci' (e.g. usb:0, hci-socket:0)")
        if not self.service_uuid and not self.name:
            raise ValueError("give service_uuid: true or a name pattern: what should a scan match?")
        return self


class IdentityConfig(Model):
    os_info: bool = Field(True, description="read os info (n: node name, i: board)")
    hwid_format: str | None = Field(
        None, min_length=1, max_length=4,
        description="os info format letter(s) a firmware hook answers with a hardware id "
                    "(CONFIG_MCUMGR_GRP_OS_INFO_CUSTOM_HOOKS)")


class DiscoveryConfig(Model):
    serial: SerialDiscovery | None = None
    udp: UdpDiscovery | None = None
    ble: list[BleDiscovery] = Field(default_factory=list)
    identity: IdentityConfig = IdentityConfig()
    interval_s: float = Field(60.0, gt=0, description="UDP/BLE rescan period")
    identify_timeout_s: float = Field(3.0, gt=0, description="per SMP request while identifying")
    concurrency: int = Field(64, ge=1, description="devices identified at once")
    forget_after_s: float = Field(24 * 3600.0, gt=0,
                                  description="a device not seen this long leaves the inventory")


class RolloutConfig(Model):
    """Staged rollout of one artifact over the gateway's devices (groups count as one unit)."""

    canary: int | str = Field(1, description="units updated first: a number or a percentage ('10%')")
    wait_s: float = Field(600.0, ge=0, description="canaries must stay healthy this long")
    max_failure_pct: float = Field(0.0, ge=0, le=100,
                                   description="stop the rollout when failures pass this share")

    @field_validator("canary")
    @classmethod
    def _canary(cls, v: int | str) -> int | str:
        if isinstance(v, int):
            if v < 1:
                raise ValueError("canary must be at least 1")
            return v
        text = v.strip()
        if not text.endswith("%"):
            raise ValueError(f"canary must be a number or a percentage like '10%' (got {v!r})")
        try:
            pct = float(text[:-1])
        except ValueError:
            raise ValueError(f"canary percentage {v!r} is not a number") from None
        if not 0 < pct <= 100:
            raise ValueError(f"canary percentage must be in (0, 100] (got {v!r})")
        return text


class MaintenanceWindowConfig(Model):
    cron: str = Field(description="when the window opens, cron syntax, e.g. '0 2 * * *'")
    duration_s: float = Field(gt=0, description="how long it stays open")
    timezone: str = Field("UTC", description="IANA time zone of the cron expression")

    @model_validator(mode="after")
    def _valid(self) -> MaintenanceWindowConfig:
        check_window(self.cron, self.timezone)
        return self


class ControlConfig(Model):
    enabled: bool = True
    socket: Path | None = Field(None, description="UNIX socket path (default <state_dir>/control.sock)")


class LocalSourceConfig(Model):
    kind: Literal["local"] = "local"
    path: Path = Field(description="directory holding signed images and manifest.yaml")
    poll_interval_s: float = Field(10.0, gt=0)



SourceConfig = Annotated[
    LocalSourceConfig
    | RdfmSourceConfig
    | HawkbitSourceConfig
    | MqttJobsSourceConfig
    | AwsOtaSourceConfig
    | LatestReleaseSourceConfig
    | Lwm2mSourceConfig
    | AzureIotHubSourceConfig,
    Field(discriminator="kind"),
]


class RetryConfig(Model):
    """Failed attempts are retried after ``min(max_s, base_s * 2**(n-1))`` +-50 % jitter."""

    max_attempts: int = Field(5, ge=1, description="attempts per artifact before parking the device")
    base_s: float = Field(5.0, gt=0)
    max_s: float = Field(300.0, gt=0)
    park_s: float = Field(
        3600.0, gt=0, description="after max_attempts failures: wait this long before a new series"
    )


class MetricsConfig(Model):
    """Prometheus text exposition on http://host:port/metrics."""

    host: str = "127.0.0.1"
    port: int = Field(9464, ge=0, le=65535, description="0 = any free port (logged)")


class GatewayConfig(Model):
    gateway_id: str = Field("smp-gateway", min_length=1)
    state_dir: Path
    trusted_keys: list[Path] = Field(min_length=1, description="PEM files of image signing keys")
    source: SourceConfig
    devices: list[DeviceConfig] = Field(default_factory=list)
    device_templates: list[DeviceTemplate] = Field(default_factory=list)
    discovery: DiscoveryConfig | None = None
    rollout: RolloutConfig | None = None
    maintenance_windows: dict[str, MaintenanceWindowConfig] = Field(default_factory=dict)
    control: ControlConfig = ControlConfig()
    max_concurrent: int = Field(32, ge=1, description="global cap on simultaneous device sessions")
    ble_per_adapter: int = Field(
        3, ge=1, description="cap on simultaneous sessions per BLE adapter (controller link limit)"
    )
    ble_adapters: dict[str, int] = Field(
        default_factory=dict, description="per-adapter caps overriding ble_per_adapter, e.g. hci1: 5"
    )
    retry: RetryConfig = RetryConfig()
    metrics: MetricsConfig | None = None
    stop_timeout_s: float = Field(
        20.0, gt=0, description="SIGTERM: exit within this (keep below systemd's TimeoutStopSec)"
    )
    log_format: Literal["text", "json"] = "text"
    config_path: Path | None = Field(None, exclude=True)

    @field_validator("devices")
    @classmethod
    def _unique_ids(cls, devices: list[DeviceConfig]) -> list[DeviceConfig]:
        seen: set[str] = set()
        for d in devices:
            if d.id in seen:
                raise ValueError(f"device id {d.id!r} appears twice")
            seen.add(d.id)
            if d.group is not None and d.confirm != "gateway":
                raise ValueError(f"device {d.id!r} is in group {d.group!r}: group members need "
                                 "confirm: gateway (an application that confirms itself would "
                                 "break the group's all-or-nothing switch)")
        return devices

    @model_validator(mode="after")
    def _fleet(self) -> GatewayConfig:
        if not self.devices and not self.device_templates:
            raise ValueError("give devices: (a static list) or device_templates: with discovery:")
        if self.device_templates and self.discovery is None:
            raise ValueError("device_templates need a discovery: section (serial/udp/ble) to find devices")
        names = [t.name for t in self.device_templates]
        if len(set(names)) != len(names):
            raise ValueError(f"device template names must be unique (got {names})")
        known = set(self.maintenance_windows)
        for d in self.devices:
            for w in d.maintenance or []:
                if w not in known:
                    raise ValueError(f"device {d.id!r}: maintenance window {w!r} is not defined in "
                                     f"maintenance_windows (known: {sorted(known) or 'none'})")
        return self

    @property
    def control_socket(self) -> Path:
        return self.control.socket or self.state_dir / "control.sock"

    def device(self, device_id: str) -> DeviceConfig:
        for d in self.devices:
            if d.id == device_id:
                return d
        raise KeyError(device_id)


_PATH_KEYS = {"state_dir", "path", "trusted_keys", "file", "ca_file", "cert_file", "key_file",
              "device_key_dir"}


def _resolve_paths(node: Any, base: Path, key: str = "") -> Any:
    if isinstance(node, dict):
        return {k: _resolve_paths(v, base, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_paths(v, base, key) for v in node]
    if key in _PATH_KEYS and isinstance(node, str) and node and not os.path.isabs(node):
        return str((base / os.path.expanduser(node)).resolve())
    return node


def _format_loc(loc: tuple[int | str, ...], data: Any) -> str:
    """Render a pydantic location as a YAML key path: devices[2].transport.port."""
    out = ""
    node = data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            continue
        if isinstance(node, dict) and part not in node and node.get("kind") == part:
            # discriminated-union tags (e.g. 'udp') are not keys of the document: skip them
            continue
        out += f".{part}" if out else str(part)
        node = node.get(part) if isinstance(node, dict) else None
    return out


def _known_keys() -> set[str]:
    """Every key the schema knows (all models reachable from GatewayConfig)."""
    seen: set[type] = set()
    keys: set[str] = set()

    def walk(tp: Any) -> None:
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if tp in seen:
                return
            seen.add(tp)
            for name, f in tp.model_fields.items():
                keys.add(name)
                walk(f.annotation)
        for arg in getattr(tp, "__args__", ()) or ():
            walk(arg)
        meta = getattr(tp, "__origin__", None)
        if meta is not None:
            walk(meta)

    walk(GatewayConfig)
    return keys


def _models_of(tp: Any) -> list[type[BaseModel]]:
    """The models an annotation can hold (through unions, lists, dicts, Annotated)."""
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    out: list[type[BaseModel]] = []
    for arg in getattr(tp, "__args__", ()) or ():
        out += _models_of(arg)
    origin = getattr(tp, "__origin__", None)
    if origin is not None and not getattr(tp, "__args__", None):
        out += _models_of(origin)
    return out


def _keys_at(loc: tuple[Any, ...]) -> set[str] | None:
    """The keys valid at the mapping ``loc`` names (None when the path cannot be followed):
    a misspelt key is compared with its siblings, not with every key of the schema."""
    models: list[type[BaseModel]] = [GatewayConfig]
    for part in loc:
        if isinstance(part, int):
            continue  # list index: the item's type is already in models
        nxt = [m2 for m in models if part in m.model_fields
               for m2 in _models_of(m.model_fields[part].annotation)]
        if not nxt:  # a discriminated union's tag (e.g. 'udp'): keep the member it names
            tagged = [m for m in models if "kind" in m.model_fields
                      and m.model_fields["kind"].default == part]
            if not tagged:
                return None
            nxt = tagged
        models = nxt
    return {k for m in models for k in m.model_fields} - {"config_path"}


def _describe(err: Any) -> str:
    typ = err["type"]
    if typ == "extra_forbidden":
        key = str(err["loc"][-1]) if err.get("loc") else ""
        siblings = _keys_at(tuple(err["loc"][:-1])) if err.get("loc") else None
        close = difflib.get_close_matches(key, sorted(siblings if siblings is not None
                                                      else _known_keys()), n=1, cutoff=0.7)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown key {key!r} ({hint}check the spelling; see configs/ for the schema)"
    if typ == "missing":
        return "required key is missing"
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    inp = err.get("input")
    if typ not in ("missing",) and not isinstance(inp, dict | list):
        return f"{msg} (got {inp!r})"
    return msg


def parse_config(data: Any, path: str | Path = "<config>") -> GatewayConfig:
    """Validate an already-loaded YAML document."""
    if not isinstance(data, dict):
        raise ConfigError(path, "", "the top level must be a mapping of keys to values")
    base = Path(path).parent if str(path) != "<config>" else Path.cwd()
    try:
        data = _resolve_paths(data, base)
    except ValueError as exc:  # e.g. a NUL byte in a path: os.path.realpath refuses it
        raise ConfigError(path, "", f"invalid path in the configuration: {exc}") from None
    try:
        cfg = GatewayConfig.model_validate({**data, "config_path": str(path)})
    except ValidationError as exc:
        errs = [(_format_loc(e["loc"], data), _describe(e)) for e in exc.errors()]
        raise ConfigError(path, errs[0][0], errs[0][1], more=errs[1:]) from None
    for i, k in enumerate(cfg.trusted_keys):
        if not k.is_file():
            raise ConfigError(path, f"trusted_keys[{i}]", f"no such key file: {k}")
    _check_bumble(cfg, path)
    if isinstance(cfg.source, AzureIotHubSourceConfig):
        _check_twin_keys(cfg, path)
    for i, t in enumerate(cfg.device_templates):
        _check_template(t, f"device_templates[{i}]", path, set(cfg.maintenance_windows))
    return cfg


def _check_twin_keys(cfg: GatewayConfig, path: str | Path) -> None:
    """Azure IoT Hub: every device id and group name has a twin section of its own (c) - two
    ids on one section would give one MCU the other's image and mix their reports/methods."""
    ids = [d.id for d in cfg.devices]
    _owners, refused = azure_key_owners(ids)
    for i, d in enumerate(cfg.devices):
        if d.id in refused:
            raise ConfigError(path, f"devices[{i}].id", f"azure_iot_hub: device id {refused[d.id]}")
    groups = [d.group for d in cfg.devices if d.group is not None]
    _owners, refused = azure_key_owners(groups)
    for i, d in enumerate(cfg.devices):
        if d.group in refused:
            raise ConfigError(path, f"devices[{i}].group", f"azure_iot_hub: group {refused[d.group]}")


def _check_bumble(cfg: GatewayConfig, path: str | Path) -> None:
    """``backend: bumble`` needs the optional Bumble stack (the ``[ble]`` extra): say so now,
    not when the first BLE session starts."""
    uses = [f"devices[{i}].transport.backend" for i, d in enumerate(cfg.devices)
            if isinstance(d.transport, BleTransport) and d.transport.backend == "bumble"]
    if cfg.discovery is not None:
        uses += [f"discovery.ble[{i}].backend" for i, b in enumerate(cfg.discovery.ble)
                 if b.backend == "bumble"]
    uses += [f"device_templates[{i}].ble.backend" for i, t in enumerate(cfg.device_templates)
             if (t.ble or {}).get("backend") == "bumble"]
    if not uses:
        return
    try:
        import bumble  # noqa: F401  (optional dependency: the [ble] extra)
    except ImportError:
        raise ConfigError(path, uses[0], "backend bumble needs the Bumble BLE stack, which is "
                          "not installed: pip install 'smp-gateway[ble]' (or use backend bleak)"
                          ) from None


def template_device_dict(t: DeviceTemplate, kind: str, transport: dict[str, Any],
                         device_id: str, hardware: str | None, group: str | None) -> dict[str, Any]:
    """The ``devices:`` entry a template makes for one discovered device (not yet validated)."""
    opts = {"serial": t.serial, "udp": t.udp, "ble": t.ble}[kind]
    d: dict[str, Any] = {"id": device_id, "transport": {**transport, **opts, "kind": kind},
                         "hardware": t.hardware or hardware}
    d.update(t.settings)
    if group is not None:
        d["group"] = group
    return d


def _check_template(t: DeviceTemplate, where: str, path: str | Path, windows: set[str]) -> None:
    """Validate a template's settings against the ``devices:`` schema, naming the template key."""
    for key in ("transport", "kind"):
        if key in t.settings:
            raise ConfigError(path, f"{where}.{key}", "a template sets transport options under "
                              "serial:, udp: or ble: (the address comes from discovery)")
    probes = {"serial": {"port": "/dev/null"}, "udp": {"host": "127.0.0.1"}, "ble": {"name": "probe"}}
    kinds = [t.match.transport] if t.match.transport else ["serial", "udp", "ble"]
    for kind, opts in (("serial", t.serial), ("udp", t.udp), ("ble", t.ble)):
        bad = sorted(set(opts) - _TEMPLATE_TRANSPORT_KEYS[kind])
        if bad:
            raise ConfigError(path, f"{where}.{kind}.{bad[0]}", "unknown transport option (known: "
                              + ", ".join(sorted(_TEMPLATE_TRANSPORT_KEYS[kind])) + ")")
        if opts and kind not in kinds:
            raise ConfigError(path, f"{where}.{kind}", f"options for {kind}, but the template "
                              f"matches only {t.match.transport} devices")
    for kind in kinds:
        dev = template_device_dict(t, kind, {"kind": kind, **probes[kind]}, "template-check",
                                   t.hardware or "probe", None)
        try:
            DeviceConfig.model_validate(dev)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = tuple(err["loc"])
            if loc and loc[0] == "transport":
                key = f"{where}.{kind}" + (f".{_format_loc(loc[2:], dev)}" if len(loc) > 2 else "")
            else:
                key = f"{where}.{_format_loc(loc, dev)}"
            raise ConfigError(path, key, _describe(err)) from None
    for w in t.settings.get("maintenance") or []:
        if w not in windows:
            raise ConfigError(path, f"{where}.maintenance", f"maintenance window {w!r} is not "
                              f"defined in maintenance_windows (known: {sorted(windows) or 'none'})")


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a YAML config file; raises ConfigError."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(p, "", f"cannot read config file: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(p, "", f"not valid YAML: {where}{getattr(exc, 'problem', exc)}") from None
    return parse_config(data, p)
