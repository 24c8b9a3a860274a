"""MCUboot as the simulator models it: every upgrade strategy, one to N images, validation.

Owns what happens between a reset and the application's first instruction: which slot runs,
what is swapped, copied, erased or refused, and the trailer bytes MCUboot writes. Sources
(mcu-tools/mcuboot; the Renode firmware pins 11ecbf6 of 2023-08-25; ``loader.c`` read at the
2023 revision with ``slot_usage[]`` passed around and at a 2024 one where it lives in the
state - the rules below are the same in both):

Swap modes and overwrite-only (``loader.c`` ``context_boot_go``, non-XIP branch):

* per image, ``boot_prepare_image_for_update``: an interrupted swap is finished first
  (``boot_status_source`` / ``boot_complete_partial_swap``: primary magic good, copy_done
  unset, status entries written; ``Flash.swap_progress``), else the swap type comes from
  ``boot_swap_type_multi`` (``bootutil_public.c`` ``boot_swap_tables``: secondary magic good +
  image_ok unset -> TEST, + image_ok set -> PERM; primary magic good + image_ok unset +
  copy_done set with an erased secondary magic -> REVERT) and, for any upgrade,
  ``boot_validated_swap_type`` -> ``boot_validate_slot(secondary)``: an erased header (or
  IMAGE_F_NON_BOOTABLE) means nothing to do - in swap modes the secondary's trailer sectors
  are erased (``swap_erase_trailer_sectors``) -; an invalid image (header, hash, signature,
  decryption) is erased whole; with MCUBOOT_OVERWRITE_ONLY + MCUBOOT_DOWNGRADE_PREVENTION a
  secondary older than the primary is erased ("insufficient version in secondary slot").
* multi-image: ``boot_verify_dependencies`` when any image upgrades: each image's dependency
  TLVs (in the secondary if it upgrades, else the primary) against the version the other
  image will have (its secondary if that one upgrades, else its primary); one unsatisfied
  dependency (or an unreadable TLV area) sets *every* image's swap type to NONE - no
  image is swapped, and an unconfirmed test is not reverted at that boot.
* ``boot_perform_update``: swap using scratch / move exchange the slots sector by sector with
  a status entry per sector in the primary trailer (an interrupted swap resumes from there),
  then ``swap_set_image_ok`` for PERM/REVERT and ``swap_set_copy_done``; the secondary's
  trailer ends erased, which is what makes the next unconfirmed reset a REVERT.
  Overwrite-only (``boot_copy_image`` with MCUBOOT_OVERWRITE_ONLY_FAST, which Zephyr's
  CONFIG_BOOT_UPGRADE_ONLY sets): erase the primary's sectors up to the image size and its
  trailer sectors, copy hdr+image+TLVs (rounded up to the write size), write the primary's
  magic, then erase the secondary's first and last sectors (header and trailer): no status,
  so a power cut mid-copy makes the next boot copy again from the still-marked secondary;
  the new image boots with magic good, image_ok and copy_done unset, i.e. "confirmed" to
  img_mgmt (swap type none) and never reverted.
* an image updated as an nRF5340 network core (``ExtraImageConfig.update: netcore``): the
  image access hooks of sdk-nrf/sdk-mcuboot ``nrf53_hooks.c`` make its primary read as an
  empty trailer (never REVERT) and a header of version 0.0.0 that always validates;
  ``boot_perform_update_hook`` copies the secondary to the network core (PCD) and erases the
  secondary's last sector (its trailer); the image bytes stay in the secondary.
* MCUBOOT_VALIDATE_PRIMARY_SLOT (Zephyr's default): every image's primary is validated before
  the jump; one invalid primary and nothing boots ("Unable to find bootable image").

Direct-XIP and RAM load (``loader.c`` XIP branch, ``boot_load_and_validate_images``):

* the slots whose header is valid (``boot_is_header_valid``: magic, sizes inside the slot)
  are candidates; the one with the highest version (``boot_version_cmp``, build number
  ignored; on a tie the primary) is tried, then the next:
* direct-XIP: ``boot_rom_address_check`` - an IMAGE_F_ROM_FIXED image whose load address is
  not its slot's flash offset is skipped, untouched ("Image in primary slot at 0x40000 has
  been built for offset 0x80000, skipping");
* with revert (MCUBOOT_DIRECT_XIP_REVERT) ``boot_select_or_erase``: magic not good, or
  copy_done set with image_ok unset (it ran once and was never confirmed) -> the whole slot is
  erased and the next candidate tried; else copy_done is written (the slot "was selected")
  before validation;
* RAM load: the image needs IMAGE_F_RAM_LOAD and a load address inside the executable RAM
  region, else it is removed from flash (``boot_remove_image_from_flash``);
* ``boot_validate_slot``: an invalid image is erased (ARE_SLOTS_EQUIVALENT in these modes).

Single application slot (``boot/zephyr/single_loader.c``): slot 0 is validated and booted, or
nothing boots. Firmware loader (``boot/zephyr/firmware_loader.c``): slot 0 (the application)
boots unless the entry condition holds (recovery pin, retention boot mode) or it is not valid;
then slot 1 (the loader application) is validated and booted.

Power cuts: ``on_step(step, steps)`` is asked before every sector MCUboot moves or copies (and
before the network-core copy); True cuts the power there (``PowerCut``).
"""

