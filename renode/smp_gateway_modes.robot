*** Comments ***
smp-gateway on the other MCUboot modes, one case per firmware folder beside stm32f4_disco
(swap using scratch is ../renode/smp_gateway.robot): ../shared/firmware/stm32f4_disco-swap-move,
-overwrite-only, -direct-xip-revert, -multi-image, used as they are. Same board, UARTs and
Renode tricks as the main suite; each case starts a fresh machine from the folder's .resc.

These builds answer bootloader info with ENOTSUP (Zephyr 3.4 without
CONFIG_MCUMGR_GRP_OS_BOOTLOADER_INFO), so each gateway config (renode/modes/) names the mode.
Where the case is not about the upload itself, the candidate is written into the secondary slot
before the first boot (what an earlier pass that stopped after its upload leaves behind) - the
time goes to what the case proves: a swap using move, an overwrite, the slot choice of
direct-XIP, a two-image set in one reset.

Run: python -m pytest tests/test_modes_renode.py (or renode-test renode/smp_gateway_modes.robot
with TMPDIR set, as renode/README.md says).


*** Settings ***
Documentation       smp-gateway drives every MCUboot mode of the shared Renode firmware.
Library             Process
Library             OperatingSystem
Library             gateway_keywords.py
Library             modes_keywords.py
Suite Setup         Modes Suite Setup
Test Teardown       Stop Gateway And Reset
Test Timeout        15 minutes


*** Variables ***
${CREATE_SNAPSHOT_ON_FAIL}    False
${UART_TIMEOUT}         120
${GATEWAY_TIMEOUT}      12 min
# image digests from each firmware folder's README
${SM_V1}                9c2334c621da2fd922eae3e662dcf2716885a7368e7d9e9f6eabb188644d9934
${SM_V2}                02fecd0a89bf185efd9d923e1a10fea2ccfa37b6fdac1014c6d595f9ed1ab05e
${OW_V2}                a4e1f7a4252a894f2cd156ce8e452f4d5dbd6c14ddbcde8634ad300be0f58c4f
${XIP_V1_S0}            e9a3b4cd9cff51191f4e2832ebfe40c2b049f7ef0b759bd9082c3a2d6e60f02d
${XIP_V2_S1}            76cc8006eacf59cd2a5cafe438d85c37ebf2ec7c0f08845a90401d5ebd36a6ad
${MI_V2}                4ca4208110ac9098ef184683b2c8ce8f8dd4f62b11bddba21dbea31aa8a8223a
${MI1_V2}               b3c0544e39c13909ddff80871c6a4825b21403860fab74eae6d3b7adaf90e09d


*** Test Cases ***
Swap Using Move: Update Confirmed After The Move Swap
    [Documentation]    mcuboot_mode: swap-using-move from the config (the device answers ENOTSUP).
    ...                2.0.0 already flashed into slot1: img_mgmt lists its hash (read from its
    ...                TLVs only), which proves nothing about the bytes before them, so it is
    ...                uploaded again; marked for test, reset, MCUboot "Starting swap using move
    ...                algorithm.", health check, confirm. LwM2M 1.
    [Tags]    modes    swap-move    upload
    ${fw}=    Firmware Dir    stm32f4_disco-swap-move
    ${work}=    Start Mode Board    ${fw}    modes/gateway-swap-move.yaml
    ...    ${fw}/img/v2.signed.bin@0x080A0000
    Publish Image    ${work}    ${fw}/img/v2.signed.bin
    ${run}=    Run Modes Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    0    gateway failed: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    updated
    Should Be Equal    ${out}[lwm2m_result]    1
    Should Contain    ${run.stdout}    mode=swap-using-move (config)
    Should Not Contain    ${run.stdout}    no upload
    @{sent}=    Uploaded Images    ${run.stdout}
    Length Should Be    ${sent}    1    uploads: ${sent}
    Report Should Be    ${work}    1    confirmed by the gateway
    Wait For Line On Uart    Image index: 0, Swap type: test
    Wait For Line On Uart    Starting swap using move algorithm.
    Slot Should Hold    ${work}/uart.pty    0    2.0.0    ${SM_V2}    active=True    confirmed=True
    Slot Should Hold    ${work}/uart.pty    1    1.0.0    ${SM_V1}    pending=False

Overwrite Only: Installed Permanently And Reported Without A Rollback Promise
    [Documentation]    The whole flow on real overwrite-only MCUboot: upload 2.0.0, test mark
    ...                (accepted by img_mgmt), reset: MCUboot erases slot0, copies slot1 over it and
    ...                erases slot1. Reported: updated, LwM2M 1, "installed permanently, no revert
    ...                possible"; the gateway sent no confirm (the image is confirmed at once).
    [Tags]    modes    overwrite-only    upload
    ${fw}=    Firmware Dir    stm32f4_disco-overwrite-only
    ${work}=    Start Mode Board    ${fw}    modes/gateway-overwrite-only.yaml
    Publish Image    ${work}    ${fw}/img/v2.signed.bin
    ${run}=    Run Modes Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    0    gateway failed: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    updated
    Should Be Equal    ${out}[lwm2m_result]    1
    Report Should Be    ${work}    1    installed permanently, no revert possible
    Should Not Contain    ${run.stdout}    step=confirm group decision
    Wait For Line On Uart    Erasing the primary slot
    Wait For Line On Uart    copying the secondary slot to the primary slot
    Slot Should Hold    ${work}/uart.pty    0    2.0.0    ${OW_V2}    active=True    confirmed=True
    Slot Should Be Empty    ${work}/uart.pty    1

