"""The SMP server of a simulated Zephyr ``smp_svr``: OS group (0) and image group (1).

Request handling follows Zephyr ``subsys/mgmt/mcumgr/smp/src/smp.c``:

* a response carries the request's sequence, group and command, op + 1 and version
  ``min(request version, 1)``; a request of version > 1 gets MGMT_ERR_UNSUPPORTED_TOO_NEW;
* an unknown group/command, or a command without a handler for that op, gets
  ``{"rc": MGMT_ERR_ENOTSUP}``; errors returned by a handler are ``{"rc": N}`` whatever the
  version (``smp_build_err_rsp``);
* group errors (``smp_add_cmd_err``) are ``{"err": {"group": G, "rc": N}}`` for SMP v2
  and, for SMP v1 requests, translated to an MGMT ``rc`` by the group's
  ``mg_translate_error`` (``img_mgmt_translate_error_code`` in img_mgmt.c,
  ``os_mgmt_translate_error_code`` in os_mgmt.c);
* a body that does not decode as the handler expects gets MGMT_ERR_EINVAL
  (``zcbor_map_decode_bulk`` failure); unknown keys are ignored.

Response bodies are built with the ``smp`` package's response models (so they decode exactly
as smpclient expects), put in the key order Zephyr's handlers write them and encoded as zcbor
does (``gateway/sim/zcbor.py``: indefinite-length maps and arrays unless the device is
configured ``cbor: canonical``). Request bodies are decoded with cbor2 and checked field by
field, because Zephyr's decoder (not pydantic's) decides which requests are errors.

Key order of each answer (Zephyr 3.4.99 as built for the Renode firmware, checked byte for
byte against it by ``tests/test_differential_renode.py``):

* echo ``{"r"}``; reset ``{}``; MCUmgr parameters ``{"buf_size", "buf_count"}``
  (os_mgmt.c); bootloader info ``{"bootloader"}`` / ``{"mode"}``; OS info ``{"output"}``;
* image state (img_mgmt_state.c ``img_mgmt_state_read`` / ``img_mgmt_state_encode_slot``):
  ``{"images": [{"slot", "version", "hash", "bootable", "pending", "confirmed", "active",
  "permanent"}...], "splitStatus": 0}`` (``"image"`` first only in multi-image builds);
* upload (img_mgmt.c ``img_mgmt_upload_good_rsp``): ``{"off"}`` plus ``"match"`` on the last
  chunk when built with ``CONFIG_IMG_ENABLE_IMAGE_CHECK``; erase ``{}``;
* errors: ``{"rc": N}`` (smp.c ``smp_build_err_rsp``), ``{"err": {"group", "rc"}}``
  (``smp_add_cmd_err``).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cbor2
from smp import header as smphdr
from smp import image_management as smpimg
from smp import os_management as smpos
from smp.error import MGMT_ERR
from smp.image_management import IMG_MGMT_ERR
from smp.os_management import OS_MGMT_RET_RC

from gateway.mcuboot import IMAGE_MAGIC, Version
from gateway.sim import zcbor
from gateway.sim.boot import BootError, set_next
from gateway.sim.config import MCUBOOT_MODES_ZEPHYR_3_4
from gateway.sim.faults import PowerCut
from gateway.sim.image_format import IMAGE_F_NON_BOOTABLE, IMAGE_F_ROM_FIXED
from gateway.sim.img_state import ImgError, ImgMgmt

if TYPE_CHECKING:
    from gateway.sim.config import SimDeviceConfig
    from gateway.sim.flash import Flash

HDR = struct.Struct("!BBHHBB")
GROUP_OS = 0
GROUP_IMG = 1
OP_READ, OP_READ_RSP, OP_WRITE, OP_WRITE_RSP = 0, 1, 2, 3
IMAGE_HEADER_SIZE = 32  # sizeof(struct image_header)
IMG_MGMT_DATA_SHA_LEN = 32
ZEPHYR_KERNEL_VERSION = "3.7.0"


class MgmtError(Exception):
    """A handler's MGMT_ERR return value -> ``{"rc": N}``."""

    def __init__(self, rc: int) -> None:
        super().__init__(rc)
        self.rc = rc