from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from gateway.mcuboot import (
    IMAGE_MAGIC,
    ImageFormatError,
    ImageInfo,
    SignatureError,
    TrustedKey,
    Version,
    parse_image,
    read_version,
    verify_signature,
)
from gateway.sim.faults import PowerCut
from gateway.sim.flash import Flash
from gateway.sim.image_format import (
    HASH_TLV_BY_NAME,
    IMAGE_F_NON_BOOTABLE,
    IMAGE_F_RAM_LOAD,
    IMAGE_F_ROM_FIXED,
    DecryptionError,
    EncryptionKey,
    crypt_range,
    dependencies,
    is_encrypted,
)

StepHook = Callable[[int, int], bool]
NO_VERSION = Version(0, 0, 0, 0)


class SwapType(enum.IntEnum):
    """BOOT_SWAP_TYPE_* (bootutil/bootutil_public.h)."""

    NONE = 1
    TEST = 2
    PERM = 3
    REVERT = 4
    FAIL = 5
    PANIC = 0xFF


UPGRADES = (SwapType.TEST, SwapType.PERM, SwapType.REVERT)  # BOOT_IS_UPGRADE


def swap_type(flash: Flash, image: int = 0, *, netcore: bool = False) -> SwapType:
    """``boot_swap_type_multi(image)``: the ``boot_swap_tables`` lookup over the two trailers
    (a bad image_ok/copy_done byte matches neither SET nor UNSET). ``netcore``: the nRF5340
    hook reports the primary's trailer as empty."""
    s = flash.trailer(2 * image + 1)
    if s.magic == "good" and s.image_ok_flag == "unset":
        return SwapType.TEST
    if s.magic == "good" and s.image_ok_flag == "set":
        return SwapType.PERM
    if netcore:
        return SwapType.NONE
    p = flash.trailer(2 * image)
    if (p.magic == "good" and s.magic == "unset" and p.image_ok_flag == "unset"
            and p.copy_done_flag == "set"):
        return SwapType.REVERT
    return SwapType.NONE


