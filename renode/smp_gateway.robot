*** Comments ***
smp-gateway against real firmware: MCUboot (swap using scratch, ECDSA P-256) + Zephyr 3.4
smp_svr on Renode's STM32F4-Discovery, from ../shared/firmware/stm32f4_disco used as it is.
SMP runs over usart2, which Renode exposes as a PTY; MCUboot and Zephyr log on usart1.

Run (from the repository root; the pytest wrapper tests/test_renode_suite.py does this):
    TMPDIR=$PWD/build/renode-tmp ../shared/renode/renode-test -r build/renode-results renode/smp_gateway.robot
Variables: FIRMWARE:/abs/firmware/dir (default: $SMPGW_SHARED or ../shared, stm32f4_disco),
UPLOAD_EVERY_CASE:True (the rollback, mid-swap-reset and refused-at-boot cases then upload
their image through the gateway instead of finding it already in slot1).

Each test starts a fresh machine (renode-test resets the emulation between tests) and its own
work folder under the results directory: gateway config, keys, update directory, PTY, console
log and the gateway's output (gateway-N.log).


*** Settings ***
Documentation       smp-gateway updates, rolls back, resumes and refuses on real MCUboot + Zephyr.
Library             Process
Library             OperatingSystem
Library             String
Library             gateway_keywords.py
Suite Setup         Suite Setup With Firmware
Test Teardown       Stop Gateway And Reset
Test Timeout        15 minutes


*** Variables ***
${FIRMWARE}             ${EMPTY}
# Renode 1.15.3 cannot snapshot a machine with a PTY terminal ("Pointer or ThreadLocal ...
# encountered during serialization"): on failure keep the logs, skip renode-test's snapshot
${CREATE_SNAPSHOT_ON_FAIL}    False
${UPLOAD_EVERY_CASE}    False
${SLOT0}                0x08040000
${SLOT1}                0x08080000
# Terminal tester timeouts are in emulated time; a swap is a few emulated seconds (35-75 s wall)
${UART_TIMEOUT}         120
# one gateway run (wall time): uploads run at ~0.3-4.5 kB/s, swaps take up to ~75 s here
${GATEWAY_TIMEOUT}      12 min
${V1_HASH}              b3bf0a29a3edbbdb770817da469c7dea0ab6f2047e60cbcbe8c1d8358bcbbcda
${V2_HASH}              043c6b01948cf5ee35f864450d5b0b119ebad25e8ab34851392e798d50bd5432
${V3_HASH}              67b5a2d4118b33fa615ef18fa1c3d283ad5ceba820948989726e15dc9a6b6a15


*** Test Cases ***
Gateway Updates V1 To V2 And Confirms It
    [Documentation]    One `run --once` pass: upload 2.0.0 to slot1, mark for test, reset, MCUboot
    ...                swaps, health check, confirm. LwM2M result 1; the board runs 2.0.0 confirmed.
    [Tags]    upload    swap
    ${work}=    Start Test Board    gateway.yaml
    Publish Image    ${work}    ${FIRMWARE}/smp_svr-2.0.0.signed.bin
    ${run}=    Run Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    0    gateway failed (see gateway-1.log): ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    updated
    Should Be Equal    ${out}[lwm2m_result]    1
    Report Should Be    ${work}    1    confirmed by the gateway
    Wait For Line On Uart    Swap type: test
    Wait For Line On Uart    Starting swap using scratch algorithm.
    Slot Should Hold    ${work}/uart.pty    0    2.0.0    ${V2_HASH}    active=True    confirmed=True
    Slot Should Hold    ${work}/uart.pty    1    1.0.0    ${V1_HASH}    pending=False

Image The Application Never Confirms Is Reverted And Reported As A Rollback
    [Documentation]    confirm: app with smp_svr, which never calls boot_write_img_confirmed():
    ...                3.0.0 test-boots, the gateway waits app_confirm_s, resets, MCUboot reverts
    ...                to 1.0.0. Reported: rolled-back, LwM2M 8 (update failed), "did not confirm".
    [Tags]    swap    revert
    ${v3}=    Set Variable    ${FIRMWARE}/smp_svr-3.0.0.signed.bin
    ${work}=    Start Test Board    gateway-app.yaml    ${v3}
    Publish Image    ${work}    ${v3}
    ${run}=    Run Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    1    expected a failed pass: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    rolled-back
    Should Be Equal    ${out}[lwm2m_result]    8
    Report Should Be    ${work}    8    did not confirm 3.0.0    reverted to 1.0.0
    Wait For Line On Uart    Swap type: test
    Wait For Line On Uart    Swap type: revert
    Slot Should Hold    ${work}/uart.pty    0    1.0.0    ${V1_HASH}    active=True    confirmed=True
    Slot Should Hold    ${work}/uart.pty    1    3.0.0    ${V3_HASH}    pending=False

