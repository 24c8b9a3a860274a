"""Configuration models of the fleet backends (the ``source:`` section of the YAML).

Kept apart from the backend modules so that ``gateway.config`` can put them in its
``SourceConfig`` union without importing aiohttp/aiomqtt/cryptography; each backend module
re-exports its model. Secrets use ``Secret`` (inline, ``{file: ..}`` or ``{env: ..}``) and are
never logged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from gateway.schema import Model, Secret


class HttpOptions(Model):
    """TLS and timeout options common to the HTTP backends (mixed into their configs)."""

    ca_file: Path | None = Field(None, description="PEM bundle of CAs to trust (default: system)")
    insecure: bool = Field(False, description="disable TLS certificate checks (logged as a warning)")
    request_timeout_s: float = Field(30.0, gt=0, description="one API request, connect to last byte")
    download_connect_timeout_s: float = Field(15.0, gt=0)
    download_read_timeout_s: float = Field(60.0, gt=0, description="max silence during a download")
    download_retries: int = Field(5, ge=0, le=50)

    @model_validator(mode="after")
    def _ca_needs_https(self) -> HttpOptions:
        url = getattr(self, "url", None)
        if self.ca_file is not None and isinstance(url, str) and url.lower().startswith("http://"):
            raise ValueError(f"ca_file is set but url {url} is plain http:// (no TLS, the CA "
                             "would never be used): use https:// or remove ca_file")
        return self


class RdfmSourceConfig(HttpOptions):
    kind: Literal["rdfm"] = "rdfm"
    url: str = Field(description="RDFM server base URL, e.g. https://rdfm.example.com")
    device_key_dir: Path | None = Field(
        None, description="where device RSA keys live (default <state_dir>/rdfm/keys)"
    )
    key_bits: int = Field(3072, ge=2048, le=8192, description="RSA size for new device keys")
    identity: Literal["device", "group"] = Field(
        "device", description="one RDFM device per MCU, or per device group (devices[].group)"
    )
    device_type: str | None = Field(
        None, description="rdfm.hardware.devtype to report (default: the device's hardware)"
    )
    poll_interval_s: float = Field(60.0, gt=0)
    token_margin_s: float = Field(30.0, ge=0, description="renew the token this long before expiry")
    report_logs: bool = Field(True, description="send outcomes as RDFM device logs (POST /api/v1/logs)")


class HawkbitSourceConfig(HttpOptions):
    kind: Literal["hawkbit"] = "hawkbit"
    url: str = Field(description="hawkBit DDI base URL, e.g. https://hawkbit.example.com")
    tenant: str = "DEFAULT"
    gateway_token: Secret = Field(description="the tenant's gateway security token")
    controller_id: str = Field(
        "{device}", description="controllerId template: {device}, {gateway}, {hardware}, {group}"
    )
    artifact_pattern: str | None = Field(
        None, description="fnmatch pattern picking the artifact (default: the first one)"
    )
    poll_interval_s: float = Field(60.0, gt=0, description="until the server says polling.sleep")
    min_poll_interval_s: float = Field(1.0, gt=0)
    progress_interval_s: float = Field(5.0, ge=0, description="min seconds between progress feedback")
    attributes: dict[str, str] = Field(
        default_factory=dict, description="extra controller attributes sent with configData"
    )
    download_hosts: list[str] = Field(
        default_factory=list,
        description="other origins (scheme://host[:port]) artifacts may be downloaded from, "
        "never with the gateway token; any other origin fails the action",
    )


class LatestReleaseSourceConfig(HttpOptions):
    kind: Literal["latest_release"] = "latest_release"
    url: str = Field(description="server base URL, e.g. https://device.memfault.com")
    project_key: Secret
    key_header: str = Field("Memfault-Project-Key", description="header carrying the project key")
    software_type: str = Field("main", description="software_type query parameter")
    device_serial: str = Field("{device}", description="device_serial template: {device}, {gateway}")
    poll_interval_s: float = Field(300.0, gt=0)
    max_retry_after_s: float = Field(24 * 3600.0, gt=0, description="cap on a server's Retry-After")


class MqttJobsSourceConfig(Model):
    kind: Literal["mqtt_jobs"] = "mqtt_jobs"
    host: str
    port: int = Field(8883, ge=1, le=65535)
    client_id: str | None = Field(None, description="MQTT client id (default: gateway_id)")
    username: str | None = None
    password: Secret | None = None
    tls: bool = Field(True, description="TLS to the broker (AWS IoT requires it)")
    ca_file: Path | None = Field(None, description="PEM CAs for the MQTT broker only (default: system)")
    download_ca_file: Path | None = Field(
        None, description="PEM CAs for firmware downloads (default: the system store; never ca_file)")
    cert_file: Path | None = Field(None, description="client certificate (AWS IoT X.509 auth)")
    key_file: Path | None = None
    insecure: bool = Field(False, description="skip broker/download certificate checks (warning)")
    thing: str = Field("{device}", description="thing name template: {device}, {gateway}, {group}")
    inventory_topic: str | None = Field(
        "smp-gateway/{gateway}/things/{thing}/shadow",
        description="retained per-device inventory in the AWS shadow layout ({thing}, {device}, "
                    "{gateway}); null: not published")
    keepalive_s: int = Field(60, ge=5)
    request_timeout_s: float = Field(10.0, gt=0, description="wait for /accepted or /rejected")
    progress_interval_s: float = Field(5.0, ge=0)
    poll_interval_s: float = Field(60.0, gt=0)
    download_retries: int = Field(5, ge=0, le=50)
    download_read_timeout_s: float = Field(60.0, gt=0)
    roster_wait_s: float = Field(
        600.0, ge=0, description="with discovery (the devices behind a thing are not all known "
        "in advance): how long an execution waits, before its final status, for a device its job "
        "names that this gateway has not seen yet")

    @model_validator(mode="after")
    def _pairs(self) -> MqttJobsSourceConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")
        return self



class AwsOtaRoute(Model):
    """Which MCU an AWS OTA file is for: the gateway's configuration (c), never the job's."""

    fileid: int = Field(ge=1, le=255, description="the job's fileid (0 is the connectivity "
                        "processor's own image: never routed)")
    thing: str | None = Field(None, description="fnmatch pattern of the thing name (default: any)")
    filepath: str | None = Field(None, description="fnmatch pattern the file's filepath must match")
    file_type: int | None = Field(None, description="the file's fileType must be this")
    device: str | None = Field(None, description="the device id it goes to")
    group: str | None = Field(None, description="or: every device of this group")

    @model_validator(mode="after")
    def _one_target(self) -> AwsOtaRoute:
        if (self.device is None) == (self.group is None):
            raise ValueError("give exactly one of device or group")
        return self


class AwsOtaSourceConfig(MqttJobsSourceConfig):
    """AWS IoT OTA (FreeRTOS ``afr_ota`` job documents) for the MCUs behind this gateway:
    files routed by fileid, MQTT streams or HTTP presigned URLs, code-signing check."""

    kind: Literal["aws_ota"] = "aws_ota"  # type: ignore[assignment]
    thing: str = Field("{gateway}", description="thing name template: {device}, {gateway}, {group}")
    routes: list[AwsOtaRoute] = Field(min_length=1, max_length=256)
    code_signing_cert_dir: Path | None = Field(
        None, description="certificate store: a job's certfile names a file in it")
    code_signing_certs: dict[str, Path] = Field(
        default_factory=dict, description="certfile name in the job -> certificate file")
    prefer_protocol: Literal["MQTT", "HTTP"] = Field("MQTT", description="when a job offers both")
    stream_format: Literal["cbor", "json"] = "cbor"
    block_size: int = Field(4096, ge=256, le=128 * 1024, description="MQTT stream block size")
    blocks_per_request: int = Field(32, ge=1, le=1024, description="blocks asked per GetStream")
    block_timeout_s: float = Field(5.0, gt=0, description="silence that ends a request round")
    stream_rounds_without_progress: int = Field(
        6, ge=1, le=100, description="GetStream rounds in a row with no new block before the "
        "download fails (the bitmap is kept: the next attempt resumes)")
    max_file_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    describe_stream: bool = Field(
        True, description="DescribeStream before a download: the stream must hold the file with "
        "the job's filesize (else REJECTED, nothing downloaded); its version pins the resume")
    stream_deadline_s: float = Field(
        3600.0, gt=0, description="one download attempt's time limit (the bitmap is kept)")
    stream_cache_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="disk held by stream downloads (partial and "
        "complete files of other downloads are removed, oldest first, past it)")
    stream_keep_s: float = Field(
        7 * 86400.0, gt=0, description="an unfinished download untouched this long is removed")


class Lwm2mSourceConfig(HttpOptions):
    """An LwM2M client endpoint per device (``gateway.sources.lwm2m``); the HTTP options are
    for Package URI downloads over http(s)."""

    kind: Literal["lwm2m"] = "lwm2m"
    server: str = Field(description="the LwM2M server, coap://host:5683 or coaps://host:5684")
    endpoint: str = Field(
        "{device_id}", description="endpoint name template: {device_id}, {gateway_id}, {group}")
    # coaps:// only: DTLS 1.2 with a pre-shared key (LwM2M Security mode 0), on aiocoap's
    # tinydtls transport (the ``lwm2m-dtls`` extra: DTLSSocket)
    psk_identity: str = Field("{endpoint}", max_length=128,
                              description="PSK identity template: {endpoint}, {device_id}, "
                                          "{gateway_id}")
    psk_key: Secret | None = Field(None, description="the PSK, hex (coaps:// only)")
    lifetime_s: int = Field(300, ge=5, le=30 * 86400,
                            description="registration lifetime; updates go at half of it")
    bind_host: str = Field("::", description="local address of the endpoints' UDP sockets")
    manufacturer: str = Field("smp-gateway", description="/3/0/0")
    model: str = Field("mcuboot-device", description="/3/0/1")
    max_package_bytes: int = Field(16 * 1024 * 1024, ge=1024,
                                   description="cap on a pushed or pulled package")
    poll_interval_s: float = Field(60.0, gt=0, description="device checks between server events")
    coap_pull_timeout_s: float = Field(1800.0, gt=0, le=86400,
                                       description="a coap:// Package URI download, whole")

    @model_validator(mode="after")
    def _server(self) -> Lwm2mSourceConfig:
        if self.server.startswith("coaps://"):
            if self.psk_key is None:
                raise ValueError("coaps:// needs psk_key (the DTLS pre-shared key, hex)")
            return self
        if not self.server.startswith("coap://"):
            raise ValueError("server must be coap://host[:port] or coaps://host[:port]")
        if self.psk_key is not None:
            # a key with plain CoAP would read as "secured" while nothing is
            raise ValueError("psk_key is for coaps:// only; the server is coap:// (plain CoAP)")
        return self


class AzureDpsConfig(Model):
    """Azure Device Provisioning Service: the gateway's IoT Hub and device id are assigned by
    DPS at start, with a symmetric key or an X.509 certificate."""

    provisioning_host: str = Field("global.azure-devices-provisioning.net")
    id_scope: str
    registration_id: str = Field("{gateway}", description="template: {gateway}")
    symmetric_key: Secret | None = Field(None, description="the enrollment's (derived) key")
    cert_file: Path | None = Field(None, description="X.509 attestation: certificate (PEM)")
    key_file: Path | None = Field(None, description="X.509 attestation: its private key")
    timeout_s: float = Field(30.0, gt=0, le=600, description="the whole registration, its "
                             "status polls (202 + retry-after) included")

    @model_validator(mode="after")
    def _one_attestation(self) -> AzureDpsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("give both cert_file and key_file, or neither")
        if (self.symmetric_key is None) == (self.cert_file is None):
            raise ValueError("give exactly one of symmetric_key or cert_file/key_file")
        return self


AZURE_MAX_KEY = 128  # characters of a twin section name the gateway uses
_AZURE_KEY = re.compile(r"[^A-Za-z0-9_-]")


def azure_twin_key(name: str) -> str:
    """The twin section name of a device id or group name: ``.``, ``:``, ``@`` (not allowed or
    awkward in twin property names) become ``_``; never cut. Not injective (``line.1`` and
    ``line_1`` are both ``line_1``): ``azure_key_owners`` decides which id a key names."""
    return _AZURE_KEY.sub("_", name)


def azure_key_owners(names: Iterable[str], taken: dict[str, str] | None = None,
                     ) -> tuple[dict[str, str], dict[str, str]]:
    """(twin key -> the ONE name it stands for, refused name -> why), the gateway's own
    configuration (c) deciding which MCU a hub section and method name: ``taken`` keeps its
    owners, then a name that is its own key owns it (``line_1`` is ``mcus.line_1``), then the
    first configured; any other name mapping to a taken key, or to a key longer than
    AZURE_MAX_KEY, is refused - never two MCUs on one section."""
    names = list(dict.fromkeys(names))
    owners: dict[str, str] = dict(taken or {})
    refused: dict[str, str] = {}
    for n in sorted(names, key=lambda n: azure_twin_key(n) != n):  # stable: own keys first
        key = azure_twin_key(n)
        if len(key) > AZURE_MAX_KEY:
            refused[n] = (f"{n[:40]!r}... is longer than {AZURE_MAX_KEY} characters: not usable "
                          "as a twin section name")
        elif owners.setdefault(key, n) != n:
            refused[n] = (f"{owners[key]!r} and {n!r} both map to twin section {key!r} "
                          "(., :, @ become _); rename one")
    return owners, refused


class AzureIotHubSourceConfig(HttpOptions):
    """Azure IoT Hub device twin (``gateway.sources.azure``): one device identity for the
    gateway, each MCU a section ``<section>.<device id>`` of its desired/reported properties;
    the HTTP options are for the blob downloads."""

    kind: Literal["azure_iot_hub"] = "azure_iot_hub"
    connection_string: Secret | None = Field(
        None, description="the gateway's device connection string (HostName=...;DeviceId=...;"
        "SharedAccessKey=...)")
    dps: AzureDpsConfig | None = Field(None, description="or: provisioned through DPS")
    server_verification_cert: Path | None = Field(
        None, description="PEM CA the hub's TLS certificate must chain to (default: system)")
    section: str = Field("mcus", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$",
                         description="twin property holding one object per MCU")
    group_section: str = Field("groups", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,31}$",
                               description="twin property holding one object per device group")
    poll_interval_s: float = Field(60.0, gt=0, description="device checks between twin events")
    progress_interval_s: float = Field(5.0, ge=0, description="min seconds between progress patches")
    reconnect_interval_s: int = Field(10, ge=1, le=3600, description="the SDK's retry interval")
    keepalive_s: int = Field(60, ge=5, le=1177)
    max_twin_bytes: int = Field(64 * 1024, ge=1024, le=1024 * 1024,
                                description="a larger twin or desired patch is refused")
    max_depth: int = Field(8, ge=3, le=32, description="nesting of the twin's desired properties")
    max_mcus: int = Field(256, ge=1, le=4096, description="MCU/group sections read from the twin")
    max_method_payload_bytes: int = Field(4096, ge=64, le=128 * 1024)
    max_patches_per_minute: int = Field(120, ge=1, le=6000,
                                        description="more desired patches: dropped, twin re-read")
    max_package_bytes: int = Field(16 * 1024 * 1024, ge=1024)

    @model_validator(mode="after")
    def _one_connection(self) -> AzureIotHubSourceConfig:
        if (self.connection_string is None) == (self.dps is None):
            raise ValueError("give exactly one of connection_string or dps")
        if self.section == self.group_section:
            raise ValueError("section and group_section must differ")
        return self
