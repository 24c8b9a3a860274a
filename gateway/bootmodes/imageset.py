"""Multi-image devices: the rules for updating several MCUboot images as one set.

Owns the decisions of a set update; the engine (``UpdateEngine._run_set``) does the I/O and
writes the journal. One set = one artifact (``gateway.artifacts.bundle``), one reset.

What each decision rests on (the trust rule: (a) what an image's signature covers, (b) what the
device reports, (c) the gateway's configuration - never the artifact's manifest alone):

* which images the set holds and their hashes, versions, dependencies: (a), each member
  verified like a single image;
* which image is a network core (never test-marked, installed for good): (c) only,
  ``images: {N: {netcore: true}}`` in the device config, and never image 0 (the config refuses
  it: image 0 is the application answering SMP, the one image whose test boot can be
  confirmed). The manifest's ``netcore`` key / ``*cpunet`` board is a claim
  (``SetMember.netcore``) that is cross-checked - the config says network core and the manifest
  names another core: refused; the manifest says network core and the config does not: logged,
  the image is an ordinary one;
* test or permanent for the others: (c) ``images: {N: {mark}}``, else test for image 0;
* the downgrade / version check of every member, network core or not: (a) the member's version
  against (b) the version the device reports running for that image (a network core whose
  primary the application cannot read reports none: then only MCUboot's own check applies);
* where each member is and what the reset did: (b) the device's image state, and the journal
  of what this gateway marked.

The sequence, and why (checked on ``shared/firmware/stm32f4_disco-multi-image``: two images,
swap using scratch, Zephyr 3.4 img_mgmt with the default
CONFIG_MCUMGR_GRP_IMG_ALLOW_CONFIRM_NON_ACTIVE_IMAGE_SECONDARY=y):

1. Read every image's slots. An image whose target hash is already in one of its slots is not
   uploaded again (running it: nothing to do for it; in its secondary: only marked).
2. Pre-flight every member (hardware, slot size, version, dependency TLVs against the versions
   the set and the device will have) before a byte is sent.
3. Upload each missing image with its ``image`` number; after each, the device's own state read
   must show its secondary holding exactly that hash - otherwise nothing is marked.
4. Marks, image 0 first: image 0 (the running application) is *test*-marked - the one image
   that can be confirmed after its test boot. Every other image is marked *permanent* (its
   secondary, by hash): img_mgmt confirms only the running image - confirming image 1 in its
   primary after a test swap is refused with rc 32 IMAGE_CONFIRMATION_DENIED, so a test-marked
   image 1 would be reverted at the next reset whatever happens. An nRF5340 network core (the
   device config says which) has no revert at all (MCUboot's nrf53 hooks copy it to the
   network core and report an empty primary trailer) and is never test-marked. Test first,
   permanent last: if the gateway or the power stops between two marks, what is scheduled is
   only a change MCUboot can undo.
   (``images: {N: {mark: test}}`` for a device built with
   ``..._ALLOW_CONFIRM_NON_ACTIVE_IMAGE_ANY``: then image N is test-booted and confirmed by hash
   after the health check, and can be reverted like image 0.)
5. One reset: MCUboot swaps / installs every marked image in the same boot (with dependency
   TLVs it refuses the whole set when one image's dependency is not met).
6. After the boot every image is checked: test-marked ones run unconfirmed with their target
   hash, permanent ones run confirmed, a network core's secondary is no longer pending
   (consumed: its version cannot be read back over img_mgmt).
7. All good: health check of the application, then confirm the test-marked images. Any image
   failed: the set failed; every test-booted image is reset back (MCUboot reverts it), the
   permanent ones stay and the outcome says so.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from smp.image_management import ImageState

from gateway.bootmodes.flows import Mark
from gateway.bootmodes.modes import Mode
from gateway.images import ImageRefused, Refusal, SetMember, VerifiedImageSet
from gateway.mcuboot import Version

log = logging.getLogger("gateway.imageset")

if TYPE_CHECKING:
    from gateway.config import DeviceConfig


class Where(enum.StrEnum):
    """Where a member's target hash is on the device."""

    INSTALLED = "installed"  # running (primary), confirmed
    TESTING = "testing"  # running, unconfirmed (test boot)
    PENDING = "pending"  # secondary, marked (test or permanent)
    STAGED = "staged"  # secondary, not marked
    ABSENT = "absent"  # not on the device


