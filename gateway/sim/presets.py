"""Named device presets for the simulator: ``preset: NAME`` in a device's sim YAML.

Owns the mapping from a real firmware build to simulator knobs. A preset fills every field a
device does not set itself (explicit fields win; nested ``serial``/``udp`` sections are merged
key by key; a device that names another transport than the preset's drops the preset's one).

Presets and where each number comes from:

``zephyr-uart``
    Stock Zephyr 3.4 ``samples/subsys/mgmt/mcumgr/smp_svr`` (prj.conf + overlay-serial.conf)
    on an nRF52840 DK, SMP on its own UART at 115200 baud. Kconfig defaults:
    CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE 384 / _COUNT 4, CONFIG_UART_MCUMGR_RX_BUF_COUNT 2 /
    _RX_BUF_SIZE 128, MCUmgr parameters / OS info / bootloader info not built (ENOTSUP),
    no CONFIG_IMG_ENABLE_IMAGE_CHECK (no ``match``), no CONFIG_IMG_ERASE_PROGRESSIVELY
    (the first chunk erases the image area and the trailer sector: zephyr_img_mgmt.c
    ``img_mgmt_erase_image_data``). Flash: nRF52840 product specification v1.7 NVMC
    timings, t_ERASEPAGE 85 ms per 4 KiB page, t_WRITE 41 us per 32-bit word (~97 kB/s);
    the CPU is halted while the NVMC writes or erases (code runs from flash), so UART bytes
    arriving then are lost. Slots: Zephyr 3.4 ``nrf52840dk_nrf52840.dts`` partitions
    (slot0/slot1 0x76000, scratch 0x1e000), MCUboot swap using scratch. Swap time derived
    from the flash timings (3 erases + 3 writes per swapped byte).
``zephyr-shell``
    The same board with ``overlay-shell.conf`` (SMP over the shell UART, smp_shell.c):
    2 line buffers of 127 bytes (CONFIG_MCUMGR_TRANSPORT_SHELL_RX_BUF_COUNT, SMP_SHELL_RX_BUF_SIZE)
    drained by the low-priority shell thread, CONFIG_MCUMGR_TRANSPORT_SHELL_MTU 256;
    MCUmgr parameters would still report the netbuf pool (384/4) if they were built in.
``zephyr-udp``
    Stock smp_svr + overlay-udp.conf: UDP port 1337 (CONFIG_MCUMGR_TRANSPORT_UDP_PORT),
    netbuf pool 2048 x 2 (``subsys/mgmt/mcumgr/transport/Kconfig``: NETBUF_SIZE ``default 2048
    if MCUMGR_TRANSPORT_UDP``, NETBUF_COUNT ``default 2 if MCUMGR_TRANSPORT_UDP``; a datagram
    larger than a netbuf, or one that finds no free netbuf, is lost), parameters ENOTSUP;
    same flash timings as above. (Until 2026-12-01 this preset had the 384 x 4 pool of the
    other transports, which the stock UDP sample does not have.)
``zephyr-ble``
    The ``ble`` build of ../shared/zephyr-native (Zephyr 3.4.99 smp_svr, smp_bt.c with
    CONFIG_MCUMGR_TRANSPORT_BT_REASSEMBLY, ATT MTU 498): MCUmgr parameters answer buf_size
    2475, buf_count 4, but the reassembly of the next request holds one netbuf and each
    request being handled one for its answer, so a third request in flight finds none and its
    write without response is dropped silently (no ENOMEM, no log the central sees): the
    next answer names the earlier offset. Window 2 runs clean, 3 loses data (measured on the
    build: fixed window 2 nothing re-sent; window 3 84-162 % re-sent). Flash: the native
    flash simulator (no erase/write time to speak of).
``zephyr-native-shell``
    The ``shell`` build of ../shared/zephyr-native (Zephyr 3.4.99 smp_svr on native_sim_64,
    SMP over the shell UART on a PTY, shell MTU 256, 2 line buffers of 127 bytes): the shell
    UART is polled, so the line buffers free up only when the input pauses
    (``rx_free_when_idle``): a 3-line frame written at once loses its third line (README: 182
    bytes answered, 183 lost; paced, 380 answered). Found by
    ``tests/test_zephyr_native_differential.py`` (``zephyr-shell`` answered a 200-byte first
    chunk the build drops). Slots 0x69000, the native flash simulator (no flash timing).
``renode-stm32f4-disco``
    Exactly ``shared/firmware/stm32f4_disco`` (Zephyr 3.4.99 smp_svr + MCUboot 2023-08-25,
    swap using scratch, Renode 1.15.3): prj.conf + overlay-serial.conf +
    ``CONFIG_MCUMGR_GRP_OS_MCUMGR_PARAMS=y`` (answers buf_size 384, buf_count 4); OS info and
    bootloader info answer ENOTSUP (checked on the machine); slots 256 KiB in 128 KiB sectors
    (sectors 6-9 of the STM32F4), scratch 128 KiB; UART RX buffers 2 x 128 (read from the
    ELF: ``_k_mem_slab_buf_uart_mcumgr_slab`` 272 bytes). Timings measured on that Renode
    machine (2 shared cores, raw SMP over the host PTY, medians): echo round trip 5.2 ms,
    echo of 60/150/250 characters 16/34-42/70 ms, image state read 8-11 ms, an upload chunk
    of 64/128 bytes 20.6/29.7 ms (a 512-byte stream_flash block flush adds ~45 ms: the p90),
    the first chunk (erases 2 x 128 KiB) 15-50 ms. Fitted: the emulated UART ISR takes
    request bytes at ~7 kB/s and the answers leave at ~40 kB/s (``rx_bytes_per_s`` /
    ``tx_bytes_per_s``, no baud pacing: Renode's USART has none), 0.5 ms per request,
    flash programming ~11.4 kB/s, 10 ms per 128 KiB sector erase; Renode's flash controller
    never stalls the CPU. A reset without swap ~1 s, with a swap or revert 32-43 s (README),
    so ``swap_time_s`` 35 with ``time_scale`` 1.0 (real); set ``time_scale`` lower to run it
    fast. Line drops: one frame of 4-5 lines passes (5 of 6 tries), two frames of 2 lines
    (127 + ~11 bytes) written back to back lose the second about half the time, three such
    frames lose one (4 of 5), 1-line frames of 39 bytes are rarely lost. An upload sweep
    (2026-12-01) showed why frames of more than 2 lines fail: written with 20 ms between
    lines they all pass. Renode keeps the ISR reading while host bytes are queued, so the
    line buffers are freed only when the input pauses. Modelled deterministically
    (``rx_free_when_idle``): the buffers are freed 1 ms (``rx_work_latency_s``) after a pause
    in the input, so a frame of 3+ lines written at once, or a frame right behind another,
    loses lines; the tuning learns 176-byte packets and window 1, as on the firmware.
    The preset, probed the same way on the same (loaded) host: echo 10 ms, echo of 250
    characters 86 ms, state read 19 ms, 64-byte chunks 29 ms median / 74 ms p90, first chunk
    57 ms (asyncio's millisecond timer granularity adds a few ms per exchange); bursts of
    2-line frames answered K=2: 1-2, K=3: 1-2, K=4: 2-3, K=8: 4 (Renode: 1-2, 1-2, 1-3, 1-8).
    ``tests/test_differential_renode.py`` checks the answers byte for byte.
``renode-stm32f4-swap-move``, ``-overwrite-only``, ``-direct-xip-revert``, ``-multi-image``
    The sibling folders ``shared/firmware/stm32f4_disco-<mode>``: the same board, build tree,
    UART model and request timings as ``renode-stm32f4-disco``, each configured as its README
    says. Swap using move: slot0 0x08040000 384 KiB (one 128 KiB sector more), slot1
    0x080A0000 256 KiB, resets that swap 34-38 s (README). Overwrite-only: slots 256 KiB at
    0x08040000 / 0x08080000, no downgrade prevention; MCUboot copies 0xbc24 bytes, not the
    slot. Direct-XIP with revert: slots 256 KiB at 0x08040000 / 0x08080000 (images
    ``--rom-fixed`` to 0x40000 / 0x80000), img_mgmt built without
    REJECT_DIRECT_XIP_MISMATCHED_SLOT / ALLOW_ERASE_PENDING (the trap of its
    ``check-output-wrongslot-test-marked.txt``), CONFIG_MCUBOOT_BOOTLOADER_NO_DOWNGRADE=y.
    Multi-image: two images of 128 KiB slots (0x08040000, 0x08060000, 0x08080000,
    0x080A0000), scratch, CONFIG_MCUMGR_TRANSPORT_NETBUF_SIZE 512 (4 state entries do not fit
    384), a reset that swaps image 1 34 s (README); image 1's first image goes in
    ``extra_images: [{initial_image: ...}]``. Reset timings measured by
    ``tests/test_differential_renode.py`` (os reset answered -> SMP answers again, including
    CONFIG_MCUMGR_GRP_OS_RESET_MS 250 ms): a reset that copies nothing 0.43-0.56 s
    (``boot_time_s`` 0.2; the READMEs' 3-4 s are their check script's polling), an
    overwrite-only reset that copies a 48 KB image 6.5-7.9 s (``swap_time_s`` 6.5). All
    answer bootloader info ENOTSUP; when it is enabled they answer as Zephyr 3.4's os_mgmt.c
    (``bootloader_info_era: zephyr-3.4``).
``zephyr-nrf5340``
    nRF5340 DK application core (NCS-style): MCUboot swap using move for image 0 (4 KiB pages,
    primary one page larger), image 1 = the network core (``update: netcore``: installed at
    the reset that finds it marked, test or permanent alike, never reverted; its primary is
    not readable by the application), buffers 2475 (the Bluetooth overlay's; two images need
    more than 384), serial transport at 115200 as ``zephyr-uart``. Flash timings: the
    nRF52840's (the nRF5340 NVMC has the same page size; its datasheet figures are not
    modelled separately).
``zephyr-nrf52840-direct-xip``, ``zephyr-nrf52840-overwrite-only``
    ``zephyr-uart`` with MCUboot in direct-XIP with revert (slots at 0xC000 / 0x82000, images
    ``--rom-fixed``) or overwrite-only mode.
``zephyr-single-app-recovery``
    ``zephyr-uart`` with one application slot (MCUBOOT_SINGLE_APPLICATION_SLOT): updates only
    through MCUboot serial recovery, entered by ``os reset {"boot_mode": 1}``
    (CONFIG_MCUMGR_GRP_OS_RESET_BOOT_MODE + CONFIG_BOOT_SERIAL_BOOT_MODE), the recovery pin,
    or when no valid application is left.
``zephyr-firmware-loader``
    ``zephyr-uart`` with MCUboot's firmware loader mode: slot 0 the application, slot 1 (64
    KiB) a loader application (``loader_image``) running Zephyr's img_mgmt, booted by the
    recovery pin, ``os reset {"boot_mode": 1}`` or an invalid application.
"""

