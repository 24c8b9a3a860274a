"""Device simulator: Zephyr ``smp_svr`` + MCUboot in every upgrade mode, 1..N images, many
devices per process.

For trying the gateway before hardware arrives, and for its tests and benchmarks.
``python -m gateway.sim --config sim.yaml`` (or :func:`run_simulator` / :class:`Simulator`).
``preset: NAME`` in a device's YAML (``gateway/sim/presets.py``: ``zephyr-uart``,
``zephyr-shell``, ``zephyr-udp``, ``renode-stm32f4-disco`` and its ``-swap-move``,
``-overwrite-only``, ``-direct-xip-revert``, ``-multi-image`` siblings, ``zephyr-nrf5340``,
``zephyr-nrf52840-direct-xip``, ``zephyr-nrf52840-overwrite-only``,
``zephyr-single-app-recovery``, ``zephyr-firmware-loader``) configures it as a given real
build; without a preset the defaults are the stock sample's (Zephyr 3.4 Kconfig defaults).
The mode and layout fields are documented in ``config.py`` (``mcuboot_mode``,
``primary_slot_size``, ``flash_offsets``, ``extra_images``, ``serial_recovery``, the
img_mgmt Kconfig knobs).

Sources: Zephyr 3.4.99 as built for ``shared/firmware/stm32f4_disco`` (the tree of
lgalstyan/nrf_connect's first commit; module pins zcbor 67fd8bb, MCUboot 11ecbf6 of
2023-08-25). The Zephyr sources were read from the stored zephyrproject-rtos/zephyr copies
(img_mgmt_state.c at 0014f3dc: the 3.4-era ``img_mgmt_set_next_boot_slot`` with
CONFIG_MCUMGR_GRP_IMG_ALLOW_CONFIRM_NON_ACTIVE_IMAGE_SECONDARY, which the firmware's Kconfig
has; smp.c, smp_uart.c, serial_util.c at later commits whose receive logic matches the
firmware's disassembly; uart_mcumgr.c and smp_shell.c in their 3.2-3.4 forms), and checked
against the firmware itself: the build's ELF (Kconfig values, work queue priorities, slab
sizes) and ``tests/test_differential_renode.py``, which sends the same requests to Renode and
to the ``renode-stm32f4-disco`` preset and compares every answer byte for byte - and does the
same for the four other firmware folders (``stm32f4_disco-swap-move``, ``-overwrite-only``,
``-direct-xip-revert``, ``-multi-image``) against their presets, each with a sequence that
exercises its mode: all answers identical.

Sources of the mode models (each module names the functions it copies): mcu-tools/mcuboot
``boot/bootutil/src/loader.c`` (a 2023 revision with ``slot_usage[]`` passed around, close to
the firmware's 11ecbf6, and a 2024 one: swap / overwrite / direct-XIP / RAM-load branches,
``boot_verify_dependencies``, ``boot_select_or_erase``, ``boot_rom_address_check``,
``boot_copy_image``), ``bootutil_public.c`` (swap tables, ``boot_set_next``),
``boot/boot_serial/src/boot_serial.c`` (serial recovery), the nRF5340 image access hooks
(sdk-mcuboot ``boot/zephyr/nrf53_hooks.c``, sdk-nrf's ``boot_perform_update_hook`` variant,
Zephyr ``subsys/mgmt/mcumgr/bootutil_hooks/nrf53_hooks.c``), imgtool 2.5's ``image.py``
(flags, ENC TLVs); Zephyr img_mgmt ``img_mgmt_state.c`` (0014f3dc: next boot slot per mode,
direct-XIP states, slot in use, set next boot slot), ``img_mgmt.c`` (active slot, read info,
erase), ``zephyr_img_mgmt.c`` (upload slot choice, REJECT_DIRECT_XIP_MISMATCHED_SLOT,
``img_mgmt_write_pending``), ``os_mgmt.c`` (the 3.4-era bootloader-info table), the newer
``dfu_boot_get_active_slot`` (RAM load: BLINFO_RUNNING_SLOT).

What it fakes (behaviour copied from the sources named in each module):

* SMP server (``smp_server``): header/version/error handling of Zephyr ``smp.c`` (v1 and
  v2 error forms, v1 translation of group errors); answers encoded as zcbor writes them
  (``zcbor``: indefinite-length maps/arrays; ``cbor: canonical`` for CONFIG_ZCBOR_CANONICAL
  builds) in the handlers' key order. OS group: echo (0), reset (5), MCUmgr parameters (6),
  OS/application info (7), bootloader info (8) - the last three ENOTSUP unless enabled, as in
  the stock sample; image group: state read/write (0) with img_mgmt_state.c's flags and
  rules, upload (1) with img_mgmt.c / zephyr_img_mgmt.c's checks, sha resume, wrong-offset
  answers, ``match`` (only with ``image_check``), and erase (5). Unknown group/command ->
  ENOTSUP.
* MCUboot (``boot``): the trailer in each slot's last bytes (``flash``: magic, image_ok,
  copy_done, swap_info, swap_size, swap status at bootutil_priv.h's offsets) and, per
  ``mcuboot_mode``: swap using scratch / move (test, permanent, revert, resumable swap),
  overwrite-only (copy, secondary's header and trailer sectors erased, no revert, optional
  downgrade prevention), direct-XIP with and without revert (newest bootable slot runs in
  place, ROM_FIXED images in the wrong slot skipped, unconfirmed or unmarked images erased),
  RAM load, single application slot, firmware loader; N images with dependency TLVs and an
  nRF5340 network-core image (installed at reset, never reverted); validation of hash type,
  signature (imgtool through ``gateway.mcuboot``) and encrypted images (decrypted with the
  device's key while swapped in). Bytes an upload writes into the trailer area count, as on
  flash (a ``--pad --confirm`` image is a permanent request).
* img_mgmt's slot logic per mode (``img_state``): active slot, next boot slot, state flags,
  slot in use, state-write rules (rc 28 / 32 / 33), upload slot (direct-XIP: the inactive
  one; multi-image: the requested image's secondary) - including the direct-XIP "trap" of a
  test-marked image MCUboot keeps skipping (uploads and erases refused, rc 9) and the Kconfig
  options that avoid it.
* MCUboot serial recovery (``recovery``): MCUboot's own SMP server (SMP v1 answers, list,
  upload into the primary, reset), entered by the recovery pin, ``os reset {"boot_mode": 1}``
  (CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE), a frame in the wait-for-DFU window or when nothing
  is bootable - also for an application that no longer answers SMP (``app_smp_dead``).
* Flash (``flash``): slot0.bin/slot1.bin of ``slot_size`` bytes (0xFF erased) in
  ``state_dir/<id>/flash``; a simulator restart is a power cycle. Erase and programming
  take time (``flash_erase_sector_s`` per ``flash_sector_size``, ``flash_write_bps`` per
  CONFIG_IMG_BLOCK_BUF_SIZE block, the first chunk erasing the image area and the trailer
  sector unless ``erase_progressively``) and, with ``flash_stalls_cpu``, halt the CPU.
* Transports: UDP (one port per device, closed while rebooting; a request finding no free
  netbuf of the shared pool is dropped) and serial over a PTY (MCUmgr base64 line framing,
  input discarded while rebooting) received as ``serial_rx`` describes: ``transport: uart``
  (uart_mcumgr.c's RX buffers, freed by the system work queue) or ``shell`` (smp_shell.c's
  line buffers, drained by the low-priority shell thread; frames above the shell MTU get no
  answer); BLE (``ble``, a Bumble GATT peripheral).
* Link emulation (``link``): latency, bandwidth (FIFO serialization delay), loss,
  duplication, reordering, serial baud pacing, separate device RX/TX byte rates; seeded RNG.
* Requests are served one at a time in arrival order from one pool of ``buf_count``
  netbufs shared with the responses (Zephyr smp.c): the request being handled holds two
  (request + response); a request finding no free netbuf is dropped, and one handled while
  the queue holds every other buffer is answered ``{"rc": ENOMEM}`` unhandled (so at most
  ``buf_count - 1`` requests in flight are safe). Requests larger than ``buf_size`` (serial:
  ``buf_size - 4``, the frame length and CRC share the netbuf) are dropped.
* Application knobs: self-confirm after a delay, crash (watchdog) or hang on given
  versions (``hang_watchdog_s``: the hung image's watchdog resets it, so MCUboot reverts),
  never answering SMP at all (``app_smp_dead``), one reboot when an upload passes an
  offset, boot time, swap time (``swap_time_s`` or derived from the flash timings),
  ``time_scale`` for both.
* MCUboot swap progress: the swap runs sector by sector (``swap_sector_size``) with a status
  entry per sector in the primary trailer; a boot finds an interrupted swap and resumes it.
* Faults (``faults``): power cut once mid-swap / mid-copy / mid network-core update
  (``power_cut_during_swap``), once while img_mgmt writes a trailer
  (``power_cut_during_trailer_write``: torn magic or after the magic), a reset after
  which the device stays off until power-cycled (``dead_after_reset``), the serial cable
  pulled mid-upload and plugged back at the same path (``unplug_during_upload_at``),
  broken responses (``response_faults``: malformed CBOR, truncated, wrong sequence number,
  wrong group, oversized), firmware without image management
  (``img_mgmt_supported``).

Known differences from the real firmware, and why:

* Timing is modelled, not emulated: one CPU time per request, flash time per sector erased
  and per block programmed, swap time as one figure. The ``renode-stm32f4-disco`` numbers
  are medians fitted to measurements (presets.py); Renode's jitter (a chunk takes 20-170 ms)
  is not reproduced. The flash contents change when a request is taken up, its device time
  passes afterwards, so a reset in that window keeps a write real flash might have torn.
* Renode's emulated UART: the preset frees the RX line buffers only when the host's input
  pauses (``rx_free_when_idle``, see ``serial_rx.py``), found with an upload sweep on the
  firmware (2026-12-01): frames of 3 or 5 lines written at once lose lines, the same frames
  with 20 ms between lines all pass, a second frame right behind the first is lost. On the
  firmware the losses are random (Renode's host thread hands the PTY's bytes over in pieces
  whose timing depends on the machine's load: 3-line frames lost 27-36 % of chunks, 5-line
  frames nearly all, while raw echo probes passed a lone 4-5-line frame 5 times in 6); the
  model is deterministic: a frame of more lines than buffers written at once is always lost,
  so a fixed 266-byte packet setting fails on the simulator where it crawls on the firmware
  (0.7-1.0 kB/s). What the tuning learns is the same on both (176-byte packets, window 1). The
  preset's rates were fitted on a loaded host; on an idle one Renode takes the bytes about
  1.5x faster (176-byte chunks: ~33 ms each on the firmware, ~50 ms on the preset). The
  differential test resends a request that got no answer.
* A CPU stall (flash write on a real MCU) loses every line with a byte arriving during it;
  a real UART keeps the byte in its receive register (and FIFO, where there is one) and the
  line may survive or be cut at another place. Nothing is checked against real hardware:
  the Renode flash controller never stalls the CPU.
* Shell transport: the MTU limit (CONFIG_MCUMGR_TRANSPORT_SHELL_MTU, default 256) is applied
  to the SMP packet as the Kconfig help describes it and as the issue observed; the Zephyr
  3.4 code path enforcing it was not found in the sources read, and no shell build runs on
  Renode to check. Shell commands, the shell's echo/prompt and
  CONFIG_MCUMGR_TRANSPORT_SHELL_INPUT_TIMEOUT are not modelled.
* The swap itself is instantaneous step by step, then ``swap_time_s`` passes: a power cut
  can only fall between two ``swap_sector_size`` steps (``power_cut_during_swap``), not in
  the middle of a sector's erase/copy. No scratch area: the status lives in the primary
  trailer only, the trailers are written rather than exchanged, and at the end the
  secondary's trailer bytes (not its whole last sector) are erased. Swap using move is the
  same exchange (its move-up phase is not modelled, only its timing: two passes, not three).
* Encrypted images: the AES keys of a swap in progress are kept beside the slot files, not in
  the trailer's key fields (the trailer keeps its unencrypted size); ENC_KW (AES key wrap)
  images are not decrypted.
* Multi-image: a reboot between two images' swaps is resumed per image, but MCUboot's review
  of the other images' swap types (``boot_review_image_swap_types``) is not modelled. An
  nRF5340 network core's primary is modelled as unreadable by the application (the
  application's flash map cannot open ``mcuboot_primary_1``; unchecked on hardware) and the
  PCD copy takes no extra time.
* RAM load: img_mgmt behaves as in direct-XIP without revert (next boot = the newer slot), as
  the newer trees do with BLINFO_RUNNING_SLOT; the 3.4 tree the Renode firmware uses has no
  RAM-load support in img_mgmt.
* Serial recovery: MCUboot's UART line buffers are not modelled separately (the
  application's ``serial_rx`` model applies; frames above ``max_receive_size`` are dropped);
  no image state write (CONFIG_BOOT_SERIAL_IMG_GRP_IMAGE_STATE), slot info, direct image
  upload or encrypted uploads; only over the serial transport. The firmware loader is
  entered by the pin / boot mode / an invalid application only.
* MCUboot's console is not produced; boot events carry MCUboot-like log lines
  (``SimDevice.last_boot.log``) that are close to, not identical with, the real ones.
* Groups and commands not modelled: OS taskstat (the stock sample answers it; the simulator
  answers ENOTSUP), mpstat, datetime, reset ``force``/``boot_mode``; stat, settings, fs,
  shell and enum groups; the MCUmgr callback hooks. OS info values (kernel version, board)
  are invented when enabled.
* Not modelled: swap using offset (Zephyr 4.x; the secondary's image starts one sector in),
  RAM load with revert and single-slot RAM load, multi-image direct-XIP (Zephyr's img_mgmt
  refuses it too), hardware rollback counters / security counters, MCUboot's boot records and
  measured boot.
* Power loss at any other moment than mid-swap (e.g. mid flash write during an upload);
  a cable pull that also resets a USB-powered device (the device keeps running).
* UDP: a datagram larger than a netbuf is dropped (Zephyr's ``recvfrom`` into the netbuf
  truncates it); IPv4 only. BLE: see ``ble.py`` (scan response, supervision timeout,
  no pairing).
* Bootloader info, when enabled, answers as ``bootloader_info_era`` says: the Zephyr 3.4
  table (RAM load / firmware loader -> -1, never ``no-downgrade``: that os_mgmt.c tests
  ``IS_ENABLED(MCUBOOT_BOOTLOADER_NO_DOWNGRADE)`` without the CONFIG_ prefix) or the current
  one; the Renode presets use the former (unchecked: their builds answer ENOTSUP).
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
