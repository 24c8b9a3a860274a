"""MCUboot serial recovery: the SMP server inside the bootloader (``boot_serial.c``).

Owns what a device answers while MCUboot itself holds the UART (entered by the recovery pin, a
retention boot mode, a frame inside the wait-for-DFU window, or no bootable image: see
``SerialRecoveryConfig``). Behaviour from mcu-tools/mcuboot ``boot/boot_serial/src/
boot_serial.c`` (``boot_serial_input``, ``bs_list``, ``bs_upload``, ``bs_echo``, ``bs_reset``,
``bs_rc_rsp``), which is far smaller than Zephyr's SMP server:

* one request per frame; a frame whose op is not read/write, or whose header length is shorter
  than its payload, gets no answer; the answer copies the request header (version bits
  included) with op + 1, flags 0 - but every answer is an SMP version 1 body: errors are
  ``{"rc": N}`` (MGMT_ERR), never ``{"err": ...}``;
* image group: state read = ``bs_list``: per image, per slot (one slot in single-app
  builds), the slots holding an image that passes ``bootutil_img_validate``, as
  ``{"image" (multi-image only), "slot", "hash" (CONFIG_BOOT_SERIAL_IMG_GRP_HASH, the hash
  TLV), "version"}``; state write -> ENOTSUP (CONFIG_BOOT_SERIAL_IMG_GRP_IMAGE_STATE is not
  modelled); upload = ``bs_upload``: ``image`` (first chunk only; > image count -> ENOENT,
  = image count -> EINVAL) selects image N's *primary* slot, the first chunk (``off`` 0)
  erases the whole slot and sets the length (larger than the slot -> EINVAL), a chunk at
  another offset than expected is answered ``{"rc": 0, "off": expected}``, data past the
  length -> EINVAL, a chunk is written up to the flash write alignment except the last;
  answer ``{"rc": 0, "off": N}``. No ``sha`` resume, no ``match``: a new first chunk restarts;
* OS group: echo (CONFIG_BOOT_MGMT_ECHO) ``{"r"}``, console echo control -> rc 0,
  reset -> ``{"rc": 0}`` and a reboot 250 ms later, MCUmgr parameters (newer MCUboot,
  CONFIG_BOOT_SERIAL_MCUMGR_PARAMS) ``{"buf_size": receive size, "buf_count": 1}``;
* anything else -> ``{"rc": 8}`` (MGMT_ERR_ENOTSUP).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cbor2
from smp.error import MGMT_ERR

from gateway.sim import zcbor
from gateway.sim.boot import Validator
from gateway.sim.img_state import ImgError, ImgMgmt
from gateway.sim.smp_server import HDR, HandleResult

if TYPE_CHECKING:
    from gateway.sim.config import SimDeviceConfig
    from gateway.sim.flash import Flash


class RecoveryServer:
    """``boot_serial_input`` for one device; upload state survives until MCUboot restarts."""

    def __init__(self, cfg: SimDeviceConfig, flash: Flash, validator: Validator,
                 img: ImgMgmt, *, on_event: Callable[[str, dict[str, Any]], None]) -> None:
        self.cfg = cfg
        self.flash = flash
        self.validator = validator
        self.img = img
        self.on_event = on_event
        self.reset_ram()

    def reset_ram(self) -> None:
        self.img_size = 0
        self.curr_off = 0
        self.img_num = 0

    @property
    def max_receive(self) -> int:
        sr = self.cfg.serial_recovery
        return sr.max_receive_size if sr is not None else 1024

    def handle(self, packet: bytes) -> HandleResult:
        res = HandleResult()
        if len(packet) < HDR.size:
            return res
        ver_op, _flags, length, group, seq, cmd = HDR.unpack_from(packet)
        op = ver_op & 0x7
        payload = packet[HDR.size:]
        if op not in (0, 2) or length < len(payload):
            return res  # boot_serial_input ignores it
        try:
            body = cbor2.loads(payload) if payload else {}
        except Exception:
            body = None
        rsp = self._dispatch(op, group, cmd, body, res)
        data = zcbor.dumps(rsp, canonical=self.cfg.cbor == "canonical")
        res.responses.append(
            HDR.pack((ver_op & ~0x7) | (op + 1), 0, len(data), group, seq, cmd) + data)
        return res

    def _dispatch(self, op: int, group: int, cmd: int, body: Any,
                  res: HandleResult) -> dict[str, Any]:
        sr = self.cfg.serial_recovery
        if group == 1 and cmd == 0:
            return self.bs_list() if op == 0 else {"rc": int(MGMT_ERR.ENOTSUP)}
        if group == 1 and cmd == 1:
            return self.bs_upload(body, res)
        if group == 0 and cmd == 0 and sr is not None and sr.echo:
            if not isinstance(body, dict) or not isinstance(body.get("d", ""), str):
                return {"rc": int(MGMT_ERR.EINVAL)}
            return {"r": body.get("d", "")}
        if group == 0 and cmd == 1:
            return {"rc": 0}
        if group == 0 and cmd == 5:
            res.reset = True
            return {"rc": 0}
        if group == 0 and cmd == 6 and sr is not None and sr.mcumgr_params:
            return {"buf_size": self.max_receive, "buf_count": 1}
        return {"rc": int(MGMT_ERR.ENOTSUP)}

    def bs_list(self) -> dict[str, Any]:
        images = []
        slots = 1 if self.cfg.mcuboot_mode == "single-app" else 2
        for image in range(self.img.images):
            for k in range(slots):
                slot = 2 * image + k
                if not self.flash.has_slot(slot) or self.flash.header_magic(slot) != 0x96F3B83D:
                    continue
                if self.validator.problem(self.flash.read(slot)) is not None:
                    continue
                entry: dict[str, Any] = {"image": image} if self.img.images > 1 else {}
                entry["slot"] = k
                sr = self.cfg.serial_recovery
                if sr is None or sr.img_grp_hash:
                    try:
                        entry["hash"] = self.img.read_info(slot).hash
                    except ImgError:
                        pass
                info = self.flash.image_info(slot)
                entry["version"] = info.version.smp_str() if info else "0.0.0"
                images.append(entry)
        return {"images": images}

    def bs_upload(self, body: Any, res: HandleResult) -> dict[str, Any]:
        einval = {"rc": int(MGMT_ERR.EINVAL)}
        if not isinstance(body, dict):
            return einval
        data, off = body.get("data"), body.get("off")
        num, size = body.get("image"), body.get("len")
        for v, kind in ((data, bytes), (off, int), (num, int), (size, int)):
            if v is not None and (not isinstance(v, kind) or isinstance(v, bool)
                                  or (isinstance(v, int) and v < 0)):
                return einval
        if off is None or data is None:
            return einval
        if off == 0:
            self.img_num = num or 0
        if self.img_num > self.img.images:
            return {"rc": int(MGMT_ERR.ENOENT)}
        slot = 2 * self.img_num
        if not self.flash.has_slot(slot) or self.img_num >= self.img.images:
            return einval
        area = self.flash.size(slot)
        if off == 0:
            self.curr_off = 0
            if size is None or size > area:
                return einval
            self.flash.erase(slot)  # non-progressive: the whole slot at the first chunk
            res.flash_s += -(-area // self.cfg.flash_sector_size) * self.cfg.flash_erase_sector_s
            self.img_size = size
            self.on_event("recovery-upload-start", {"image": self.img_num, "len": size})
        elif off != self.curr_off:
            return {"rc": 0, "off": self.curr_off}
        elif self.curr_off + len(data) > self.img_size:
            return einval
        align = max(1, self.cfg.boot_write_align)
        n = len(data) - len(data) % align
        if self.curr_off + len(data) >= self.img_size:
            n = len(data)  # the last chunk: the remainder is padded to the alignment
        if n:
            self.flash.write(slot, self.curr_off, data[:n])
            if self.cfg.flash_write_bps:
                res.flash_s += n / self.cfg.flash_write_bps
        self.curr_off += n
        if self.curr_off == self.img_size:
            self.on_event("recovery-upload-done", {"image": self.img_num, "len": self.img_size})
        return {"rc": 0, "off": self.curr_off}