from __future__ import annotations

import copy
from typing import Any

_TRANSPORTS = ("udp", "serial", "ble")

# nRF52840 NVMC (product specification v1.7, "Electrical specification" of the NVMC)
_NRF52840_FLASH: dict[str, Any] = {
    "flash_write_bps": 97_000,
    "flash_write_block": 512,
    "flash_sector_size": 4096,
    "flash_erase_sector_s": 0.085,
    "flash_stalls_cpu": True,
    "erase_progressively": False,
}

_STOCK_SMP_SVR: dict[str, Any] = {
    "mcumgr_params_supported": False,
    "bootloader_info_supported": False,
    "os_info_supported": False,
    "image_check": False,
    "cbor": "zcbor",
    "buf_size": 384,
    "buf_count": 4,
    "mcuboot_mode": "swap-using-scratch",
    "slot_size": 0x76000,
    "request_processing_s": 0.001,
    "boot_time_s": 0.3,
    "reset_delay_s": 0.25,
    "swap_time_s": None,
    "hardware": "nrf52840dk_nrf52840",
    # MCUboot for the nRF52840 DK: write block 4 (BOOT_WRITE_SZ), CONFIG_BOOT_MAX_IMG_SECTORS
    # 128 (boot/zephyr Kconfig default); the swap moves 4 KiB pages
    "boot_write_align": 4,
    "boot_max_img_sectors": 128,
    "swap_sector_size": 4096,
    **_NRF52840_FLASH,
}

