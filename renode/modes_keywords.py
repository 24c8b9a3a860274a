"""Robot keywords for ``smp_gateway_modes.robot`` beyond ``gateway_keywords.py``: manifests for
image sets and slot builds, and image-aware slot checks (multi-image devices list ``image``).

The device is read with ``smpclient`` through ``gateway_keywords.device_image_state`` (not with
the gateway's own SMP code)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import yaml
from gateway_keywords import device_image_state  # type: ignore[import-not-found]
from robot.api.deco import keyword


def _copy(work: str, image: str) -> str:
    dst = Path(work) / "updates" / Path(image).name
    shutil.copy(image, dst)
    return dst.name


def _manifest(work: str, entry: dict[str, Any]) -> None:
    (Path(work) / "updates" / "manifest.yaml").write_text(
        yaml.safe_dump({"images": [{**entry, "hardware": "stm32f4_disco"}]}))


@keyword("Publish Slot Builds")
def publish_slot_builds(work: str, slot0: str, slot1: str) -> None:
    """A direct-XIP release: the build linked for slot 0 and the one for slot 1."""
    _manifest(work, {"images": [{"file": _copy(work, slot0), "slot": 0},
                                {"file": _copy(work, slot1), "slot": 1}]})


@keyword("Publish Image Set")
def publish_image_set(work: str, *images: str) -> None:
    """A multi-image set: ``path`` arguments in image-number order (image 0 first)."""
    _manifest(work, {"images": [{"file": _copy(work, p), "image": i} for i, p in enumerate(images)]})


@keyword("Image Slot Should Hold")
def image_slot_should_hold(port: str, image: int, slot: int, version: str, hash_: str | None = None,
                           **flags: str) -> dict[str, Any]:
    """e.g. ``Image Slot Should Hold  ${PTY}  1  0  2.0.0  ${hash}  confirmed=True``."""
    slots = device_image_state(port)
    got = next((s for s in slots if s["image"] == int(image) and s["slot"] == int(slot)), None)
    if got is None:
        raise AssertionError(f"image {image} slot {slot} is empty: {slots}")
    if got["version"] != version or (hash_ and got["hash"] != hash_.lower()):
        raise AssertionError(f"image {image} slot {slot} holds {got['version']} {got['hash']}, "
                             f"expected {version} {hash_ or ''}: {slots}")
    for k, v in flags.items():
        want = str(v).lower() in ("true", "1", "yes")
        if got[k] != want:
            raise AssertionError(f"image {image} slot {slot} {k}={got[k]}, expected {want}: {slots}")
    return got


@keyword("Uploaded Images")
def uploaded_images(stdout: str, device: str = "disco") -> list[str]:
    """What the gateway's upload steps say they sent (``step=upload <what>``), in order."""
    return re.findall(rf"device={re.escape(device)} step=upload (.*)$", stdout, re.M)