class BootError(Exception):
    """``boot_set_next`` failure codes (BOOT_EBADVECT / BOOT_EBADIMAGE)."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def set_next(flash: Flash, slot: int, active: bool, confirm: bool) -> None:
    """``boot_set_next`` (bootutil_public.c): the trailer writes of img_mgmt's state write and
    of ``boot_write_img_confirmed``; the same code in every mode."""
    if active:
        confirm = True
    t = flash.trailer(slot)
    if t.magic == "good":
        # "If non-active then swap already scheduled, else confirm needed."
        if active and t.image_ok_flag == "unset":
            flash.write_image_ok(slot)
    elif t.magic == "unset":
        if not active:
            flash.write_magic(slot)
            if confirm:
                flash.write_image_ok(slot)
            flash.write_swap_info(slot, SwapType.PERM if confirm else SwapType.TEST)
    else:  # bad magic
        if active:
            raise BootError("EBADVECT")
        flash.erase(slot)
        raise BootError("EBADIMAGE")


def write_img_confirmed(flash: Flash, slot: int = 0) -> None:
    """``boot_write_img_confirmed`` (Zephyr dfu/mcuboot.c): boot_set_next(running slot, true,
    true) - the slot the application runs from (direct-XIP: either)."""
    set_next(flash, slot, active=True, confirm=True)


@dataclass(frozen=True)
class BootResult:
    """What one pass of the bootloader did."""

    outcome: str  # "normal", "swap", "revert", "refused: <reason>", "halt: <reason>", ...
    swap_type: SwapType  # what was performed on image 0 (NONE: nothing moved)
    booted: bool  # False: no bootable image, the device stays dark (or in serial recovery)
    permanent: bool = False
    active_slots: tuple[int, ...] = (0,)  # per image: the slot it runs / is installed from
    performed: tuple[SwapType, ...] = ()  # per image: swap / copy / netcore update done
    loader: bool = False  # firmware-loader mode booted the loader in slot 1
    log: tuple[str, ...] = field(default=(), compare=False)  # MCUboot's console, roughly


class Validator:
    """``bootutil_img_validate`` with a cache (signature checks run imgtool; images repeat).

    ``hash_algorithm``: the one hash TLV this MCUboot build checks (EXPECTED_HASH_TLV).
    ``enc``: its decryption key; an encrypted image is decrypted before hashing when it is in
    a slot MCUboot decrypts (MUST_DECRYPT: a secondary in swap / overwrite modes).
    """

    def __init__(self, keys: list[TrustedKey] | None, *, hash_algorithm: str = "sha256",
                 enc: EncryptionKey | None = None) -> None:
        self.keys = keys  # None = MCUboot built without signature checking
        self.hash_tlv, self.hash_len = HASH_TLV_BY_NAME[hash_algorithm]
        self.hash_name = hash_algorithm
        self.enc = enc
        self._cache: dict[tuple[bytes, bool], str | None] = {}

    def problem(self, slot_bytes: bytes, *, decrypt: bool = False) -> str | None:
        """None if MCUboot would accept the image, else the reason it refuses it."""
        digest = hashlib.sha256(slot_bytes).digest()
        if (digest, decrypt) in self._cache:
            return self._cache[(digest, decrypt)]
        reason: str | None
        try:
            info = parse_image(slot_bytes)
            data = slot_bytes
            if info.hdr_size + info.img_size >= len(slot_bytes):
                raise ImageFormatError("image larger than the slot")
            if decrypt and is_encrypted(info):
                if self.enc is None:
                    raise ImageFormatError("encrypted image and this MCUboot has no "
                                           "decryption key (hash over the ciphertext fails)")
                data = decrypt_image(slot_bytes, info, self.enc)
                info = parse_image(data)
            expected = info.tlv(self.hash_tlv)
            if expected is None or len(expected) != self.hash_len:
                reason = (f"no {self.hash_name.upper()} hash TLV (this MCUboot checks "
                          f"{self.hash_name.upper()} only)")
            elif not info.hash_valid:
                reason = "hash mismatch"
            elif self.keys is not None:
                verify_signature(data[: info.total_size], self.keys)
                reason = None
            else:
                reason = None
        except (ImageFormatError, SignatureError, DecryptionError) as exc:
            reason = str(exc)
        self._cache[(digest, decrypt)] = reason
        return reason


def decrypt_image(data: bytes, info: ImageInfo, enc: EncryptionKey) -> bytes:
    """The plain image (``boot_copy_region`` decrypting the payload on the way)."""
    return crypt_range(data, 0, info, enc.image_key(info))


@dataclass
class BootEnv:
    """The build and board facts the bootloader model needs (from ``SimDeviceConfig``)."""

    mode: str = "swap-using-scratch"
    images: int = 1
    netcore: frozenset[int] = frozenset()  # images updated through the nRF5340 hooks
    offsets: list[int] = field(default_factory=list)  # flash offset of every slot
    swap_sector: int = 0x4000  # granularity of the modelled swap / copy
    erase_sector: int = 0x1000  # the flash's erase unit (trailer sectors, overwrite erase)
    write_align: int = 8  # BOOT_WRITE_SZ
    downgrade_prevention: bool = False
    ram_load_region: tuple[int, int] = (0x20000000, 0x40000)
    enter_loader: bool = False  # firmware loader: the entry condition holds at this boot
    on_step: StepHook | None = None


def _cut(env: BootEnv, step: int, steps: int, what: str) -> None:
    if env.on_step is not None and env.on_step(step, steps):
        raise PowerCut(f"power lost before step {step}/{steps} of {what}")


def _hdr_erased(flash: Flash, slot: int) -> bool:
    return flash.header_magic(slot) == 0xFFFFFFFF


def _version(flash: Flash, slot: int) -> Version:
    return read_version(flash.read(slot, 0, 28))


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


class _Boot:
    """One pass of the bootloader over a flash (state of ``context_boot_go``)."""

    def __init__(self, flash: Flash, validator: Validator, env: BootEnv) -> None:
        self.flash = flash
        self.v = validator
        self.env = env
        self.log: list[str] = []
        self.refused: str | None = None  # why MCUboot erased an upgrade candidate

    # --- shared ----------------------------------------------------------------------
    def erase_trailer_sectors(self, slot: int) -> None:
        """``swap_erase_trailer_sectors``: every erase sector holding part of the trailer."""
        sec = self.env.erase_sector
        start = self.flash.status_off_of(slot) // sec * sec
        self.flash.erase_range(slot, start, self.flash.size(slot) - start)

    def result(self, outcome: str, booted: bool, performed: list[SwapType],
               active: list[int], loader: bool = False) -> BootResult:
        st0 = performed[0] if performed else SwapType.NONE
        return BootResult(outcome, st0, booted, permanent=st0 == SwapType.PERM,
                          active_slots=tuple(active), performed=tuple(performed),
                          loader=loader, log=tuple(self.log))

    # --- swap / overwrite ---------------------------------------------------------------
    def validate_secondary(self, image: int) -> bool:
        """``boot_validate_slot(secondary)`` for an upgrade of ``image``."""
        f, s, p = self.flash, 2 * image + 1, 2 * image
        info = f.image_info(s)
        flags = int.from_bytes(f.read(s, 16, 4), "little")
        if _hdr_erased(f, s) or (f.header_magic(s) == IMAGE_MAGIC and flags & IMAGE_F_NON_BOOTABLE):
            if self.env.mode != "overwrite-only":
                self.erase_trailer_sectors(s)
            self.log.append(f"Image {image}: secondary slot holds no bootable image")
            return False
        if (self.env.mode == "overwrite-only" and self.env.downgrade_prevention
                and not _hdr_erased(f, p) and info is not None
                and _version(f, s).key()[:3] < _version(f, p).key()[:3]):
            self.log.append("E: insufficient version in secondary slot")
            f.erase(s)
            return False
        problem = self.v.problem(f.read(s), decrypt=True)
        if problem is not None:
            self.log.append(f"E: Image in the secondary slot is not valid! ({problem})")
            f.erase(s)
            self.refused = problem
            return False
        return True

    def dependency_version(self, image: int, types: list[SwapType]) -> Version | None:
        """Version the image ``image`` will run after this boot (None: no such image)."""
        if image >= self.env.images:
            return None
        slot = 2 * image + 1 if types[image] in UPGRADES else 2 * image
        if slot % 2 == 0 and image in self.env.netcore:
            return NO_VERSION  # boot_read_image_header_hook: version 0.0.0
        return _version(self.flash, slot)

    def dependencies_ok(self, types: list[SwapType]) -> bool:
        f = self.flash
        for i in range(self.env.images):
            slot = 2 * i + 1 if types[i] not in (SwapType.NONE, SwapType.FAIL) else 2 * i
            if slot % 2 == 0 and i in self.env.netcore:
                continue  # the hooked header has no TLVs to check
            try:
                data = f.read(slot)
                info = parse_image(data)
                deps = dependencies(data, info)
            except ImageFormatError:
                self.log.append(f"Image {i}: dependency TLVs unreadable")
                return False
            for dep in deps:
                have = self.dependency_version(dep.image_id, types)
                if have is None or have.key()[:3] < dep.min_version.key()[:3]:
                    self.log.append(f"Image {i} depends on image {dep.image_id} >= "
                                    f"{dep.min_version}, which would be {have}: no upgrade")
                    return False
        return True

    def swap(self, image: int, st: SwapType, start: int) -> None:
        """Exchange image ``image``'s slots sector by sector (``boot_swap_image``)."""
        f, env = self.flash, self.env
        p, s = 2 * image, 2 * image + 1
        data_end = min(f.status_off_of(p), f.status_off_of(s))
        sectors = -(-data_end // env.swap_sector)
        keys = self._swap_keys(p, s, start)
        if start == 0:
            f.erase_trailer(p)
            f.write_swap_info(p, int(st), image)
            f.write_swap_size(p, data_end)
            f.write_magic(p)
        algo = "move" if env.mode == "swap-using-move" else "scratch"
        self.log.append(f"Starting swap using {algo} algorithm.")
        for i in range(start, sectors):
            _cut(env, i, sectors, f"a {st.name} swap of image {image}")
            off = i * env.swap_sector
            n = min(env.swap_sector, data_end - off)
            a, b = f.read(p, off, n), f.read(s, off, n)
            if keys["s"] is not None:  # secondary -> primary: decrypted
                b = crypt_range(b, off, keys["s"][0], keys["s"][1])
            if keys["p"] is not None:  # primary -> secondary: encrypted again
                a = crypt_range(a, off, keys["p"][0], keys["p"][1])
            f.write(p, off, b, sync=True)
            f.write(s, off, a, sync=True)
            f.write_status(i, primary=p)
        f.erase_trailer(s)
        if st in (SwapType.REVERT, SwapType.PERM):
            f.write_image_ok(p)
        f.write_copy_done(p)
        (f.dir / f"enc-keys-{image}.json").unlink(missing_ok=True)

    def _swap_keys(self, p: int, s: int,
                   start: int) -> dict[str, tuple[ImageInfo, bytes] | None]:
        """The AES keys of both images for the swap: MCUboot reads them from the ENC TLVs at
        the start and keeps them in the primary trailer (``boot_write_enc_key``) so that a
        resumed swap has them; the simulator keeps them beside the slot files."""
        f = self.flash
        path = f.dir / f"enc-keys-{p // 2}.json"
        if start > 0 and path.exists():
            saved = json.loads(path.read_text())
            out: dict[str, tuple[ImageInfo, bytes] | None] = {}
            for k in ("p", "s"):
                out[k] = None if saved[k] is None else (
                    parse_image(bytes.fromhex(saved[k]["hdr"])), bytes.fromhex(saved[k]["key"]))
            return out
        out = {"p": self._enc_key_of(p), "s": self._enc_key_of(s)}
        if any(out.values()):
            path.write_text(json.dumps({k: None if v is None else {
                "hdr": f.read(p if k == "p" else s, 0, v[0].total_size).hex(),
                "key": v[1].hex()} for k, v in out.items()}))
        return out

    def _enc_key_of(self, slot: int) -> tuple[ImageInfo, bytes] | None:
        info = self.flash.image_info(slot)
        if info is None or not is_encrypted(info) or self.v.enc is None:
            return None
        try:
            return info, self.v.enc.image_key(info)
        except DecryptionError:
            return None

    def overwrite(self, image: int) -> None:
        """``boot_copy_image`` (MCUBOOT_OVERWRITE_ONLY_FAST)."""
        f, env = self.flash, self.env
        p, s = 2 * image, 2 * image + 1
        info = f.image_info(s)
        assert info is not None  # validated
        size = info.total_size
        size += env.write_align - size % env.write_align  # as the source does: always adds
        self.log += [f"Image {image} upgrade secondary slot -> primary slot",
                     "Erasing the primary slot",
                     f"Image {image} copying the secondary slot to the primary slot: "
                     f"{size:#x} bytes"]
        key = self._enc_key_of(s)
        sec = env.erase_sector
        f.erase_range(p, 0, min(_round_up(size, sec), f.size(p)))
        tstart = f.status_off_of(p) // sec * sec
        f.erase_range(p, tstart, f.size(p) - tstart)
        steps = -(-size // env.swap_sector)
        for i in range(steps):
            _cut(env, i, steps, f"the copy of image {image}")
            off = i * env.swap_sector
            chunk = f.read(s, off, min(env.swap_sector, size - off))
            if key is not None:
                chunk = crypt_range(chunk, off, key[0], key[1])
            f.write(p, off, chunk, sync=True)
        f.write_magic(p)
        f.erase_range(s, 0, min(sec, f.size(s)))  # header sector
        last = (f.size(s) - 1) // sec * sec
        f.erase_range(s, last, f.size(s) - last)  # trailer sector

    def netcore_update(self, image: int) -> None:
        """``boot_perform_update_hook`` (nrf53_hooks.c): PCD copy to the network core, then
        the secondary's last sector is erased."""
        f, env = self.flash, self.env
        p, s = 2 * image, 2 * image + 1
        info = f.image_info(s)
        assert info is not None
        _cut(env, 0, 2, f"the network core update of image {image}")
        f.erase(p)
        f.write(p, 0, f.read(s, 0, info.total_size), sync=True)
        self.log.append(f"Image {image}: network core updated to {info.version}")
        _cut(env, 1, 2, f"the network core update of image {image}")
        last = (f.size(s) - 1) // env.erase_sector * env.erase_sector
        f.erase_range(s, last, f.size(s) - last)

    def run_swap_like(self) -> BootResult:
        env, f = self.env, self.flash
        n = env.images
        types = [SwapType.NONE] * n
        performed = [SwapType.NONE] * n
        resumed = False
        for i in range(n):
            if env.mode != "overwrite-only" and i not in env.netcore:
                prog = f.swap_progress(2 * i)
                if prog is not None:
                    st = SwapType(prog[0])
                    self.log.append(f"Image index: {i}, resuming an interrupted {st.name} swap")
                    self.swap(i, st, prog[1])
                    performed[i] = st
                    resumed = True
                    continue
            st = swap_type(f, i, netcore=i in env.netcore)
            self.log.append(f"Image index: {i}, Swap type: {st.name.lower()}")
            if st in UPGRADES and not self.validate_secondary(i):
                st = SwapType.NONE
            types[i] = st
        if n > 1 and any(t in UPGRADES for t in types) and not self.dependencies_ok(types):
            types = [SwapType.NONE] * n
        for i, st in enumerate(types):
            if st not in UPGRADES:
                continue
            if i in env.netcore:
                self.netcore_update(i)
            elif env.mode == "overwrite-only":
                self.overwrite(i)
            else:
                self.swap(i, st, 0)
            performed[i] = st
        active = [2 * i for i in range(n)]
        # MCUBOOT_VALIDATE_PRIMARY_SLOT, every image
        for i in range(n):
            if i in env.netcore:
                continue
            if _hdr_erased(f, 2 * i):
                return self.result(f"halt: no image in the primary slot of image {i}", False,
                                   performed, active)
            problem = self.v.problem(f.read(2 * i))
            if problem is not None:
                return self.result(f"halt: primary image {i} invalid ({problem})", False,
                                   performed, active)
        st0 = performed[0]
        if resumed:
            outcome = "resumed revert" if st0 == SwapType.REVERT else "resumed swap"
        elif st0 == SwapType.REVERT:
            outcome = "revert"
        elif st0 in UPGRADES:
            outcome = "overwrite" if env.mode == "overwrite-only" else "swap"
        elif self.refused is not None:
            outcome = f"refused: {self.refused}"
        elif any(t in UPGRADES for t in performed):
            outcome = "swap"
        else:
            outcome = "normal"
        return self.result(outcome, True, performed, active)

    # --- direct-XIP / RAM load ----------------------------------------------------------
    def run_xip(self) -> BootResult:
        f, env = self.flash, self.env
        self.log.append("Starting Direct-XIP bootloader" if env.mode != "ram-load"
                        else "Starting RAM-load bootloader")
        available = []
        for slot in (0, 1):
            info_hdr = f.read(slot, 0, 32)
            magic = int.from_bytes(info_hdr[:4], "little")
            hdr_size = int.from_bytes(info_hdr[8:10], "little")
            img_size = int.from_bytes(info_hdr[12:16], "little")
            name = "Primary  " if slot == 0 else "Secondary"
            if magic == IMAGE_MAGIC and hdr_size + img_size < f.size(slot):
                available.append(slot)
                self.log.append(f"{name} slot: version={_version(f, slot).semver()}")
            else:
                self.log.append(f"Image 0 {name.strip()} slot: Image not found")
        outcome = "normal"
        while True:
            if not available:
                self.log.append("No slot to load for image 0")
                return self.result("halt: no bootable image", False, [SwapType.NONE], [0])
            slot = available[0]
            for other in available[1:]:
                if _version(f, other).key()[:3] > _version(f, slot).key()[:3]:
                    slot = other
            where = "primary" if slot == 0 else "secondary"
            flags = int.from_bytes(f.read(slot, 16, 4), "little")
            load_addr = int.from_bytes(f.read(slot, 4, 4), "little")
            if env.mode != "ram-load" and flags & IMAGE_F_ROM_FIXED and load_addr != env.offsets[slot]:
                self.log.append(f"W: Image in {where} slot at {env.offsets[slot]:#x} has been "
                                f"built for offset {load_addr:#x}, skipping")
                available.remove(slot)
                continue
            if env.mode == "direct-xip-with-revert":
                t = f.trailer(slot)
                if t.magic != "good" or (t.copy_done_flag == "set" and t.image_ok_flag != "set"):
                    f.erase(slot)  # boot_select_or_erase: "Erasing faulty image"
                    self.log.append(f"Erasing faulty image in the {where} slot.")
                    outcome = "revert" if t.magic == "good" else "erased unmarked image"
                    available.remove(slot)
                    continue
                if t.copy_done_flag != "set":
                    f.write_copy_done(slot)
            if env.mode == "ram-load":
                start, size = env.ram_load_region
                info = f.image_info(slot)
                if (not flags & IMAGE_F_RAM_LOAD or info is None
                        or not start <= load_addr <= start + size - info.total_size):
                    self.log.append(f"Image RAM load address {load_addr:#x} is invalid.")
                    f.erase(slot)  # boot_remove_image_from_flash
                    available.remove(slot)
                    outcome = "refused: not loadable into RAM"
                    continue
            problem = self.v.problem(f.read(slot))
            if problem is not None:
                self.log.append(f"E: Image in the {where} slot is not valid! ({problem})")
                f.erase(slot)
                available.remove(slot)
                outcome = f"refused: {problem}"
                continue
            self.log.append(f"Image 0 loaded from the {where} slot")
            self.log.append(f"Bootloader chainload address offset: {env.offsets[slot]:#x}")
            return self.result(outcome, True, [SwapType.NONE], [slot])

    # --- single slot / firmware loader ------------------------------------------------
    def run_single(self) -> BootResult:
        f, env = self.flash, self.env
        problem = "no image" if _hdr_erased(f, 0) else self.v.problem(f.read(0))
        if env.mode == "single-app":
            if problem is not None:
                return self.result(f"halt: {problem}", False, [SwapType.NONE], [0])
            return self.result("normal", True, [SwapType.NONE], [0])
        # firmware loader
        if problem is None and not env.enter_loader:
            return self.result("normal", True, [SwapType.NONE], [0])
        self.log.append("Booting the firmware loader" + (
            f" (application: {problem})" if problem else " (entry condition)"))
        loader_problem = "no image" if _hdr_erased(f, 1) else self.v.problem(f.read(1))
        if loader_problem is not None:
            return self.result(f"halt: firmware loader {loader_problem}", False,
                               [SwapType.NONE], [1])
        return self.result("firmware loader", True, [SwapType.NONE], [1], loader=True)


def run_bootloader(flash: Flash, validator: Validator, env: BootEnv | None = None) -> BootResult:
    """One MCUboot pass at reset.

    Raises PowerCut when ``env.on_step`` says the power goes mid-swap/copy; what is in flash
    then makes the next pass finish (swap status) or redo (overwrite copy) the work.
    """
    env = env or BootEnv(offsets=[0x10000, 0x10000 + flash.size(0)])
    boot = _Boot(flash, validator, env)
    mode: Literal["swap", "xip", "single"]
    mode = ("xip" if env.mode in ("direct-xip", "direct-xip-with-revert", "ram-load")
            else "single" if env.mode in ("single-app", "firmware-loader") else "swap")
    if mode == "xip":
        return boot.run_xip()
    if mode == "single":
        return boot.run_single()
    return boot.run_swap_like()
