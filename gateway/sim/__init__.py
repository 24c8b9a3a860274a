"""Device simulator: Zephyr ``smp_svr`` + MCUboot (swap mode), many devices per process.

For trying the gateway before hardware arrives, and for its tests and benchmarks.
``python -m gateway.sim --config sim.yaml`` (or :func:`run_simulator` / :class:`Simulator`).
``preset: NAME`` in a device's YAML (``gateway/sim/presets.py``: ``zephyr-uart``,
``zephyr-shell``, ``zephyr-udp``, ``renode-stm32f4-disco``) configures it as a given real build;
without a preset the defaults are the stock sample's (Zephyr 3.4 Kconfig defaults).

Sources: Zephyr 3.4.99 as built for ``shared/firmware/stm32f4_disco`` (the tree of
lgalstyan/nrf_connect's first commit; module pins zcbor 67fd8bb, MCUboot 11ecbf6 of
2023-08-25). The Zephyr sources were read from the stored zephyrproject-rtos/zephyr copies
(img_mgmt_state.c at 0014f3dc: the 3.4-era ``img_mgmt_set_next_boot_slot`` with
CONFIG_MCUMGR_GRP_IMG_ALLOW_CONFIRM_NON_ACTIVE_IMAGE_SECONDARY, which the firmware's Kconfig
has; smp.c, smp_uart.c, serial_util.c at later commits whose receive logic matches the
firmware's disassembly; uart_mcumgr.c and smp_shell.c in their 3.2-3.4 forms), and checked
against the firmware itself: the build's ELF (Kconfig values, work queue priorities, slab
sizes) and ``tests/test_differential_renode.py``, which sends the same requests to Renode and
to the ``renode-stm32f4-disco`` preset and compares every answer byte for byte.

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
* MCUboot swap mode (``boot``): the trailer in each slot's last bytes (``flash``: magic,
  image_ok, copy_done, swap_info, swap_size, swap status at bootutil_priv.h's offsets), the
  swap-type table, test / permanent / revert, validation of the secondary (hash + signature
  against the device's own key) with erase on refusal, primary-slot validation. Bytes an
  upload writes into the trailer area count, as on flash (a ``--pad --confirm`` image is a
  permanent request).
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
  one reboot when an upload passes an offset, boot time, swap time (``swap_time_s`` or
  derived from the flash timings), ``time_scale`` for both.
* MCUboot swap progress: the swap runs sector by sector (``swap_sector_size``) with a status
  entry per sector in the primary trailer; a boot finds an interrupted swap and resumes it.
* Faults (``faults``): power cut once mid-swap (``power_cut_during_swap``), a reset after
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
* Renode's emulated UART loses lines at random when host bytes arrive in a burst (one
  4-5-line frame in ~6, about half of back-to-back frame pairs); the simulator's model is
  deterministic (an RX buffer is freed ``rx_work_latency_s`` after its line), so it never
  loses a lone frame and loses a given burst always or never. The differential test
  therefore resends a request that got no answer.
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
  secondary's trailer bytes (not its whole last sector) are erased.
* Groups and commands not modelled: OS taskstat (the stock sample answers it; the simulator
  answers ENOTSUP), mpstat, datetime, reset ``force``/``boot_mode``; stat, settings, fs,
  shell and enum groups; the MCUmgr callback hooks. OS info values (kernel version, board)
  are invented when enabled.
* Multi-image (only image 0, slots 0 and 1), direct-XIP, overwrite-only, RAM-load; encrypted
  images, downgrade prevention, hardware rollback counters, dependency TLVs.
* Power loss at any other moment than mid-swap (e.g. mid flash write during an upload);
  a cable pull that also resets a USB-powered device (the device keeps running).
* The console (MCUboot and Zephyr log lines on a second UART) is not produced.
* UDP: a datagram larger than a netbuf is dropped (Zephyr's ``recvfrom`` into the netbuf
  truncates it); IPv4 only. BLE: see ``ble.py`` (scan response, supervision timeout,
  no pairing).
* Bootloader info, when enabled, always reports the configured mode, never ``no-downgrade``.
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