Gateway Killed Mid-Upload Resumes From The Device Offset
    [Documentation]    SIGKILL the gateway once the journal holds >= 16 KiB acknowledged; the
    ...                restarted pass resumes from the offset the device reports for the same
    ...                `sha` (img_mgmt upload resume), sends less than the image, and ends updated.
    [Tags]    upload    resume    swap
    ${v2}=    Set Variable    ${FIRMWARE}/smp_svr-2.0.0.signed.bin
    ${size}=    Get File Size    ${v2}
    ${work}=    Start Test Board    gateway.yaml
    Publish Image    ${work}    ${v2}
    @{cmd}=    Gateway Command
    Start Process    @{cmd}    -v    run    --once    --config    gateway.yaml    cwd=${work}
    ...    stdout=${work}/gateway-1.log    stderr=STDOUT    alias=gateway
    ${at_kill}=    Wait For Upload Offset    ${work}    16384    timeout=600
    Send Signal To Process    SIGKILL    gateway
    ${killed}=    Wait For Process    gateway    timeout=30 s    on_timeout=kill
    Should Be Equal As Integers    ${killed.rc}    -9    the gateway was not killed mid-upload: ${killed.stdout}
    ${run}=    Run Gateway Once    ${work}    n=2
    Should Be Equal As Integers    ${run.rc}    0    resumed pass failed: ${run.stdout}
    ${resumed}=    Upload Resumed From    ${run.stdout}
    Log    killed with ${at_kill} B checkpointed; resumed from ${resumed} B of ${size}    console=True
    Should Be True    ${resumed} >= ${at_kill}    resumed from ${resumed}, below the ${at_kill} B acknowledged before the kill
    Should Be True    ${resumed} < ${size}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    updated
    Report Should Be    ${work}    1    confirmed by the gateway
    Slot Should Hold    ${work}/uart.pty    0    2.0.0    ${V2_HASH}    active=True    confirmed=True

Board Reset In Mid-Swap Resumes The Swap And The Gateway Reports The Truth
    [Documentation]    While MCUboot swaps 2.0.0 in, the board is reset from the Renode monitor
    ...                (flash kept) once slot1's header already holds 1.0.0's (the primary's first
    ...                sector moved out) - the moment neither slot holds a whole image. MCUboot
    ...                resumes the swap from its status area; the gateway, still waiting for
    ...                the board, reports what the board runs: updated, LwM2M 1.
    [Tags]    swap    power-loss
    ${v2}=    Set Variable    ${FIRMWARE}/smp_svr-2.0.0.signed.bin
    ${work}=    Start Test Board    gateway.yaml    ${v2}
    Publish Image    ${work}    ${v2}
    @{cmd}=    Gateway Command
    Start Process    @{cmd}    run    --once    --config    gateway.yaml    cwd=${work}
    ...    stdout=${work}/gateway-1.log    stderr=STDOUT    alias=gateway
    Wait For Line On Uart    Swap type: test    timeout=900
    Wait For Line On Uart    Starting swap using scratch algorithm.
    Wait Until Keyword Succeeds    180 s    0.1 s    Header Version Should Be    ${SLOT1}    1
    ${primary}=    Header Version    ${SLOT0}
    Execute Command    machine Reset
    Log    reset in mid-swap: slot1 header = 1.x, slot0 header major = ${primary}    console=True
    Wait For Line On Uart    Starting bootloader
    Wait For Line On Uart    Jumping to the first image slot
    ${run}=    Wait For Process    gateway    timeout=${GATEWAY_TIMEOUT}    on_timeout=kill
    Log    ${run.stdout}
    Should Be Equal As Integers    ${run.rc}    0    gateway failed after the mid-swap reset: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    updated
    Report Should Be    ${work}    1    confirmed by the gateway
    ${console}=    Get File    ${work}/console.log
    Should Contain X Times    ${console}    Starting bootloader    3    boot, swap, resumed swap
    # MCUboot found its swap status: the last boot resumes the swap (no new "Swap type:" decision)
    ${last_boot}=    Evaluate    $console.rsplit('Starting bootloader', 1)[1]
    Should Contain    ${last_boot}    Starting swap using scratch algorithm.    MCUboot did not resume the swap
    Should Not Contain    ${last_boot}    Swap type:    MCUboot started a new swap instead of resuming
    Slot Should Hold    ${work}/uart.pty    0    2.0.0    ${V2_HASH}    active=True    confirmed=True
    Slot Should Hold    ${work}/uart.pty    1    1.0.0    ${V1_HASH}    pending=False