@dataclass(frozen=True)
class ImageSlots:
    """One image number's entries of an image state answer."""

    image: int
    primary: ImageState | None  # the active entry (slot 0 in swap modes)
    secondary: ImageState | None

    @classmethod
    def of(cls, states: list[ImageState], image: int) -> ImageSlots:
        mine = [s for s in states if (s.image or 0) == image]
        primary = next((s for s in mine if s.active), None) or next(
            (s for s in mine if s.slot == 0), None)
        secondary = next((s for s in mine if s is not primary), None)
        return cls(image, primary, secondary)

    @property
    def primary_hash(self) -> bytes | None:
        return bytes(self.primary.hash) if self.primary is not None and self.primary.hash else None

    @property
    def secondary_hash(self) -> bytes | None:
        return (bytes(self.secondary.hash) if self.secondary is not None and self.secondary.hash
                else None)

    @property
    def running_version(self) -> Version | None:
        if self.primary is None:
            return None
        try:
            return Version.parse(self.primary.version)
        except ValueError:
            return None


@dataclass(frozen=True)
class Rule:
    mark: Mark  # TEST or PERMANENT
    netcore: bool = False
    confirm_by_hash: bool = False  # a test-marked image other than 0: confirmed by its hash

    @property
    def revertible(self) -> bool:
        return self.mark == Mark.TEST


def rules(dev: DeviceConfig, iset: VerifiedImageSet, mode: Mode) -> dict[int, Rule]:
    """How each member is marked (see the module docstring). ImageRefused when the artifact's
    network-core claim contradicts the device config (nothing is sent then)."""
    out: dict[int, Rule] = {}
    for m in iset.members:
        cfg = dev.images.get(m.image)
        # (c) the device config alone says which image is a network core, never image 0; the
        # artifact's claim (unsigned manifest metadata) is only cross-checked
        netcore = cfg is not None and cfg.netcore and m.image != 0
        if netcore and m.netcore is False:
            raise ImageRefused(Refusal.BAD_SET, f"the device config says image {m.image} is a "
                               "network core, but the artifact's manifest names another core "
                               f"for {m.name or m.label()}: refusing a set built for another "
                               "device")
        if m.netcore and not netcore:
            log.warning("device=%s %s: the artifact calls it a network core, the device config "
                        "does not (images: {%d: {netcore: true}}): updated as an ordinary image",
                        dev.id, m.label(), m.image)
        if netcore:
            out[m.image] = Rule(Mark.PERMANENT, True)
            continue
        if mode == Mode.OVERWRITE_ONLY:
            out[m.image] = Rule(Mark.TEST)  # accepted by img_mgmt; installed for good either way
            continue
        want = cfg.mark if cfg is not None and cfg.mark is not None else (
            "test" if m.image == 0 else "permanent")
        out[m.image] = Rule(Mark.TEST if want == "test" else Mark.PERMANENT, False,
                            confirm_by_hash=want == "test" and m.image != 0)
    return out


def where(slots: ImageSlots, target: bytes, rule: Rule, installed_before: bool) -> Where:
    """Where ``target`` is on the device for this image. ``installed_before``: the journal says
    this gateway marked the set and reset the device (a network core's image stays in its
    secondary after MCUboot handed it over, so only that tells installed from staged)."""
    if slots.primary_hash == target:
        pr = slots.primary
        return Where.INSTALLED if pr is not None and pr.confirmed else Where.TESTING
    if slots.secondary_hash == target:
        sec = slots.secondary
        if sec is not None and (sec.pending or sec.permanent):
            return Where.PENDING
        if rule.netcore and installed_before:
            return Where.INSTALLED
        return Where.STAGED
    return Where.ABSENT