Direct XIP With Revert: Build For The Inactive Slot Only
    [Documentation]    v1 runs in place from slot0. A release holding only the build linked for
    ...                slot0 is refused with zero bytes sent (uploaded into slot1 and test-marked it
    ...                would block every later upload: rc 9). The release with both slot builds:
    ...                the slot1 build is uploaded, test-marked, booted in place from slot1
    ...                ("Image 0 loaded from the secondary slot"), health-checked and confirmed.
    [Tags]    modes    direct-xip    upload    refused
    ${fw}=    Firmware Dir    stm32f4_disco-direct-xip-revert
    ${work}=    Start Mode Board    ${fw}    modes/gateway-direct-xip-revert.yaml
    Publish Image    ${work}    ${fw}/img/v2-slot0.signed.bin
    ${run}=    Run Modes Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    1    expected a refusal: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    refused
    Should Be Equal    ${out}[wire_bytes]    0
    Report Should Be    ${work}    6    wrong-slot    slot 1
    Slot Should Be Empty    ${work}/uart.pty    1
    Publish Slot Builds    ${work}    ${fw}/img/v2-slot0.signed.bin    ${fw}/img/v2-slot1.signed.bin
    ${run}=    Run Modes Gateway Once    ${work}    n=2
    Should Be Equal As Integers    ${run.rc}    0    gateway failed: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    updated
    Should Be Equal    ${out}[lwm2m_result]    1
    Report Should Be    ${work}    1    confirmed by the gateway    runs in place
    Wait For Line On Uart    Image 0 loaded from the secondary slot
    Slot Should Hold    ${work}/uart.pty    1    2.0.0    ${XIP_V2_S1}    active=True    confirmed=True
    Slot Should Hold    ${work}/uart.pty    0    1.0.0    ${XIP_V1_S0}

Multi Image: Two Images As One Set In One Reset
    [Documentation]    Image 0 2.0.0 already flashed into its secondary: its listed hash proves no
    ...                complete upload, so it is uploaded again; image 1 2.0.0 uploaded with
    ...                image=1; image 0 marked for test, image 1 marked permanent
    ...                (img_mgmt cannot confirm image 1 after a test swap: rc 32); one reset swaps
    ...                both ("Image index: 0, Swap type: test", "Image index: 1, Swap type: perm");
    ...                both checked; image 0 confirmed. LwM2M 1.
    [Tags]    modes    multi-image    upload
    ${fw}=    Firmware Dir    stm32f4_disco-multi-image
    ${work}=    Start Mode Board    ${fw}    modes/gateway-multi-image.yaml
    ...    ${fw}/img/v2.signed.bin@0x08060000
    Publish Image Set    ${work}    ${fw}/img/v2.signed.bin    ${fw}/img/image1-v2.signed.bin
    ${run}=    Run Modes Gateway Once    ${work}
    Should Be Equal As Integers    ${run.rc}    0    gateway failed: ${run.stdout}
    ${out}=    Outcome Line    ${run.stdout}
    Should Be Equal    ${out}[result]    updated
    Should Be Equal    ${out}[lwm2m_result]    1
    Report Should Be    ${work}    1    image 0 2.0.0: confirmed by the gateway
    ...    image 1 2.0.0: installed permanently
    @{sent}=    Uploaded Images    ${run.stdout}
    Length Should Be    ${sent}    2    uploads: ${sent}
    Should Start With    ${sent}[0]    image 0
    Should Start With    ${sent}[1]    image 1
    Wait For Line On Uart    Image index: 0, Swap type: test
    Wait For Line On Uart    Image index: 1, Swap type: perm
    Image Slot Should Hold    ${work}/uart.pty    0    0    2.0.0    ${MI_V2}    active=True    confirmed=True
    Image Slot Should Hold    ${work}/uart.pty    1    0    2.0.0    ${MI1_V2}    confirmed=True


*** Keywords ***
Modes Suite Setup
    Setup
    Set Suite Variable    ${WORK_ROOT}    ${RESULTS_DIRECTORY}/work

Start Mode Board
    [Documentation]    A work folder with ${config} and a fresh machine from ${fw}'s .resc; each
    ...                ${preload} is FILE@ADDRESS, written to flash before the first boot.
    ...                Returns once smp_svr has booted.
    [Arguments]    ${fw}    ${config}    @{preload}
    ${work}=    Prepare Work Dir    ${WORK_ROOT}    ${TEST NAME}    ${config}    ${fw}
    Set Test Variable    ${WORK}    ${work}
    Execute Command    $pty="${work}/uart.pty"
    Execute Command    include @${fw}/stm32f4_disco_mcuboot.resc
    FOR    ${item}    IN    @{preload}
        ${file}    ${address}=    Evaluate    $item.rsplit('@', 1)
        Execute Command    sysbus LoadBinary @${file} ${address}
    END
    Execute Command    usart1 CreateFileBackend @${work}/console.log true
    Create Terminal Tester    sysbus.usart1    timeout=${UART_TIMEOUT}
    Start Emulation
    Wait For Line On Uart    smp_sample: build time
    RETURN    ${work}

Run Modes Gateway Once
    [Documentation]    `smp-gateway -v run --once` in the test's work folder; output in gateway-N.log.
    [Arguments]    ${work}    ${n}=1
    @{cmd}=    Gateway Command
    ${run}=    Run Process    @{cmd}    -v    run    --once    --config    gateway.yaml
    ...    cwd=${work}    stdout=${work}/gateway-${n}.log    stderr=STDOUT
    ...    timeout=${GATEWAY_TIMEOUT}    on_timeout=kill
    Log    ${run.stdout}
    RETURN    ${run}

Stop Gateway And Reset
    Run Keyword And Ignore Error    Terminate Process    kill=True
    Test Teardown