class GroupError(Exception):
    """``smp_add_cmd_err(group, rc)``."""

    def __init__(self, group: int, rc: int) -> None:
        super().__init__(group, rc)
        self.group = group
        self.rc = rc


def _img_v1_rc(err: int) -> int:
    """``img_mgmt_translate_error_code`` (img_mgmt.c)."""
    e = IMG_MGMT_ERR
    if err in (e.NO_IMAGE, e.NO_TLVS):
        return MGMT_ERR.ENOENT
    if err in (e.NO_FREE_SLOT, e.CURRENT_VERSION_IS_NEWER, e.IMAGE_ALREADY_PENDING):
        return MGMT_ERR.EBADSTATE
    if err == e.NO_FREE_MEMORY:
        return MGMT_ERR.ENOMEM
    if err in (e.INVALID_SLOT, e.INVALID_PAGE_OFFSET, e.INVALID_OFFSET, e.INVALID_LENGTH,
               e.INVALID_IMAGE_HEADER, e.INVALID_HASH, e.INVALID_FLASH_ADDRESS):
        return MGMT_ERR.EINVAL
    return MGMT_ERR.EUNKNOWN


def _os_v1_rc(err: int) -> int:
    """``os_mgmt_translate_error_code`` (os_mgmt.c)."""
    if err == OS_MGMT_RET_RC.INVALID_FORMAT:
        return MGMT_ERR.EINVAL
    if err in (OS_MGMT_RET_RC.QUERY_YIELDS_NO_ANSWER, OS_MGMT_RET_RC.RTC_NOT_SET):
        return MGMT_ERR.ENOENT
    return MGMT_ERR.EUNKNOWN


def _body(model: Any) -> dict[str, Any]:
    """The CBOR map a smp response model encodes (header stripped)."""
    out = cbor2.loads(model.BYTES[smphdr.Header.SIZE:])
    assert isinstance(out, dict)
    return out