PRESETS: dict[str, dict[str, Any]] = {
    "zephyr-uart": {
        **_STOCK_SMP_SVR,
        "serial": {"baud": 115200, "transport": "uart", "rx_buf_count": 2, "rx_buf_size": 128,
                   "rx_work_latency_s": 20e-6},
    },
    "zephyr-shell": {
        **_STOCK_SMP_SVR,
        "serial": {"baud": 115200, "transport": "shell", "rx_buf_count": 2, "rx_buf_size": 127,
                   "rx_work_latency_s": 20e-6, "shell_mtu": 256},
    },
    "zephyr-udp": {
        **_STOCK_SMP_SVR,
        "buf_size": 2048,
        "buf_count": 2,
        "udp": {"port": 1337},
    },
    "zephyr-ble": {
        **_STOCK_SMP_SVR,
        "mcumgr_params_supported": True,
        "buf_size": 2475,
        "buf_count": 4,
        "hardware": "native_posix_64",
        "slot_size": 0x69000,
        "flash_write_bps": None,
        "flash_erase_sector_s": 0.0,
        "flash_stalls_cpu": False,
        # a 2449-byte chunk: ~50 ms at the measured 39-54 kB/s of window 2 (host thread + flash)
        "request_processing_s": 0.02,
        "ble": {"mtu": 498, "reassembly": True, "reassembly_netbuf": True, "name": "Zephyr"},
    },
    "zephyr-native-shell": {
        **_STOCK_SMP_SVR,
        "hardware": "native_sim_64",
        "slot_size": 0x69000,
        "flash_write_bps": None,
        "flash_erase_sector_s": 0.0,
        "flash_stalls_cpu": False,
        "serial": {"transport": "shell", "rx_buf_count": 2, "rx_buf_size": 127,
                   "rx_work_latency_s": 0.001, "rx_free_when_idle": True, "shell_mtu": 256},
    },
    "renode-stm32f4-disco": {
        **_STOCK_SMP_SVR,
        "mcumgr_params_supported": True,
        "hardware": "stm32f4_disco",
        "slot_size": 0x40000,
        "request_processing_s": 0.0005,
        # Renode: flash programming is a tag write per byte in STM32F4_FlashController; a
        # 512-byte block flush measured ~45 ms extra -> ~11.4 kB/s
        "flash_write_bps": 11_400,
        "flash_write_block": 512,
        "flash_sector_size": 0x20000,
        "flash_erase_sector_s": 0.010,
        # mcuboot.elf: flash_stm32_parameters.write_block_size 1, boot_status_off computes
        # 16 sectors x 3 states (CONFIG_BOOT_MAX_IMG_SECTORS=16); sectors 6-9 are 128 KiB
        "boot_write_align": 1,
        "boot_max_img_sectors": 16,
        "swap_sector_size": 0x20000,
        "flash_stalls_cpu": False,
        "boot_time_s": 1.0,
        "swap_time_s": 35.0,
        "time_scale": 1.0,
        "serial": {"transport": "uart", "rx_buf_count": 2, "rx_buf_size": 128,
                   "rx_bytes_per_s": 7_000, "tx_bytes_per_s": 40_000,
                   "rx_work_latency_s": 0.001, "rx_free_when_idle": True},
        "flash_offsets": [0x40000, 0x80000],
        "bootloader_info_era": "zephyr-3.4",
    },
}