Image Signed With A Key MCUboot Does Not Trust Is Refused At Boot And Reported
    [Documentation]    The gateway trusts a second key; this MCUboot does not. The image passes
    ...                the gateway's checks, is marked for test, and MCUboot refuses it at the
    ...                reset (erases slot1, keeps 1.0.0). Reported: rolled-back, LwM2M 8 (update
    ...                failed, as nRF Connect SDK's LwM2M client reports an image that did not
    ...                boot), and a detail naming MCUboot and the signing key.
    [Tags]    refused-at-boot
    ${work}=    Prepare Test Work Dir    gateway-two-keys.yaml
    Make Key    ${work}/keys/other-key.pem
    ${other}=    Sign Image    ${FIRMWARE}    ${work}/keys/other-key.pem    2.0.0    ${work}/other-2.0.0.signed.bin
    Start Test Board In    ${work}    ${other}
    Publish Image    ${work}    ${other}
    ${run}=    Run Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    1    expected a failed pass: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    rolled-back
    Should Be Equal    ${out}[lwm2m_result]    8
    Report Should Be    ${work}    8    MCUboot refused 2.0.0    signed with the key
    Wait For Line On Uart    Image in the secondary slot is not valid!
    Slot Should Hold    ${work}/uart.pty    0    1.0.0    ${V1_HASH}    active=True    confirmed=True
    Slot Should Be Empty    ${work}/uart.pty    1

Image The Gateway Does Not Trust Is Refused With Zero Bytes Sent
    [Documentation]    Signed with a key outside trusted_keys: refused before a byte is sent.
    ...                slot1 held 3.0.0 before the pass and still holds exactly it afterwards.
    ...                Then a trusted image padded with a permanent-install trailer
    ...                (imgtool --pad --confirm): refused too, slot1 still 3.0.0, no swap.
    [Tags]    refused
    ${v3}=    Set Variable    ${FIRMWARE}/smp_svr-3.0.0.signed.bin
    ${work}=    Prepare Test Work Dir    gateway.yaml
    Make Key    ${work}/untrusted-key.pem
    ${bad}=    Sign Image    ${FIRMWARE}    ${work}/untrusted-key.pem    2.0.0    ${work}/untrusted-2.0.0.signed.bin
    Start Test Board In    ${work}    ${v3}    always=True
    Publish Image    ${work}    ${bad}
    ${run}=    Run Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    1    expected a failed pass: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    refused
    Should Be Equal    ${out}[lwm2m_result]    5
    Should Be Equal    ${out}[wire_bytes]    0
    Report Should Be    ${work}    5    untrusted-signature
    Slot Should Hold    ${work}/uart.pty    1    3.0.0    ${V3_HASH}    pending=False    confirmed=False
    FOR    ${offset}    IN    0    0x200    0x4000    0xB000
        ${dev}=    Execute Command    sysbus ReadDoubleWord ${{ hex(${SLOT1} + ${offset}) }}
        ${file}=    File Word    ${v3}    ${offset}
        Should Be Equal As Integers    ${dev.strip()}    ${file}    slot1 changed at +${offset}
    END
    # review finding 2: a trusted image padded with MCUboot's trailer (image_ok set, as
    # `imgtool sign --pad --confirm` writes it) would be a permanent install: refused too (2.1.0:
    # the untrusted 2.0.0 above has the same image hash, which the gateway now blocks)
    ${padded}=    Sign Padded Confirmed Image    ${FIRMWARE}    ${FIRMWARE}/signing-key.pem    2.1.0
    ...    ${work}/padded-confirmed-2.1.0.signed.bin
    Publish Image    ${work}    ${padded}
    ${run}=    Run Gateway Once    ${work}    n=2
    Should Be Equal As Integers    ${run.rc}    1    expected a failed pass: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    refused
    Should Be Equal    ${out}[wire_bytes]    0
    Report Should Be    ${work}    6    trailing-data    image_ok
    Slot Should Hold    ${work}/uart.pty    1    3.0.0    ${V3_HASH}    pending=False    confirmed=False
    ${console}=    Get File    ${work}/console.log
    Should Not Contain    ${console}    Swap type: test