@dataclass
class Verdict:
    """After the reset: per image, did it go where its mark should have taken it?"""

    ok: dict[int, str] = field(default_factory=dict)  # image -> how it is now
    failed: dict[int, str] = field(default_factory=dict)  # image -> what went wrong
    testing: list[int] = field(default_factory=list)  # images running unconfirmed (revertible)
    permanent: list[int] = field(default_factory=list)  # images installed for good

    @property
    def all_ok(self) -> bool:
        return not self.failed


def after_boot(states: list[ImageState], iset: VerifiedImageSet, rls: dict[int, Rule],
               marked: set[int]) -> Verdict:
    """Check every marked member after the one reset (step 6 of the module docstring)."""
    v = Verdict()
    for m in iset.members:
        if m.image not in marked:
            continue
        s = ImageSlots.of(states, m.image)
        rule = rls[m.image]
        t = m.hash
        ver = m.verified.version
        if rule.netcore:
            if s.secondary_hash == t and s.secondary is not None and not (
                    s.secondary.pending or s.secondary.permanent):
                v.ok[m.image] = (f"image {m.image} {ver}: handed to the network core (installed "
                                 "for good; its version cannot be read back over img_mgmt)")
                v.permanent.append(m.image)
            elif s.secondary_hash == t:
                v.failed[m.image] = f"image {m.image} {ver}: still pending, MCUboot did not take it"
            else:
                v.failed[m.image] = (f"image {m.image} {ver}: gone from its secondary slot - "
                                     "MCUboot refused it (validation failed on the device)")
            continue
        if s.primary_hash == t:
            confirmed = s.primary is not None and bool(s.primary.confirmed)
            if rule.mark == Mark.TEST and not confirmed:
                v.ok[m.image] = f"image {m.image} {ver}: test-booted"
                v.testing.append(m.image)
            else:
                v.ok[m.image] = f"image {m.image} {ver}: installed permanently"
                v.permanent.append(m.image)
            continue
        now = s.primary.version if s.primary is not None else "?"
        if s.secondary_hash == t and s.secondary is not None and (
                s.secondary.pending or s.secondary.permanent):
            v.failed[m.image] = (f"image {m.image} {ver}: still pending after the reset - MCUboot "
                                 f"did not take it (a dependency of the set not met?); runs {now}")
        elif s.secondary_hash == t:
            v.failed[m.image] = (f"image {m.image} {ver}: booted and was reverted before the "
                                 f"gateway confirmed it; runs {now}")
        else:
            v.failed[m.image] = (f"image {m.image} {ver}: MCUboot refused it at boot (validation "
                                 f"failed on the device, its secondary slot was erased); runs {now}")
    return v


def dependency_problem(iset: VerifiedImageSet, running: dict[int, Version | None]) -> str | None:
    """A member's DEPENDENCY TLV that the set and the device together cannot meet: MCUboot
    would then swap nothing (``boot_verify_dependencies`` sets every swap type to NONE)."""
    for m in iset.members:
        # (a) the signed DEPENDENCY TLVs name other images' numbers: a binary that depends on
        # image N is not image N - the manifest's unsigned image_index sent it to the wrong
        # image (e.g. an application and a network core binary swapped)
        if any(dep_image == m.image for dep_image, _ in m.verified.info.dependencies):
            return (f"{m.label()} {m.verified.version} ({m.name or 'no name'}) declares (signed) a "
                    f"dependency on image {m.image} itself: it is not image {m.image}'s binary; "
                    "the artifact's manifest numbers its images wrongly")
    after = dict(running)
    for m in iset.members:
        after[m.image] = m.verified.version
    for m in iset.members:
        for dep_image, minimum in m.verified.info.dependencies:
            have = after.get(dep_image)
            if have is None:
                continue  # unknown (e.g. a network core's version): MCUboot will decide
            if have.key()[:3] < minimum.key()[:3]:
                return (f"image {m.image} {m.verified.version} depends on image {dep_image} >= "
                        f"{minimum}, but after this update image {dep_image} would be {have}: "
                        "MCUboot would refuse the whole set")
    return None


def member_slot_size(dev: DeviceConfig, m: SetMember) -> int | None:
    cfg = dev.images.get(m.image)
    if cfg is not None and cfg.slot_size is not None:
        return cfg.slot_size
    return dev.slot_size if m.image == 0 else None
