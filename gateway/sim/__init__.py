"""Device simulator: Zephyr ``smp_svr`` + MCUboot (swap mode), many devices per process.

For trying the gateway before hardware arrives, and for its tests and benchmarks.
``python -m gateway.sim --config sim.yaml`` (or :func:`run_simulator` / :class:`Simulator`).

What it fakes (behaviour copied from the sources named in each module):

* SMP server (``smp_server``): header/version/error handling of Zephyr ``smp.c`` (v1 and
  v2 error forms, v1 translation of group errors); OS group: echo (0), reset (5),
  MCUmgr parameters (6, or ENOTSUP like plain smp_svr), OS/application info (7, format
  letters s n r v m p i o a), bootloader info (8, ``{"bootloader": "MCUboot"}`` and
  ``query=mode``); image group: state read/write (0) with img_mgmt_state.c's flags and
  rules, upload (1) with img_mgmt.c / zephyr_img_mgmt.c's checks, sha resume,
  wrong-offset answers, ``match``, and erase (5). Unknown group/command -> ENOTSUP.
* MCUboot swap mode (``boot``): trailer magic/image_ok/copy_done per slot, the swap-type
  table, test / permanent / revert, validation of the secondary (hash + signature against
  the device's own key) with erase on refusal, primary-slot validation.
* Flash (``flash``): slot0.bin/slot1.bin of ``slot_size`` bytes (0xFF erased) and a
  trailer.json, in ``state_dir/<id>/flash``; a simulator restart is a power cycle.
* Transports: UDP (one port per device, closed while rebooting) and serial over a PTY
  (MCUmgr base64 line framing, input discarded while rebooting).
* Link emulation (``link``): latency, bandwidth (FIFO serialization delay), loss,
  duplication, reordering, serial baud pacing; seeded RNG.
* Requests are served one at a time in arrival order from one pool of ``buf_count``
  netbufs shared with the responses (Zephyr smp.c): the request being handled holds two
  (request + response); a request finding no free netbuf is dropped, and one handled while
  the queue holds every other buffer is answered ``{"rc": ENOMEM}`` unhandled (so at most
  ``buf_count - 1`` requests in flight are safe). Requests larger than ``buf_size`` (serial:
  ``buf_size - 4``, the frame length and CRC share the netbuf) are dropped.
* Application knobs: self-confirm after a delay, crash (watchdog) or hang on given
  versions (``hang_watchdog_s``: the hung image's watchdog resets it, so MCUboot reverts),
  one reboot when an upload passes an offset, boot time.
* MCUboot swap progress: the swap runs sector by sector (``swap_sector_size``) with its
  progress persisted in flash; a boot finds an interrupted swap and resumes it.
* Faults (``faults``): power cut once mid-swap (``power_cut_during_swap``), a reset after
  which the device stays off until power-cycled (``dead_after_reset``), the serial cable
  pulled mid-upload and plugged back at the same path (``unplug_during_upload_at``),
  broken responses (``response_faults``: malformed CBOR, truncated, wrong sequence number,
  wrong group, oversized), firmware without image management
  (``img_mgmt_supported``).

What it leaves out:

* BLE pairing/bonding and scan responses (the BLE transport, ``sim/ble.py``, is a Bumble
  GATT peripheral on a virtual controller); SMP groups other than OS and image (stats,
  settings, fs, shell, enum);
  OS taskstat, mpstat, datetime; reset ``force``/``boot_mode``; the MCUmgr callback hooks.
* Multi-image (only image 0, slots 0 and 1), direct-XIP, overwrite-only, RAM-load and
  the scratch area: a swap exchanges the slots sector by sector (each sector step atomic),
  so power can be cut *between* sectors (and the swap resumes), not in the middle of one
  sector's erase/copy as on real flash; the status lives in trailer.json, not in the slots.
* Power loss at any other moment than mid-swap (e.g. mid flash write during an upload);
  a cable pull that also resets a USB-powered device (the device keeps running).
* Encrypted images, downgrade prevention, hardware rollback counters, dependency TLVs.
* Flash timing beyond two knobs: ``request_processing_s`` (device time per request) and
  ``flash_write_bps`` (upload chunk write speed); erases are instantaneous.
* Trailer bytes are not stored inside the slot files (kept in trailer.json instead), and
  bootloader-info always reports the configured mode, no ``no-downgrade``.
"""

from gateway.sim.config import (
    LinkConfig,
    SerialTransportConfig,
    SimConfig,
    SimDeviceConfig,
    UdpTransportConfig,
    load_sim_config,
)
from gateway.sim.device import SimDevice, SimEvent
from gateway.sim.simulator import Simulator, run_simulator

__all__ = [
    "LinkConfig",
    "SerialTransportConfig",
    "SimConfig",
    "SimDevice",
    "SimDeviceConfig",
    "SimEvent",
    "Simulator",
    "UdpTransportConfig",
    "load_sim_config",
    "run_simulator",
]