def _get(body: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    """zcbor_map_decode_bulk: absent -> None, wrong type -> EINVAL."""
    if key not in body:
        return None
    v: Any = body[key]
    if kind is int and isinstance(v, bool):
        raise MgmtError(MGMT_ERR.EINVAL)
    if not isinstance(v, kind):
        raise MgmtError(MGMT_ERR.EINVAL)
    if isinstance(v, int) and v < 0:  # zcbor_uint32/size decoders reject negatives
        raise MgmtError(MGMT_ERR.EINVAL)
    return v


@dataclass
class UploadState:
    """``g_img_mgmt_state``: RAM only, lost at reset."""

    area: int | None = None  # slot being written; None = area_id -1 (no upload)
    off: int = 0
    size: int = 0
    sha: bytes = b""
    buffered: int = 0  # bytes in stream_flash's write buffer, not yet programmed
    erased_to: int = 0  # progressive erase: the slot is erased up to here


@dataclass
class HandleResult:
    responses: list[bytes] = field(default_factory=list)
    reset: bool = False  # os reset was requested (after the response is sent)
    boot_mode: int | None = None  # os reset with "boot_mode" (retention boot mode for MCUboot)
    crash: bool = False  # the device died while handling (no response)
    power_cut: bool = False  # ...because the power went (fault model)
    flash_s: float = 0.0  # time the handler spent erasing/programming flash


class SmpServer:
    def __init__(
        self,
        cfg: SimDeviceConfig,
        flash: Flash,
        *,
        img: ImgMgmt | None = None,
        on_upload: Callable[[int, int], bool] | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.flash = flash
        self.img = img or ImgMgmt(cfg, flash, lambda: 0)
        # fault hook for the trailer writes of a state write (Faults.trailer_write)
        self.on_trailer_write: Callable[[int, str], None] | None = None
        self.upload = UploadState()
        self.on_upload = on_upload  # (old_off, new_off) -> True if the device crashes now
        self.on_event = on_event or (lambda kind, detail: None)

    def reset_ram(self) -> None:
        self.upload = UploadState()

    # --- packet level ---------------------------------------------------------------
    def handle(self, packet: bytes) -> HandleResult:
        """``smp_process_request_packet``: every request in the packet, in order."""
        res = HandleResult()
        buf = packet
        while buf:
            if len(buf) < HDR.size:
                break  # no valid header: nothing is sent
            ver_op, _flags, length, group, seq, cmd = HDR.unpack_from(buf)
            op = ver_op & 0x7
            version = (ver_op >> 3) & 0x3
            payload = buf[HDR.size:HDR.size + length]
            hdr = (op, version, group, seq, cmd)
            if len(buf) - HDR.size < length:
                res.responses.append(self._rc_rsp(hdr, MGMT_ERR.ECORRUPT))
                break
            buf = buf[HDR.size + length:]
            try:
                if op not in (OP_READ, OP_WRITE):
                    raise MgmtError(MGMT_ERR.ENOTSUP)
                if version > 1:
                    raise MgmtError(MGMT_ERR.UNSUPPORTED_TOO_NEW)
                try:
                    rsp = self._dispatch(op, group, cmd, payload, res)
                except PowerCut as cut:
                    res.crash = res.power_cut = True
                    self.on_event("power-cut", {"during": "request", "detail": str(cut)})
                    return res
                if res.crash:
                    return res
                packed = self._rsp(hdr, rsp)
                if len(packed) > self.cfg.buf_size:
                    # the handler's zcbor encoder ran out of netbuf: MGMT_ERR_EMSGSIZE
                    # (e.g. 4 image state entries need CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE 512)
                    raise MgmtError(MGMT_ERR.EMSGSIZE)
                res.responses.append(packed)
            except MgmtError as e:
                res.responses.append(self._rc_rsp(hdr, e.rc))
                break
            except GroupError as e:
                if version == 0:
                    tr = _img_v1_rc(e.rc) if e.group == GROUP_IMG else _os_v1_rc(e.rc)
                    res.responses.append(self._rc_rsp(hdr, tr))
                    break
                res.responses.append(
                    self._rsp(hdr, {"err": {"group": e.group, "rc": e.rc}})
                )
        return res

    def _pack(self, hdr: tuple[int, int, int, int, int], body: dict[str, Any]) -> bytes:
        op, version, group, seq, cmd = hdr
        data = zcbor.dumps(body, canonical=self.cfg.cbor == "canonical")
        rop = OP_READ_RSP if op == OP_READ else OP_WRITE_RSP
        return HDR.pack(rop | (min(version, 1) << 3), 0, len(data), group, seq, cmd) + data

    def _rsp(self, hdr: tuple[int, int, int, int, int], body: dict[str, Any]) -> bytes:
        return self._pack(hdr, body)

    def _rc_rsp(self, hdr: tuple[int, int, int, int, int], rc: int) -> bytes:
        return self._pack(hdr, {"rc": int(rc)})

    def _dispatch(
        self, op: int, group: int, cmd: int, payload: bytes, res: HandleResult
    ) -> dict[str, Any]:
        handlers: dict[tuple[int, int, int], Callable[[dict[str, Any], HandleResult], dict[str, Any]]]
        handlers = {
            (GROUP_OS, 0, OP_READ): self.os_echo,
            (GROUP_OS, 0, OP_WRITE): self.os_echo,
            (GROUP_OS, 5, OP_WRITE): self.os_reset,
            (GROUP_IMG, 0, OP_READ): self.img_state_read,
            (GROUP_IMG, 0, OP_WRITE): self.img_state_write,
            (GROUP_IMG, 1, OP_WRITE): self.img_upload,
            (GROUP_IMG, 5, OP_WRITE): self.img_erase,
        }
        if not self.cfg.img_mgmt_supported:  # CONFIG_MCUMGR_GRP_IMG=n
            handlers = {k: v for k, v in handlers.items() if k[0] != GROUP_IMG}
        if self.cfg.mcumgr_params_supported:
            handlers[(GROUP_OS, 6, OP_READ)] = self.os_params
        if self.cfg.os_info_supported:
            handlers[(GROUP_OS, 7, OP_READ)] = self.os_info
        if self.cfg.bootloader_info_supported:
            handlers[(GROUP_OS, 8, OP_READ)] = self.os_bootloader_info
        fn = handlers.get((group, cmd, op))
        if fn is None:
            raise MgmtError(MGMT_ERR.ENOTSUP)
        try:
            body = cbor2.loads(payload) if payload else {}
        except Exception as exc:
            raise MgmtError(MGMT_ERR.EINVAL) from exc
        if not isinstance(body, dict):
            raise MgmtError(MGMT_ERR.EINVAL)
        return fn(body, res)

    # --- OS group (os_mgmt.c) -------------------------------------------------------
    def os_echo(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        d = _get(body, "d", str) or ""
        return _body(smpos.EchoWriteResponse(r=d))

    def os_reset(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        # Answer now, reboot CONFIG_MCUMGR_GRP_OS_RESET_MS later (the device schedules it).
        _get(body, "force", bool)
        if self.cfg.os_reset_boot_mode:
            # CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE: bootmode_set() in the retention area that
            # MCUboot reads (BOOT_MODE_TYPE_BOOTLOADER = 1 enters serial recovery)
            mode = _get(body, "boot_mode", int)
            if mode is not None and mode > 0xFF:
                raise MgmtError(MGMT_ERR.EINVAL)
            res.boot_mode = mode
        res.reset = True
        return _body(smpos.ResetWriteResponse())

    def os_params(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        return _body(smpos.MCUMgrParametersReadResponse(
            buf_size=self.cfg.buf_size, buf_count=self.cfg.buf_count))

    def os_bootloader_info(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        query = _get(body, "query", str)
        if query is None:
            return _body(smpos.BootloaderInformationReadResponse(bootloader="MCUboot"))
        if query == "mode":
            c = self.cfg
            if c.bootloader_info_era == "zephyr-3.4":
                # os_mgmt.c of that era: the #if chain knows six modes (else -1) and tests
                # IS_ENABLED(MCUBOOT_BOOTLOADER_NO_DOWNGRADE), never true (no CONFIG_ prefix)
                known = c.mcuboot_mode in MCUBOOT_MODES_ZEPHYR_3_4
                return {"mode": c.mcuboot_mode_number if known else -1}
            out: dict[str, Any] = {"mode": c.mcuboot_mode_number}
            if c.no_downgrade:
                out["no-downgrade"] = True
            return out
        # os_mgmt_bootloader_info *returns* OS_MGMT_ERR_QUERY_YIELDS_NO_ANSWER as the
        # handler rc, so it goes out as {"rc": 3} (not as a group error).
        raise MgmtError(OS_MGMT_RET_RC.QUERY_YIELDS_NO_ANSWER)

    def os_info(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        fmt = _get(body, "format", str) or ""
        order = "snrvmpio"
        wanted: set[str] = set()
        valid = 0
        for ch in fmt:
            if ch == "a":
                wanted = set(order)
                valid += 1
            elif ch in order:
                wanted.add(ch)
                valid += 1
        if valid != len(fmt):
            raise GroupError(GROUP_OS, OS_MGMT_RET_RC.INVALID_FORMAT)
        if not wanted:
            wanted = {"s"}
        values = {
            "s": "Zephyr",
            "n": self.cfg.id,  # as with CONFIG_NET_HOSTNAME_ENABLE
            "r": "unknown",  # BUILD_VERSION not defined
            "v": ZEPHYR_KERNEL_VERSION,
            "m": "posix",  # CONFIG_ARCH
            "p": "sim",  # PROCESSOR_NAME
            "i": self.cfg.hardware,  # CONFIG_BOARD
            "o": "Zephyr",
        }
        out = " ".join(values[c] for c in order if c in wanted)
        return _body(smpos.OSApplicationInfoReadResponse(output=out))

    # --- image group: helpers (img_mgmt.c, img_mgmt_state.c via ImgMgmt) ----------------
    def read_info(self, slot: int) -> tuple[Version, bytes, int]:
        """``img_mgmt_read_info``: (version, hash TLV, flags) or GroupError code."""
        try:
            i = self.img.read_info(slot)
        except ImgError as e:
            raise GroupError(GROUP_IMG, e.rc) from e
        return i.version, i.hash, i.flags

    def _info_or_none(self, slot: int) -> tuple[Version, bytes, int] | None:
        try:
            return self.read_info(slot)
        except GroupError:
            return None

    def slot_in_use(self, slot: int) -> bool:
        return self.img.slot_in_use(slot)

    def state_images(self) -> list[smpimg.ImageState]:
        """``img_mgmt_state_read``: flags per slot; non-frugal list (all flags present)."""
        multi = self.img.images > 1
        return [smpimg.ImageState(
            image=st.image if multi else None, slot=st.slot % 2,
            version=st.info.version.smp_str(), hash=st.info.hash,
            bootable=not (st.info.flags & IMAGE_F_NON_BOOTABLE),
            pending=st.pending, confirmed=st.confirmed, active=st.active,
            permanent=st.permanent,
        ) for st in self.img.states()]

    def _state_body(self) -> dict[str, Any]:
        """``img_mgmt_state_read``: the slots in img_mgmt_state_encode_slot's key order."""
        images = []
        for st in self.state_images():
            entry: dict[str, Any] = {} if st.image is None else {"image": st.image}
            entry.update({
                "slot": st.slot, "version": st.version, "hash": st.hash,
                "bootable": st.bootable, "pending": st.pending, "confirmed": st.confirmed,
                "active": st.active, "permanent": st.permanent,
            })
            images.append(entry)
        return {"images": images, "splitStatus": 0}

    # --- image group: commands ------------------------------------------------------
    def img_state_read(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        return self._state_body()

    def img_state_write(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        h = _get(body, "hash", bytes)
        confirm = _get(body, "confirm", bool) or False
        if not h:
            if not confirm:
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_HASH)  # test without hash
            slot = self.img.active_slot(self.img.active_image())
        elif len(h) != self.img.hash_len:
            raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_HASH)
        else:
            found = self.img.find_by_hash(h)
            if found is None:
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.HASH_NOT_FOUND)
            slot = found
        self._set_next_boot_slot(slot, confirm)
        self.on_event("state-write", {"slot": slot, "confirm": confirm})
        return self._state_body()

    def _set_next_boot_slot(self, slot: int, confirm: bool) -> None:
        """``img_mgmt_set_next_boot_slot`` + ``img_mgmt_set_next_boot_slot_common``."""
        try:
            target, active = self.img.set_next_boot_slot(slot, confirm)
        except ImgError as e:
            raise GroupError(GROUP_IMG, e.rc) from e
        if target < 0:
            return  # nothing to write
        if not self.img.has_area(target):
            raise GroupError(GROUP_IMG, IMG_MGMT_ERR.FLASH_OPEN_FAILED)
        self.flash.on_trailer_write = self.on_trailer_write
        try:
            set_next(self.flash, target, active=active, confirm=confirm)
        except BootError as e:  # img_mgmt_set_next_boot_slot_common translation
            code = {
                "EBADVECT": IMG_MGMT_ERR.INVALID_IMAGE_VECTOR_TABLE,
                "EBADIMAGE": IMG_MGMT_ERR.INVALID_IMAGE_HEADER_MAGIC,
            }.get(e.code, IMG_MGMT_ERR.UNKNOWN)
            raise GroupError(GROUP_IMG, code) from e
        finally:
            self.flash.on_trailer_write = None

    def img_erase(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        slot = _get(body, "slot", int)
        slot = self.img.other_slot() if slot is None else slot  # img_mgmt_get_other_slot
        if self._info_or_none(slot) is not None and self.slot_in_use(slot):
            raise GroupError(GROUP_IMG, IMG_MGMT_ERR.NO_FREE_SLOT)
        if not self.img.has_area(slot):
            # no flash area for that slot: flash_area_open fails (seen on the Renode firmware)
            raise GroupError(GROUP_IMG, IMG_MGMT_ERR.FLASH_OPEN_FAILED)
        if self.flash.is_erased(slot):
            # zephyr_img_mgmt.c img_mgmt_erase_slot checks the area first: an already empty
            # slot is refused, seen on the Renode firmware as {"err": {"group": 1, "rc": 1}}
            raise GroupError(GROUP_IMG, IMG_MGMT_ERR.UNKNOWN)
        self.flash.erase(slot)
        # img_mgmt_erase -> img_mgmt_erase_image_data(0, whole area)
        res.flash_s += self._erase_s(self.flash.size(slot))
        self.reset_ram()
        self.on_event("erase", {"slot": slot})
        return _body(smpimg.ImageEraseResponse())

    def _erase_s(self, nbytes: int) -> float:
        sec = self.cfg.flash_sector_size
        return -(-nbytes // sec) * self.cfg.flash_erase_sector_s

    def _program_s(self, nbytes: int) -> float:
        return nbytes / self.cfg.flash_write_bps if self.cfg.flash_write_bps else 0.0

    def _write_time(self, st: UploadState, nbytes: int, last: bool) -> float:
        """stream_flash (CONFIG_IMG_BLOCK_BUF_SIZE buffer): program whole blocks, the rest at
        the end; with CONFIG_IMG_ERASE_PROGRESSIVELY each sector is erased when reached."""
        block = self.cfg.flash_write_block
        t = 0.0
        st.buffered += nbytes
        written = 0
        while st.buffered >= block:
            st.buffered -= block
            written += block
        if last and st.buffered:
            written += st.buffered
            st.buffered = 0
        t += self._program_s(written)
        if self.cfg.erase_progressively and written:
            end = st.off + nbytes - st.buffered
            sec = self.cfg.flash_sector_size
            need = -(-end // sec) * sec
            if need > st.erased_to:
                t += self._erase_s(need - st.erased_to)
                st.erased_to = need
        return t

    def _upload_slot(self, image: int) -> int | None:
        """``img_mgmt_get_unused_slot_area_id``."""
        return self.img.upload_slot(image)

    def img_upload(self, body: dict[str, Any], res: HandleResult) -> dict[str, Any]:
        """``img_mgmt_upload`` + ``img_mgmt_upload_inspect`` (zephyr_img_mgmt.c)."""
        image = _get(body, "image", int) or 0  # single-image builds ignore it
        data = _get(body, "data", bytes) or b""
        size = _get(body, "len", int)
        off = _get(body, "off", int)
        sha = _get(body, "sha", bytes) or b""
        upgrade = _get(body, "upgrade", bool) or False
        st = self.upload
        if off is None:
            raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_OFFSET)
        erase = False
        if off == 0:
            if len(data) < IMAGE_HEADER_SIZE:
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_IMAGE_HEADER)
            if size is None:
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_LENGTH)
            if int.from_bytes(data[:4], "little") != IMAGE_MAGIC:
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_IMAGE_HEADER_MAGIC)
            if len(sha) > IMG_MGMT_DATA_SHA_LEN:
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_HASH)
            if sha and st.area is not None and st.sha == sha:
                # Resume: same data sha as the upload in progress -> answer its offset.
                self.on_event("upload-resume", {"off": st.off})
                return _body(smpimg.ImageUploadWriteResponse(off=st.off))
            slot = self._upload_slot(image)
            if slot is None:
                self.on_event("upload-refused", {"rc": int(IMG_MGMT_ERR.NO_FREE_SLOT)})
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.NO_FREE_SLOT)
            if size > self.flash.size(slot):
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_IMAGE_TOO_LARGE)
            if self.cfg.reject_direct_xip_mismatched_slot:
                load_addr, flags = struct.unpack_from("<I", data, 4)[0], struct.unpack_from(
                    "<I", data, 16)[0]
                if flags & IMAGE_F_ROM_FIXED and load_addr != self.cfg.slot_offsets[slot]:
                    raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_FLASH_ADDRESS)
            if upgrade:
                cur = self._info_or_none(self.img.active_slot(self.img.active_image()))
                if cur is None:
                    raise GroupError(GROUP_IMG, IMG_MGMT_ERR.VERSION_GET_FAILED)
                new = Version(*struct.unpack_from("<BBHI", data, 20))
                # img_mgmt_vercmp without CONFIG_MCUMGR_GRP_IMG_VERSION_CMP_USE_BUILD_NUMBER
                if cur[0].key()[:3] >= new.key()[:3]:
                    raise GroupError(GROUP_IMG, IMG_MGMT_ERR.CURRENT_VERSION_IS_NEWER)
            erase = not self.flash.is_erased(slot)
        else:
            slot = st.area if st.area is not None else -1
            size = st.size
            if off != st.off:
                # Wrong offset: not an error, answer with the offset expected.
                return _body(smpimg.ImageUploadWriteResponse(off=st.off))
            if off + len(data) > size:
                raise GroupError(GROUP_IMG, IMG_MGMT_ERR.INVALID_IMAGE_DATA_OVERRUN)
        # proceed
        st.area = slot
        st.size = size
        last = False
        match = False
        done = False
        if off == 0:
            st.off = 0
            st.sha = bytes(sha)
            st.buffered = 0
            st.erased_to = 0
            if not self.cfg.erase_progressively:
                # img_mgmt_erase_image_data(0, len): the image area, then the sector that
                # holds the trailer ("Erased 0x20000 bytes of image slot" / "... trailer"
                # on the Renode device's console)
                sec = self.cfg.flash_sector_size
                area = -(-size // sec) * sec
                trailer_sector = (self.flash.size(slot) - 1) // sec * sec
                res.flash_s += self._erase_s(area) + (
                    self._erase_s(sec) if trailer_sector >= area else 0.0)
            self.on_event("upload-start", {"slot": slot, "len": size, "sha": sha.hex()})
            if (
                self.cfg.image_check
                and len(sha) == IMG_MGMT_DATA_SHA_LEN
                and hashlib.sha256(self.flash.read(slot, 0, size)).digest() == sha
            ):
                # flash_img_check: the slot already holds these bytes, nothing to upload.
                st.off = size
                last = match = done = True
                self.on_event("upload-done", {"slot": slot, "match": True, "skipped": True})
                rsp = self._upload_rsp(st.off, last, match)
                self.reset_ram()
                return rsp
            if erase:
                self.flash.erase(slot)  # img_mgmt_erase_image_data: image area + trailer
        if data:
            if st.off + len(data) == st.size:
                last = True
            old = st.off
            res.flash_s += self._write_time(st, len(data), last)
            self.flash.write(slot, off, data)
            st.off += len(data)
            if self.on_upload is not None and self.on_upload(old, st.off):
                res.crash = True
                return {}
            if st.off == st.size:
                done = True
                if len(st.sha) == IMG_MGMT_DATA_SHA_LEN:
                    match = hashlib.sha256(self.flash.read(slot, 0, st.size)).digest() == st.sha
                self.on_event("upload-done", {"slot": slot, "match": match})
        rsp = self._upload_rsp(st.off, last, match)
        if done:
            self.reset_ram()
        return rsp

    def _upload_rsp(self, off: int, last: bool, match: bool) -> dict[str, Any]:
        if last and self.cfg.image_check:
            return _body(smpimg.ImageUploadWriteResponse(off=off, match=match))
        return _body(smpimg.ImageUploadWriteResponse(off=off))