*** Keywords ***
Suite Setup With Firmware
    Setup
    IF    "${FIRMWARE}" == ""
        ${fw}=    Firmware Dir    stm32f4_disco
        Set Suite Variable    ${FIRMWARE}    ${fw}
    END
    File Should Exist    ${FIRMWARE}/stm32f4_disco_mcuboot.resc
    Set Suite Variable    ${WORK_ROOT}    ${RESULTS_DIRECTORY}/work
    Log    firmware: ${FIRMWARE}    console=True

Prepare Test Work Dir
    [Arguments]    ${config}
    ${work}=    Prepare Work Dir    ${WORK_ROOT}    ${TEST NAME}    ${config}    ${FIRMWARE}
    Set Test Variable    ${WORK}    ${work}
    RETURN    ${work}

Start Test Board
    [Documentation]    A work folder with renode/${config} and a fresh board running 1.0.0.
    [Arguments]    ${config}    ${slot1_image}=${EMPTY}
    ${work}=    Prepare Test Work Dir    ${config}
    Start Test Board In    ${work}    ${slot1_image}
    RETURN    ${work}

Start Test Board In
    [Documentation]    A fresh machine from the firmware's .resc (erased flash, MCUboot, 1.0.0
    ...                confirmed in slot0). ${slot1_image} (not pending) is written to slot1
    ...                before the first boot, as an earlier pass that stopped after its upload
    ...                would have left it - unless UPLOAD_EVERY_CASE (then the gateway uploads
    ...                it) and not ${always}. Returns once smp_svr has booted.
    [Arguments]    ${work}    ${slot1_image}=${EMPTY}    ${always}=False
    Execute Command    $pty="${work}/uart.pty"
    Execute Command    include @${FIRMWARE}/stm32f4_disco_mcuboot.resc
    IF    "${slot1_image}" != "" and (${always} or not ${UPLOAD_EVERY_CASE})
        Execute Command    sysbus LoadBinary @${slot1_image} ${SLOT1}
    END
    Execute Command    usart1 CreateFileBackend @${work}/console.log true
    Create Terminal Tester    sysbus.usart1    timeout=${UART_TIMEOUT}
    Start Emulation
    Wait For Line On Uart    Image index: 0, Swap type: none
    Wait For Line On Uart    smp_sample: build time

Run Gateway Once
    [Documentation]    `smp-gateway -v run --once` in the test's work folder; output in gateway-N.log.
    [Arguments]    ${work}    ${n}=1
    @{cmd}=    Gateway Command
    ${run}=    Run Process    @{cmd}    -v    run    --once    --config    gateway.yaml
    ...    cwd=${work}    stdout=${work}/gateway-${n}.log    stderr=STDOUT
    ...    timeout=${GATEWAY_TIMEOUT}    on_timeout=kill
    Log    ${run.stdout}
    RETURN    ${run}

Header Version
    [Documentation]    Major version byte of the MCUboot image header at ${address} (ih_ver at +20).
    [Arguments]    ${address}
    ${b}=    Execute Command    sysbus ReadByte ${{ hex(${address} + 20) }}
    RETURN    ${{ int($b.strip(), 16) }}

Header Version Should Be
    [Arguments]    ${address}    ${major}
    ${v}=    Header Version    ${address}
    Should Be Equal As Integers    ${v}    ${major}

Stop Gateway And Reset
    # only the gateway this test started (Renode itself was started by renode-test)
    Run Keyword And Ignore Error    Terminate Process    gateway    kill=True
    Test Teardown
