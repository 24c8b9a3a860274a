"""Azure IoT Hub fleet source: device-twin-driven updates of the MCUs behind the gateway.

``source: {kind: azure_iot_hub, connection_string: {file: ...}}`` (or ``dps:``). Built on
Microsoft's own device SDK (``azure-iot-device``, asyncio API; an optional dependency:
``pip install 'smp-gateway[azure]'``). The gateway is one IoT Hub *device identity*; each MCU
is a named section of its twin:

* **desired** ``mcus.<device id>`` (the id's twin key, ONE MCU per key - ``key_owners``: ids
  sharing one are refused by the config and at the check, (c)) (or ``groups.<group>`` for
  every member of a configured group; the MCU's own section replaces it as a whole; a
  member whose section is refused or unusable keeps the WHOLE group from starting -
  ``check``/``fetch``; the members read one copy of the twin per round - ``_desired_for``):
  ``{url, version, size, sha256, hardware}``, as an IoT Hub
  automatic device configuration writes them. A desired version different from what the MCU
  runs is an offer. The whole twin is read at the first check and again after every
  reconnect, after a gap in the patches' ``$version`` and after patches were dropped for
  their rate (patches can be missed); a patch in between is merged into the cached copy.
* **reported** ``mcus.<device id>``: ``state``, ``progress`` (rate-limited), the LwM2M
  ``result`` code and name with the ``reason``, the offered ``version``, the inventory
  (``running_version``, ``slots``: what the device itself reported at its last session) and
  ``last_outcome``. A final outcome is kept in the gateway's journal until the hub answered the
  reported-properties patch (``report`` raises ``ReportNotDelivered`` otherwise).
* **direct methods** ``update_now``, ``cancel``, ``pause``, ``resume`` with payload
  ``{"mcu": "<device id>"}``: pause/resume/update_now take the very path of ``smp-gateway ctl``
  (``set_control``: the daemon's ``FleetOps.handle``, journalled and audited); a cancel is the
  hub calling off its update: ``canceled()`` / ``check()`` / ``fetch()`` report it and the
  gateway journals it as an intent before taking the update back
  (``FleetOps.server_cancel``), then ``acknowledge_cancel`` reports it in the twin. Answers:
  200, 400 (bad payload), 404 (unknown method or MCU), 409 (nothing to do), 413 (payload too
  large), 503 (not wired to a running gateway).

The trust rule: every desired field is fleet-server metadata. ``hardware`` and ``version``
are cross-checks against the gateway's configuration (c) and the device's report (b): an offer
for other hardware or for a version not above the running one is refused before anything is
downloaded, and reported (versions only ever increase). ``sha256``/``size`` check the
download; the image's own signature and header (a) - checked by the image store and the
engine - decide whether it is installed, and the image's header version must be the desired
version. Everything from the hub is bounded: twin and patch size and nesting, number of
sections, rate of patches, method payload size; every SDK call is bounded in time.

DPS (``dps:``): registered at ``start`` (``_provision``), bounded by ``dps.timeout_s``; a
refused enrollment is a ConfigError naming the key (the gateway exits 2), DPS slow or
unreachable is retried by the device checks. Module identity per MCU: not supported (README).

State (``<state_dir>/azure/state.json``): the hub's cancels not yet acknowledged and the desired
versions declined (refused or canceled) so they are neither offered nor reported again until
the desired version changes or ``update_now`` is called.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from gateway.download import Downloader, DownloadTimeouts
from gateway.mcuboot import read_version
from gateway.schema import ConfigError
from gateway.sources.azure.twin import (
    Desired,
    TwinRefused,
    bounded,
    key_owners,
    merge,
    parse_entry,
    sections,
    strip_meta,
    twin_key,
)
from gateway.sources.base import (
    DeviceView,
    FetchError,
    FleetSource,
    Offer,
    Report,
    ReportNotDelivered,
    ServerCanceled,
    UpdateResult,
    UpdateState,
)
from gateway.sources.settings import AzureIotHubSourceConfig

log = logging.getLogger("gateway.sources.azure")

METHODS = ("update_now", "cancel", "pause", "resume")
CTL_CMD = {"update_now": "update", "pause": "pause", "resume": "resume"}
ACTOR = "azure-iot-hub direct method"
_STATE_NAMES = {UpdateState.IDLE: "idle", UpdateState.DOWNLOADING: "downloading",
                UpdateState.DOWNLOADED: "downloaded", UpdateState.UPDATING: "updating"}

Control = Callable[[dict[str, Any], str], Awaitable[Any]]


def _sdk() -> Any:
    """The SDK, imported only when this source is used (an optional dependency)."""
    try:
        from azure.iot.device import aio  # optional dependency
    except ImportError as exc:
        raise FetchError("source kind azure_iot_hub needs the azure-iot-device package: "
                         "pip install 'smp-gateway[azure]'", UpdateResult.UNSUPPORTED_PROTOCOL,
                         permanent=True) from exc
    return aio


_HOST = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?")


async def _close_provisioning(prov: Any) -> None:
    """Disconnect and stop the provisioning client's pipeline (its MQTT connection, which would
    otherwise stay up and fight the next attempt for the client id, and its retry/poll timers)
    after a registration that ended or was cut short; the SDK does it only after an
    assignment (then both calls fail at once: not running)."""
    pipeline = getattr(prov, "_pipeline", None)
    loop = asyncio.get_running_loop()
    for step in ("disconnect", "shutdown"):
        call = getattr(pipeline, step, None)
        if call is None:
            return
        done: asyncio.Future[None] = loop.create_future()

        def settle(fut: asyncio.Future[None] = done) -> None:
            if not fut.done():
                fut.set_result(None)

        def finished(error: Any = None, _settle: Callable[[], None] = settle) -> None:
            loop.call_soon_threadsafe(_settle)  # in the SDK's thread

        try:
            call(callback=finished)
            await asyncio.wait_for(done, 5.0)
        except Exception:  # not running (already shut down), or it did not answer in time
            continue


# outcomes that the same desired section can never turn into a success: the image or the
# offer refused (hardware, downgrade, signature, header version, size, checksum, 404/410)
_REFUSALS = {UpdateResult.UNSUPPORTED_PACKAGE, UpdateResult.INTEGRITY_FAILURE,
             UpdateResult.NOT_ENOUGH_FLASH, UpdateResult.INVALID_URI,
             UpdateResult.UNSUPPORTED_PROTOCOL}


def _final_refusal(report: Report) -> bool:
    """A final outcome that declines the desired version: a refusal, or an image that was
    refused or rolled back by the device (blocked by the gateway too) - not a lost link."""
    return report.result in _REFUSALS or report.detail.startswith(("refused:", "rolled-back:"))


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class AzureIotHubSource(FleetSource):
    name = "azure_iot_hub"

    def __init__(self, cfg: AzureIotHubSourceConfig, state_dir: Path,
                 gateway_id: str = "smp-gateway",
                 devices: Iterable[tuple[str, str | None]] = (),
                 config_path: Path | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self._assigned: tuple[str, str] | None = None  # DPS: (hub host name, device id)
        self.state_dir = Path(state_dir)
        self.gateway_id = gateway_id
        self._groups: dict[str, str | None] = dict(devices)
        # twin key -> the one device id / group name it names, and the ids refused a section
        # (another id maps to it): exact, so one MCU never reads or writes another's section
        self._owners, self._key_refused = key_owners(self._groups)
        self._group_owners, self._group_refused = key_owners(
            g for g in self._groups.values() if g is not None)
        self._client: Any = None
        self._subscribed = False  # the client's receive handlers are on (subscribed)
        self._subscribing: asyncio.Future[None] | None = None  # the setters' thread, running
        self._connecting: asyncio.Future[None] | None = None  # client.connect(), running
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connect_lock = asyncio.Lock()
        self._twin_lock = asyncio.Lock()
        self._desired: dict[str, Any] = {}
        self._desired_version: int | None = None
        self._fresh = False  # the cached desired properties follow the hub's (no gap)
        self._dropped = False  # the connection dropped since the twin was last read
        self._seen_connected = False  # the first "connected" of this client came in
        self._patch_times: collections.deque[float] = collections.deque()
        self._current: dict[str, Offer] = {}  # device id -> its offer in flight
        # group -> (taken at, desired properties, members that read them): see _desired_for
        self._group_snap: dict[str, tuple[float, dict[str, Any], set[str]]] = {}
        self._cancel_ev: dict[str, asyncio.Event] = {}
        self._progress_at: dict[str, float] = {}
        self._sent_state: dict[str, str] = {}
        self._inventory_sent: dict[str, str] = {}
        self._waker: Callable[[str], None] | None = None
        self._control: Control | None = None
        self._tasks: set[asyncio.Future[Any]] = set()
        self._refreshing: asyncio.Future[Any] | None = None  # the background twin read
        self._refresh_again = False  # one more asked for while it runs
        self.stats = {"twin_reads": 0, "patches": 0, "patches_dropped": 0, "refused": 0,
                      "methods": 0, "reported": 0}
        self._state_path = self.state_dir / "azure" / "state.json"
        self._cancels: dict[str, dict[str, str]] = {}  # device id -> {version, reason}
        self._declined: dict[str, str] = {}  # device id -> desired version not to offer again
        self._asked_again: dict[str, int] = {}  # device id -> update_now calls (not persisted)
        self._load_state()
        self._downloader = Downloader(
            self.state_dir, ca_file=cfg.ca_file, insecure=cfg.insecure,
            timeouts=DownloadTimeouts(connect_s=cfg.download_connect_timeout_s,
                                      read_s=cfg.download_read_timeout_s),
            retries=cfg.download_retries)

    # -- hooks the gateway sets -------------------------------------------------------------
    def set_waker(self, wake: Callable[[str], None]) -> None:
        """``wake(device_id)``: the device's next check now (a new desired version, a cancel)."""
        self._waker = wake

    def set_control(self, control: Control) -> None:
        """``control(request, actor)``: the ``smp-gateway ctl`` handler (``FleetOps.handle``)."""
        self._control = control

    def _wake(self, device_id: str) -> None:
        if self._waker is not None:
            self._waker(device_id)

    # -- persisted state ----------------------------------------------------------------------
    def _load_state(self) -> None:
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            data = json.loads(self._state_path.read_text())
            self._cancels = {str(k): {"version": str(v["version"]), "reason": str(v["reason"])}
                             for k, v in dict(data.get("cancels") or {}).items()}
            self._declined = {str(k): str(v) for k, v in dict(data.get("declined") or {}).items()}

    def _save_state(self) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self._state_path.with_suffix(".tmp")
        data = json.dumps({"cancels": self._cancels, "declined": self._declined}).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:  # durable before it is answered: a hub's cancel is an intent (journalled)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self._state_path)
        dfd = os.open(self._state_path.parent, os.O_RDONLY)
        try:  # the rename itself
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # -- connection ---------------------------------------------------------------------------
    async def _create_client(self) -> Any:
        aio = _sdk()
        cfg = self.cfg
        kw: dict[str, Any] = {"keep_alive": cfg.keepalive_s, "connection_retry": True,
                              "connection_retry_interval": cfg.reconnect_interval_s}
        if cfg.server_verification_cert is not None:
            kw["server_verification_cert"] = cfg.server_verification_cert.read_text()
        if cfg.connection_string is not None:
            return aio.IoTHubDeviceClient.create_from_connection_string(
                cfg.connection_string.get(), **kw)
        dps = cfg.dps
        assert dps is not None
        from azure.iot.device import X509  # optional dependency

        if self._assigned is None:
            try:
                self._assigned = await self._provision()
            except ConfigError as exc:  # refused after a start that could not reach DPS
                raise FetchError(str(exc), UpdateResult.CONNECTION_LOST) from None
        hub, device_id = self._assigned
        if dps.symmetric_key is not None:
            return aio.IoTHubDeviceClient.create_from_symmetric_key(
                symmetric_key=dps.symmetric_key.get(), hostname=hub, device_id=device_id, **kw)
        return aio.IoTHubDeviceClient.create_from_x509_certificate(
            x509=X509(str(dps.cert_file), str(dps.key_file)), hostname=hub,
            device_id=device_id, **kw)

    async def _provision(self) -> tuple[str, str]:
        """DPS: (assigned hub, device id) for this gateway's enrollment.

        Bounded as a whole by ``dps.timeout_s`` (DPS answers 202 + ``retry-after`` while it
        assigns; the SDK would poll for ever). A refusal of the enrollment (401/403: the key or
        certificate, 404: the id scope or registration id, a ``failed`` registration) is a
        ConfigError naming the key - at start the gateway exits 2 with one line; DPS
        unreachable or slow is a FetchError (the source's backoff, retried). The assignment
        is DPS's answer (outside input): bounded to a host name and a device id before use;
        the hub's TLS certificate is still verified against the CA (``server_verification_cert``)."""
        aio = _sdk()
        from azure.iot.device import X509  # optional dependency

        cfg = self.cfg
        dps = cfg.dps
        assert dps is not None
        kw: dict[str, Any] = {}
        if cfg.server_verification_cert is not None:
            kw["server_verification_cert"] = cfg.server_verification_cert.read_text()
        reg_id = dps.registration_id.format(gateway=self.gateway_id)
        if dps.symmetric_key is not None:
            prov = aio.ProvisioningDeviceClient.create_from_symmetric_key(
                provisioning_host=dps.provisioning_host, registration_id=reg_id,
                id_scope=dps.id_scope, symmetric_key=dps.symmetric_key.get(), **kw)
        else:
            assert dps.cert_file is not None and dps.key_file is not None
            prov = aio.ProvisioningDeviceClient.create_from_x509_certificate(
                provisioning_host=dps.provisioning_host, registration_id=reg_id,
                id_scope=dps.id_scope, x509=X509(str(dps.cert_file), str(dps.key_file)), **kw)
        # not wait_for: a canceled register() makes the SDK's late callback fail on the
        # canceled future; the pipeline's shutdown ends the registration instead
        task = asyncio.ensure_future(prov.register())
        try:
            await asyncio.wait({task}, timeout=dps.timeout_s)
            if not task.done():
                raise TimeoutError
            result = task.result()
        except TimeoutError:
            raise FetchError(f"DPS registration at {dps.provisioning_host} did not finish within "
                             f"{dps.timeout_s:g} s (source.dps.timeout_s)",
                             UpdateResult.CONNECTION_LOST) from None
        except Exception as exc:  # the SDK's errors, the DPS status in the cause chain
            raise self._dps_error(exc, reg_id) from None
        finally:
            await _close_provisioning(prov)
            if not task.done():
                await asyncio.wait({task}, timeout=2.0)
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved (raised above, or dropped after a timeout)
        state = getattr(result, "registration_state", None)
        if getattr(result, "status", None) != "assigned" or state is None:
            raise self._refused("source.dps", f"DPS did not assign a hub to registration id "
                                f"{reg_id!r}: status {str(getattr(result, 'status', None))[:40]!r}")
        hub, device_id = state.assigned_hub, state.device_id
        if not (isinstance(hub, str) and _HOST.fullmatch(hub) and isinstance(device_id, str)
                and 0 < len(device_id) <= 128 and device_id.isprintable()):
            raise FetchError("DPS assigned an unusable hub host name or device id",
                             UpdateResult.CONNECTION_LOST)
        log.info("azure: DPS assigned hub %s device id %s (registration id %s)", hub,
                 device_id, reg_id)
        return hub, device_id

    def _refused(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.config_path or "<config>", key, message)

    def _dps_error(self, exc: BaseException, reg_id: str) -> Exception:
        dps = self.cfg.dps
        assert dps is not None
        chain, e = [], exc  # the SDK wraps the service's error (ClientError from ServiceError)
        for _ in range(5):
            chain.append(f"{type(e).__name__}: {e}")
            if e.__cause__ is None:
                break
            e = e.__cause__
        text = " <- ".join(chain)[:300]
        m = re.search(r"status code (?:of )?(\d{3})", text)
        status = int(m.group(1)) if m else None
        cred = "source.dps.symmetric_key" if dps.symmetric_key is not None else "source.dps.cert_file"
        if status in (401, 403) or "CredentialError" in text:
            return self._refused(cred, f"DPS {dps.provisioning_host} refused the enrollment's "
                                 f"credentials ({status or 'unauthorized'}) for registration id "
                                 f"{reg_id!r}")
        if status == 404:
            return self._refused("source.dps.registration_id", f"DPS {dps.provisioning_host} "
                                 f"knows no enrollment for registration id {reg_id!r} in id "
                                 f"scope {dps.id_scope!r} (404; see also source.dps.id_scope)")
        if "failed registration status" in text:
            return self._refused("source.dps", f"DPS could not assign a hub to registration "
                                 f"id {reg_id!r} (registration failed)")
        return FetchError(f"DPS registration at {dps.provisioning_host}: {text}",
                          UpdateResult.CONNECTION_LOST)

    async def _connected(self) -> Any:
        """The connected client, its receive handlers on (the SDK reconnects after a drop).

        One client for the source's life: made once, kept after a failed connect (a new one
        per attempt would leak its pipeline threads). Every step is bounded by
        ``request_timeout_s`` and every failure is the hub's outage - FetchError
        CONNECTION_LOST: the daemon backs the source off, it does not count it against the
        devices. The SDK's receive-handler setters block until the hub subscribed them (up
        to the SDK's 60 s operation timeout): never on the gateway's loop - ``_subscribe``."""
        async with self._connect_lock:
            if self._client is None:
                self._loop = asyncio.get_running_loop()
                try:
                    client = await self._create_client()
                except FetchError:
                    raise
                except Exception as exc:  # OSError, ValueError, the SDK's own errors
                    raise FetchError(f"IoT Hub client: {type(exc).__name__}: {exc}",
                                     UpdateResult.CONNECTION_LOST) from None
                client.on_connection_state_change = self._sdk_connection  # not blocking
                self._client = client
            client = self._client
            if not client.connected:
                await self._connect(client)
            if not self._subscribed:
                await self._subscribe(client)
            return client

    async def _connect(self, client: Any) -> None:
        """``client.connect()``, awaited for at most ``request_timeout_s``. Not canceled when
        slow (the SDK's late callback would fail on a canceled future; its own operation
        timeout ends it): the next attempt waits for the same connect - one at a time."""
        task = self._connecting
        if task is None:
            task = self._connecting = asyncio.ensure_future(client.connect())
        await asyncio.wait({task}, timeout=self.cfg.request_timeout_s)
        if not task.done():
            raise FetchError(f"IoT Hub did not answer the connect within "
                             f"{self.cfg.request_timeout_s:g} s (source.request_timeout_s)",
                             UpdateResult.CONNECTION_LOST)
        self._connecting = None
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # the SDK's own errors: hub unreachable for now
            raise FetchError(f"IoT Hub connect: {type(exc).__name__}: {exc}",
                             UpdateResult.CONNECTION_LOST) from None

    async def _subscribe(self, client: Any) -> None:
        """Desired-patch and method handlers on: the SDK's setters subscribe and wait for the
        hub (``fut.result()``, synchronous) - run in ONE thread of their own, awaited for at
        most ``request_timeout_s``. A thread still waiting is waited for again by the next
        attempt, never a second one started (at most one per client)."""
        loop = asyncio.get_running_loop()
        fut = self._subscribing
        if fut is None:
            fut = self._subscribing = loop.create_future()

            def settle(error: BaseException | None, f: asyncio.Future[None] = fut) -> None:
                if f.done():
                    return
                if error is None:
                    f.set_result(None)
                else:
                    f.set_exception(error)

            def run() -> None:  # the SDK's blocking setters, off the gateway's loop
                error: BaseException | None = None
                try:
                    client.on_twin_desired_properties_patch_received = self._sdk_patch
                    client.on_method_request_received = self._sdk_method
                except BaseException as exc:  # reported to the awaiting check
                    error = exc
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(settle, error)

            threading.Thread(target=run, name="azure-subscribe", daemon=True).start()
        await asyncio.wait({fut}, timeout=self.cfg.request_timeout_s)
        if not fut.done():
            raise FetchError(f"IoT Hub did not subscribe the twin patches and methods within "
                             f"{self.cfg.request_timeout_s:g} s (source.request_timeout_s)",
                             UpdateResult.CONNECTION_LOST)
        self._subscribing = None
        exc = fut.exception()
        if exc is not None:
            raise FetchError(f"IoT Hub subscribe: {type(exc).__name__}: {exc}",
                             UpdateResult.CONNECTION_LOST) from None
        self._subscribed = True

    # SDK handlers run in the SDK's threads: each only hands over to the gateway's loop
    def _hand_over(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(fn, *args)

    def _sdk_patch(self, patch: Any) -> None:
        self._hand_over(self._on_patch, patch)

    def _sdk_method(self, request: Any) -> None:
        self._hand_over(self._spawn_method, request)

    def _sdk_connection(self) -> None:
        # the state as the SDK saw it at the change: read on the loop later, a drop followed
        # by a quick reconnect would look like no change at all (a missed patch never re-read)
        client = self._client
        self._hand_over(self._on_connection, bool(client is not None and client.connected))

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _refresh_soon(self) -> None:
        """A whole-twin read in the background, coalesced: at most one in flight and one
        pending, however many gaps, drops and reconnects ask for one while the hub is slow."""
        if self._refreshing is not None and not self._refreshing.done():
            self._refresh_again = True
            return
        self._refresh_again = False
        self._refreshing = self._spawn(self._refresh_quietly())

    def _on_connection(self, connected: bool | None = None) -> None:
        client = self._client
        if client is None:
            return
        if not (client.connected if connected is None else connected):
            self._fresh, self._dropped = False, True  # patches may be missed from here on
            log.info("azure: disconnected from the hub; the twin is read again on reconnect")
            return
        first, self._seen_connected = not self._seen_connected, True
        if first and not self._dropped:
            return  # the first connection: the check that made it reads the twin
        # any later "connected" is read as a reconnect: its drop may not have been seen
        self._dropped = False
        log.info("azure: reconnected to the hub; reading the whole twin (patches can be missed)")
        self._fresh = False
        self._refresh_soon()

    async def _refresh_quietly(self) -> None:
        again = True
        while again:
            self._refresh_again = False
            try:
                await self._refresh()
            except Exception as exc:  # the next check tries again
                log.info("azure: twin read after reconnect failed: %s", exc)
            again = self._refresh_again  # asked for again while this one was in flight

    # -- the twin -------------------------------------------------------------------------
    async def _refresh(self) -> None:
        """Read the whole twin (GET) and take its desired properties, bounded."""
        async with self._twin_lock:
            client = await self._connected()
            try:
                twin = await asyncio.wait_for(client.get_twin(), self.cfg.request_timeout_s)
            except Exception as exc:
                raise FetchError(f"IoT Hub twin GET: {type(exc).__name__}: {exc}",
                                 UpdateResult.CONNECTION_LOST) from None
            self.stats["twin_reads"] += 1
            try:
                bounded(twin, self.cfg.max_twin_bytes, self.cfg.max_depth + 2, "the twin")
                desired = twin.get("desired") if isinstance(twin, dict) else None
                if not isinstance(desired, dict):
                    raise TwinRefused("the twin has no desired properties object")
                version = desired.get("$version")
                self._check_sections(desired)
            except TwinRefused as exc:
                self.stats["refused"] += 1
                log.warning("azure: twin refused: %s (desired properties unchanged)", exc)
                raise FetchError(f"IoT Hub twin refused: {exc}", UpdateResult.CONNECTION_LOST) from None
            self._take(strip_meta(desired), version if isinstance(version, int) else None)
            self._fresh = True

    def _check_sections(self, desired: dict[str, Any]) -> None:
        bounded(desired, self.cfg.max_twin_bytes, self.cfg.max_depth, "the desired properties")
        sections(desired, self.cfg.section, self.cfg.max_mcus)
        sections(desired, self.cfg.group_section, self.cfg.max_mcus)

    def _take(self, desired: dict[str, Any], version: int | None) -> None:
        before = {d: self._entry_raw(d) for d in self._groups}
        self._desired, self._desired_version = desired, version
        for d in self._groups:
            if self._entry_raw(d) != before[d]:
                self._wake(d)

    def _on_patch(self, patch: Any) -> None:
        """A desired-properties patch: bounded in rate, size and nesting; a gap in ``$version``
        or a dropped patch makes the next check read the whole twin."""
        now = time.monotonic()
        while self._patch_times and now - self._patch_times[0] > 60.0:
            self._patch_times.popleft()
        if len(self._patch_times) >= self.cfg.max_patches_per_minute:
            self.stats["patches_dropped"] += 1
            self._fresh = False
            return
        self._patch_times.append(now)
        self.stats["patches"] += 1
        try:
            if not isinstance(patch, dict):
                raise TwinRefused("a desired patch is not an object")
            bounded(patch, self.cfg.max_twin_bytes, self.cfg.max_depth, "a desired patch")
            version = patch.get("$version")
            merged = merge(self._desired, strip_meta(patch))
            self._check_sections(merged)
        except TwinRefused as exc:
            self.stats["refused"] += 1
            self._fresh = False
            log.warning("azure: desired patch refused: %s", exc)
            return
        if not (isinstance(version, int) and self._desired_version is not None
                and version == self._desired_version + 1):
            self._fresh = False  # a gap: read the whole twin (next check, or now)
        self._take(merged, version if isinstance(version, int) else None)
        if not self._fresh:
            self._refresh_soon()

    def _desired_for(self, device_id: str) -> dict[str, Any]:
        """The desired properties a check of ``device_id`` reads. The members of a group read
        ONE copy per round - taken at the first member's check, kept until every member read
        it (or ``request_timeout_s`` passed) - so a patch landing between two members' checks
        cannot offer the new version to one member only (which would then go alone)."""
        group = self._groups.get(device_id)
        if group is None:
            return self._desired
        now = time.monotonic()
        snap = self._group_snap.get(group)
        if snap is None or device_id in snap[2] or now - snap[0] > self.cfg.request_timeout_s:
            snap = (now, self._desired, set())  # ``_take`` replaces the dict, never mutates it
            self._group_snap[group] = snap
        snap[2].add(device_id)
        if snap[2] >= {d for d, g in self._groups.items() if g == group}:
            self._group_snap.pop(group, None)
        return snap[1]

    def _entry_raw(self, device_id: str, desired: dict[str, Any] | None = None) -> Any:
        """The device's own section, else its configured group's - the own section replaces
        the group's as a whole (no field-wise merge); a ``null`` deletes it (twin merge)."""
        desired = self._desired if desired is None else desired
        mcus = desired.get(self.cfg.section)
        raw = mcus.get(twin_key(device_id)) if isinstance(mcus, dict) else None
        if raw is None:
            group = self._groups.get(device_id)
            groups = desired.get(self.cfg.group_section)
            if group and isinstance(groups, dict):
                raw = groups.get(twin_key(group))
        return raw

    def _entry(self, device_id: str, desired: dict[str, Any] | None = None) -> Desired | None:
        """The desired section for the device (its own, else its configured group's)."""
        desired = self._desired if desired is None else desired
        raw = self._entry_raw(device_id, desired)
        if raw is None:
            return None
        group = self._groups.get(device_id)
        own = isinstance(desired.get(self.cfg.section), dict) and twin_key(
            device_id) in desired[self.cfg.section]
        origin = (f"{self.cfg.section}.{twin_key(device_id)}" if own
                  else f"{self.cfg.group_section}.{twin_key(group or '')}")
        return parse_entry(origin, raw, self.cfg.max_package_bytes)

    # -- reported properties --------------------------------------------------------------------
    async def _patch_reported(self, device_id: str, props: dict[str, Any]) -> None:
        """One reported-properties patch; returns only once the hub answered 2xx."""
        client = self._client
        if client is None or not client.connected:
            try:
                client = await self._connected()
            except FetchError as exc:
                raise ReportNotDelivered(str(exc)) from None
        refused = self._section_refused(device_id, None)
        if refused is not None:  # it would write into another MCU's section
            raise ReportNotDelivered(f"azure_iot_hub: {refused}")
        body = {self.cfg.section: {twin_key(device_id): {**props, "at": _now()}}}
        try:
            await asyncio.wait_for(client.patch_twin_reported_properties(body),
                                   self.cfg.request_timeout_s)
        except Exception as exc:  # timeout, the hub's 4xx/5xx (ServiceError), a lost link
            raise ReportNotDelivered(f"reported properties not taken: {type(exc).__name__}: "
                                     f"{exc}") from None
        self.stats["reported"] += 1

    # -- FleetSource -----------------------------------------------------------------------
    def poll_interval(self) -> float:
        return self.cfg.poll_interval_s

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        _sdk()  # a missing SDK is said at once, not at the first check
        if self.cfg.dps is not None and self._assigned is None:
            try:  # a refused enrollment is a ConfigError: the gateway does not start
                self._assigned = await self._provision()
            except FetchError as exc:  # DPS unreachable or slow: the first check tries again
                log.warning("azure: %s; retried at the device checks", exc)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        client, self._client = self._client, None
        self._subscribed, self._subscribing = False, None
        self._seen_connected = False
        connecting, self._connecting = self._connecting, None
        if client is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.shutdown(), 5.0)
        if connecting is not None:  # the shutdown failed it; else it is dropped here
            if not connecting.done():
                await asyncio.wait({connecting}, timeout=2.0)
            if not connecting.done():
                connecting.cancel()
            elif not connecting.cancelled():
                connecting.exception()  # retrieved
        await self._downloader.close()

    def _section_refused(self, device_id: str, group: str | None) -> str | None:
        """Why the device has no twin section of its own (another id or group maps to it), or
        None. Ids first seen at a check (discovery) get a section when theirs is free."""
        if device_id not in self._key_refused and self._owners.get(twin_key(device_id)) != device_id:
            self._owners, refused = key_owners([device_id], self._owners)
            self._key_refused.update(refused)
        if device_id in self._key_refused:
            return f"device id {self._key_refused[device_id]}"
        if group is None:
            return None
        if group not in self._group_refused and self._group_owners.get(twin_key(group)) != group:
            self._group_owners, refused = key_owners([group], self._group_owners)
            self._group_refused.update(refused)
        return f"group {self._group_refused[group]}" if group in self._group_refused else None

    async def check(self, device: DeviceView) -> Offer | None:
        self._groups.setdefault(device.id, device.group)
        refused = self._section_refused(device.id, device.group)
        if refused is not None:  # (c): never another MCU's section, image, reports or methods
            raise FetchError(f"azure_iot_hub: {refused}", UpdateResult.UPDATE_FAILED,
                             permanent=True)
        if not self._fresh:
            await self._refresh()
        await self._inventory(device)
        key = twin_key(device.id)
        unusable: TwinRefused | None = None
        try:
            want = self._entry(device.id, self._desired_for(device.id))
        except TwinRefused as exc:
            want, unusable = None, exc
        cancel = self._cancels.get(device.id)
        if cancel is not None and (want is None or str(want.version) != cancel["version"]):
            # the hub's cancel, not yet acknowledged, of a version the section no longer names
            # (removed, changed, unusable): still journalled and acknowledged (below: the same)
            raise ServerCanceled(cancel["reason"], Offer(
                device.id, self.name, f"azure-{key}-{cancel['version']}",
                report_to={"mcu": key, "version": cancel["version"]}),
                {"mcu": key, "version": cancel["version"]})
        if unusable is not None:
            await self._refuse(device.id, f"unusable desired section: {unusable}", None)
            if device.group is not None:  # its group does not start without it (retried)
                raise FetchError(f"unusable desired section: {unusable}",
                                 UpdateResult.UNSUPPORTED_PACKAGE) from None
            return None
        if want is None:
            return None
        vs = str(want.version)
        offer = Offer(device_id=device.id, source=self.name,
                      artifact_id=f"azure-{want.sha256[:32]}" if want.sha256 else
                      f"azure-{key}-{vs}".replace("+", "_"),
                      version=want.version, sha256=want.sha256, size=want.size,
                      hardware=want.hardware, handle={"desired": want},
                      report_to={"mcu": key, "version": vs})
        if cancel is not None:  # the hub's cancel, not yet acknowledged: the gateway journals it
            raise ServerCanceled(cancel["reason"], offer, {"mcu": key, "version": vs})
        if self._declined.get(device.id) == vs:
            return None  # refused or canceled before: not again until it changes
        if device.running_version is not None and want.version == device.running_version:
            return None  # the device itself reports it runs it (b)
        # cross-checks of the hub's metadata against (c) the configuration, (b) the device
        refusal = None
        if want.hardware is not None and want.hardware != device.hardware:
            refusal = (f"refused: the offer is for hardware {want.hardware!r}, the device is "
                       f"{device.hardware!r}")
        elif device.running_version is not None and want.version < device.running_version:
            refusal = (f"refused: {vs} is a downgrade from {device.running_version} (versions "
                       "only increase)")
        if refusal is not None and device.group is None:
            await self._refuse(device.id, refusal, vs)
            return None
        if refusal is not None:
            # a group member: the offer goes to the gateway and ``fetch`` refuses it before a
            # byte is downloaded, so the group runner starts NO member (all-or-nothing) and
            # reports every member's offer - a None here would let the others go alone
            log.warning("azure device=%s %s (group %s: no member starts)", device.id, refusal,
                        device.group)
            offer.handle["refuse"] = refusal
        self._current[device.id] = offer
        self._cancel_ev.setdefault(device.id, asyncio.Event())
        return offer

    async def _refuse(self, device_id: str, reason: str, version: str | None) -> None:
        """An offer refused on the cross-checks: reported once (kept until the hub took it)."""
        log.warning("azure device=%s %s", device_id, reason)
        res = UpdateResult.UNSUPPORTED_PACKAGE
        asked = self._asked_again.get(device_id, 0)
        try:
            await self._patch_reported(device_id, {
                "state": "idle", "result": int(res), "result_name": res.name,
                "reason": reason[:500], "version": version})
        except ReportNotDelivered as exc:
            log.info("azure device=%s refusal not reported yet: %s", device_id, exc)
            return
        if version is not None and self._asked_again.get(device_id, 0) == asked:
            # (an update_now that came while the hub took the report asks again: not declined)
            self._declined[device_id] = version
            self._save_state()

    async def _inventory(self, device: DeviceView) -> None:
        """Running version and slots as the device itself reported them (b): sent on change."""
        inv = device.inventory or {}
        data = {"running_version": str(device.running_version) if device.running_version else None,
                "hardware": device.hardware, "slots": inv.get("slots")}
        text = json.dumps(data, sort_keys=True, default=str)
        if self._inventory_sent.get(device.id) == text:
            return
        with contextlib.suppress(ReportNotDelivered):
            await self._patch_reported(device.id, json.loads(text))
            self._inventory_sent[device.id] = text

    async def fetch(self, offer: Offer, max_size: int | None) -> Path:
        want: Desired = (offer.handle or {})["desired"]
        refusal = (offer.handle or {}).get("refuse")
        if refusal:  # a group member's offer refused on the cross-checks in ``check``
            raise FetchError(str(refusal), UpdateResult.UNSUPPORTED_PACKAGE, permanent=True)
        cap = min(x for x in (max_size, self.cfg.max_package_bytes) if x)
        if want.size is not None and want.size > cap:
            raise FetchError(f"the file is {want.size} bytes, more than the {cap} the device's "
                             "slot holds", UpdateResult.NOT_ENOUGH_FLASH, permanent=True)
        ev = self._cancel_ev.setdefault(offer.device_id, asyncio.Event())
        task = asyncio.ensure_future(self._downloader.fetch(
            want.url, sha256=want.sha256, max_size=cap, size=want.size))
        waiter = asyncio.ensure_future(ev.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if not task.done():  # the hub canceled while it downloaded (the .part is kept)
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        cancel = self._cancels.get(offer.device_id)
        if cancel is not None and cancel["version"] == offer.report_to.get("version"):
            raise ServerCanceled(cancel["reason"], offer, dict(offer.report_to))
        path = task.result()
        try:
            with path.open("rb") as fh:
                got = read_version(fh.read(32))
        except (OSError, ValueError) as exc:
            raise FetchError(f"not an MCUboot image: {exc}", UpdateResult.UNSUPPORTED_PACKAGE,
                             permanent=True) from None
        if offer.version is not None and got != offer.version:
            # (a) the header the signature covers says another version than the hub's metadata
            raise FetchError(f"the image is version {got}, the desired version is "
                             f"{offer.version}", UpdateResult.UNSUPPORTED_PACKAGE, permanent=True)
        return path

    async def report(self, offer: Offer, report: Report) -> None:
        dev = offer.device_id
        state = _STATE_NAMES.get(report.state, "idle")
        if not report.finished:
            now = time.monotonic()
            if (self._sent_state.get(dev) == state
                    and now - self._progress_at.get(dev, -1e9) < self.cfg.progress_interval_s):
                return  # rate-limited progress
            props: dict[str, Any] = {"state": state, "version": offer.report_to.get("version"),
                                     "result": 0, "result_name": "INITIAL", "reason": ""}
            if report.progress is not None:
                props["progress"] = round(100 * report.progress)
            await self._patch_reported(dev, props)
            self._progress_at[dev], self._sent_state[dev] = now, state
            return
        asked = self._asked_again.get(dev, 0)
        outcome = {"version": offer.report_to.get("version"), "result": int(report.result),
                   "result_name": report.result.name, "reason": report.detail[:500],
                   "report_id": report.report_id, "at": _now()}
        await self._patch_reported(dev, {"state": "idle", "progress": None,
                                         **{k: outcome[k] for k in ("version", "result",
                                                                    "result_name", "reason")},
                                         "last_outcome": outcome})
        self._sent_state.pop(dev, None)
        cur = self._current.get(dev)
        if cur is not None and cur.report_to == offer.report_to:
            self._current.pop(dev, None)
        if (_final_refusal(report) and offer.report_to.get("version")
                and self._asked_again.get(dev, 0) == asked):
            # a refused offer is not taken again and again: a new desired version or update_now.
            # A transient failure (blob storage or the device's link lost) is not: the gateway's
            # retry policy (retry.*: backoff, park after max_attempts) takes it again
            self._declined[dev] = str(offer.report_to["version"])
            self._save_state()

    async def canceled(self, offer: Offer) -> str | None:
        dev = offer.device_id
        cancel = self._cancels.get(dev)
        if cancel is not None and cancel["version"] == offer.report_to.get("version"):
            return cancel["reason"]
        if self._fresh:
            try:
                want = self._entry(dev)
            except TwinRefused:
                return None
            if want is None:
                return "the hub's desired properties no longer name an update for this MCU"
            if str(want.version) != offer.report_to.get("version"):
                return f"the hub's desired version changed to {want.version}"
        return None

    async def acknowledge_cancel(self, offer: Offer, done: bool, detail: str) -> None:
        dev = offer.device_id
        vs = str(offer.report_to.get("version") or "")
        await self._patch_reported(dev, {
            "state": "idle", "progress": None, "version": vs or None, "result": 0,
            "result_name": "INITIAL", "canceled": True,
            "reason": (f"canceled: {detail}" if done else f"cancel came too late: {detail}")[:500]})
        if self._cancels.get(dev, {}).get("version") == vs:
            self._cancels.pop(dev, None)
        if vs:
            self._declined[dev] = vs
        self._save_state()
        self._current.pop(dev, None)
        ev = self._cancel_ev.get(dev)
        if ev is not None:
            ev.clear()

    # -- direct methods -------------------------------------------------------------------------
    def _spawn_method(self, request: Any) -> None:
        self._spawn(self._method(request))

    async def _method(self, request: Any) -> None:
        self.stats["methods"] += 1
        try:
            status, payload = await asyncio.wait_for(
                self._answer(str(getattr(request, "name", ""))[:64], request.payload),
                self.cfg.request_timeout_s)
        except TimeoutError:
            status, payload = 504, {"error": "the gateway did not finish in time"}
        except Exception as exc:
            status, payload = 500, {"error": f"{type(exc).__name__}: {exc}"[:300]}
        from azure.iot.device import MethodResponse  # optional dependency

        resp = MethodResponse.create_from_method_request(request, status, payload)
        client = self._client
        if client is None:
            return
        try:
            await asyncio.wait_for(client.send_method_response(resp), self.cfg.request_timeout_s)
        except Exception as exc:  # the hub times the method out on its side
            log.info("azure: method response not sent: %s", exc)

    async def _answer(self, name: str, payload: Any) -> tuple[int, dict[str, Any]]:
        """A direct method's status and payload. Bounded: method names, payload size/depth."""
        if name not in METHODS:
            return 404, {"error": f"unknown method {name!r} (one of {', '.join(METHODS)})"}
        try:
            bounded(payload, self.cfg.max_method_payload_bytes, 3, "the method payload")
        except TwinRefused as exc:
            return 413, {"error": str(exc)}
        mcu = payload.get("mcu") if isinstance(payload, dict) else None
        if not isinstance(mcu, str) or not mcu:
            return 400, {"error": 'payload must be {"mcu": "<device id>"}'}
        # exact: the MCU whose twin section is ``mcu`` (or whose id it is), never a lookalike
        dev = self._owners.get(mcu)
        if dev is None and self._owners.get(twin_key(mcu)) == mcu:
            dev = mcu
        if dev is None:
            return 404, {"error": f"no MCU {mcu[:64]!r} behind this gateway"}
        log.info("azure: direct method %s for %s", name, dev)
        if name == "cancel":
            return await self._method_cancel(dev)
        if self._control is None:
            return 503, {"error": "not attached to a running gateway"}
        if name == "update_now":
            self._asked_again[dev] = self._asked_again.get(dev, 0) + 1
        if name == "update_now" and self._declined.pop(dev, None) is not None:
            self._save_state()  # the hub asks again for what was declined
        req: dict[str, Any] = {"cmd": CTL_CMD[name], "device": dev}
        if name == "pause":
            reason = payload.get("reason") if isinstance(payload, dict) else None
            req["reason"] = str(reason)[:200] if reason else "paused by IoT Hub"
        try:
            result = await self._control(req, ACTOR)
        except Exception as exc:  # ControlError: refused (e.g. paused by pause --all)
            return 409, {"error": str(exc)[:300]}
        return 200, {"result": str(result)[:300]}

    async def _method_cancel(self, dev: str) -> tuple[int, dict[str, Any]]:
        """The hub calls off the MCU's update: recorded (persisted) before it is answered; the
        gateway journals it as an intent at the next cancel probe / check / fetch."""
        cur = self._current.get(dev)
        if cur is None:
            if self._control is not None:  # an update the journal holds open (after a restart)
                try:
                    result = await self._control({"cmd": "cancel", "device": dev}, ACTOR)
                except Exception as exc:
                    return 409, {"error": str(exc)[:300]}
                return 200, {"result": str(result)[:300]}
            return 409, {"error": f"{dev} is not installing anything now"}
        vs = str(cur.report_to.get("version"))
        self._cancels[dev] = {"version": vs, "reason": "canceled by IoT Hub direct method"}
        self._save_state()
        self._cancel_ev.setdefault(dev, asyncio.Event()).set()
        self._wake(dev)
        return 200, {"result": f"{dev}: cancel of {vs} requested; the update is being taken back"}