_RENODE = PRESETS["renode-stm32f4-disco"]
_UART = PRESETS["zephyr-uart"]
PRESETS.update({
    "renode-stm32f4-swap-move": {
        **_RENODE, "mcuboot_mode": "swap-using-move", "slot_size": 0x40000,
        "primary_slot_size": 0x60000, "flash_offsets": [0x40000, 0xA0000], "swap_time_s": 35.0,
        "boot_time_s": 0.2,
    },
    "renode-stm32f4-overwrite-only": {
        **_RENODE, "mcuboot_mode": "overwrite-only", "flash_offsets": [0x40000, 0x80000],
        "swap_time_s": 6.5, "boot_time_s": 0.2,
    },
    "renode-stm32f4-direct-xip-revert": {
        **_RENODE, "mcuboot_mode": "direct-xip-with-revert", "flash_offsets": [0x40000, 0x80000],
        "boot_time_s": 0.2,
    },
    "renode-stm32f4-multi-image": {
        **_RENODE, "slot_size": 0x20000, "extra_images": [{"slot_size": 0x20000}],
        "flash_offsets": [0x40000, 0x60000, 0x80000, 0xA0000], "buf_size": 512,
        "swap_time_s": 33.0, "boot_time_s": 0.2,
    },
    "zephyr-nrf5340": {
        **_UART, "hardware": "nrf5340dk_nrf5340_cpuapp", "mcuboot_mode": "swap-using-move",
        "slot_size": 0x76000, "primary_slot_size": 0x77000, "buf_size": 2475,
        "extra_images": [{"slot_size": 0x40000, "update": "netcore"}],
    },
    "zephyr-nrf52840-direct-xip": {
        **_UART, "mcuboot_mode": "direct-xip-with-revert", "flash_offsets": [0xC000, 0x82000],
    },
    "zephyr-nrf52840-overwrite-only": {**_UART, "mcuboot_mode": "overwrite-only"},
    "zephyr-single-app-recovery": {
        **_UART, "mcuboot_mode": "single-app", "os_reset_boot_mode": True,
        "serial_recovery": {"boot_mode": True, "no_application": True},
    },
    "zephyr-firmware-loader": {
        **_UART, "mcuboot_mode": "firmware-loader", "primary_slot_size": 0xE0000,
        "slot_size": 0x10000, "os_reset_boot_mode": True,
    },
})


def preset_names() -> list[str]:
    return sorted(PRESETS)


def apply_preset(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a device's raw config) laid over preset ``name``; explicit fields win."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(preset_names())}")
    base = copy.deepcopy(PRESETS[name])
    explicit_transport = [t for t in _TRANSPORTS if data.get(t) is not None]
    if explicit_transport:
        for t in _TRANSPORTS:
            if t not in explicit_transport:
                base.pop(t, None)
    out = dict(base)
    for key, value in data.items():
        if key in _TRANSPORTS and value is None:
            continue  # an unset transport (e.g. model_dump's None) does not clear the preset's
        if key == "extra_images" and isinstance(value, list) and isinstance(out.get(key), list):
            # image by image: the device names its files, the preset keeps the layout
            merged = []
            for i, item in enumerate(value):
                item = item.model_dump(exclude_unset=True) if hasattr(item, "model_dump") else item
                have = out[key][i] if i < len(out[key]) else {}
                merged.append({**have, **item} if isinstance(item, dict) else item)
            out[key] = merged
            continue
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        elif hasattr(value, "model_dump") and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value.model_dump(exclude_unset=True)}
        else:
            out[key] = value
    for t in _TRANSPORTS:
        out.setdefault(t, None)
    return out
