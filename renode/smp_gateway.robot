*** Comments ***
smp-gateway against Zephyr smp_svr + MCUboot (swap-using-scratch) on an emulated
STM32F4-Discovery. SMP runs over usart2, which Renode exposes to the host as a PTY.

Run (from the repository root, after building the images as in renode/README.md):
    renode-test renode/smp_gateway.robot

CI cannot install Renode: tests/test_renode_files.py runs `robot --dryrun` on this file with
stand-ins for Renode's keywords (renode/dryrun_keywords.resource) and checks the configs.


*** Settings ***
Documentation       smp-gateway updates an emulated STM32F4-Discovery over a UART PTY:
...                 v1 -> v2 is confirmed; an image the application never confirms is reverted.
Library             OperatingSystem
Library             Process
Library             String
Resource            ${RENODEKEYWORDS}


*** Variables ***
${WORK}                 ${CURDIR}/work
${IMAGES}               ${CURDIR}/work/images
${PTY}                  ${CURDIR}/work/uart.pty
${UART}                 sysbus.usart2
${GATEWAY}              smp-gateway
# wall time: a swap or revert took ~35 s, the upload runs at ~4.5 kB/s
${BOOT_TIMEOUT}         120
${GATEWAY_TIMEOUT}      900s


*** Test Cases ***
Gateway Updates V1 To V2 And Confirms It
    [Documentation]    One `smp-gateway run --once` pass: upload v2, mark for test, reset,
    ...                MCUboot swaps, health check, confirm. The device then runs 2.0.0, confirmed.
    Create Disco Running V1
    Publish Image    2.0.0
    ${result}=    Run Gateway    run    --once    --config    ${CURDIR}/gateway.yaml
    Should Be Equal As Integers    ${result.rc}    0    gateway failed: ${result.stdout}
    Should Contain    ${result.stdout}    device=disco result=updated
    Should Contain    ${result.stdout}    to=2.0.0
    Wait For Line On Uart    Swap type: test    timeout=${BOOT_TIMEOUT}
    Wait For Line On Uart    Booting Zephyr    timeout=${BOOT_TIMEOUT}
    ${status}=    Run Gateway    status    --config    ${CURDIR}/gateway.yaml
    Should Be Equal As Integers    ${status.rc}    0    status failed: ${status.stdout}
    Should Match Regexp    ${status.stdout}    disco\\s.*2\\.0\\.0.*confirmed

Unconfirmed Image Is Reverted
    [Documentation]    confirm: app with an application that never confirms itself (smp_svr):
    ...                v3 test-boots, the gateway waits app_confirm_s, resets, MCUboot reverts
    ...                to v1; the pass reports rolled-back and exits 1.
    Create Disco Running V1
    Publish Image    3.0.0
    ${result}=    Run Gateway    run    --once    --config    ${CURDIR}/gateway-app.yaml
    Should Be Equal As Integers    ${result.rc}    1    expected a failed pass: ${result.stdout}
    Should Contain    ${result.stdout}    device=disco result=rolled-back
    Should Contain    ${result.stdout}    did not confirm
    Wait For Line On Uart    Swap type: revert    timeout=${BOOT_TIMEOUT}
    ${status}=    Run Gateway    status    --config    ${CURDIR}/gateway-app.yaml
    Should Be Equal As Integers    ${status.rc}    0    status failed: ${status.stdout}
    Should Match Regexp    ${status.stdout}    disco\\s.*1\\.0\\.0.*confirmed


*** Keywords ***
Prepare Work Files
    [Documentation]    Renode starts with zeroed flash: an erased (0xFF) 1 MiB image goes in
    ...                first. Gateway state from earlier runs is dropped.
    Directory Should Exist    ${IMAGES}    build the images first (renode/README.md)
    File Should Exist    ${IMAGES}/mcuboot.bin
    File Should Exist    ${IMAGES}/smp_svr-1.0.0.signed.bin
    File Should Exist    ${WORK}/keys/signing.pem
    ${erased}=    Evaluate    '\\xff' * 0x100000
    Create Binary File    ${WORK}/erased-1M.bin    ${erased}
    Remove Directory    ${WORK}/gateway-state    recursive=True
    Remove Directory    ${WORK}/gateway-state-app    recursive=True
    Remove Directory    ${WORK}/updates    recursive=True
    Create Directory    ${WORK}/updates

Create Disco Running V1
    Prepare Work Files
    Execute Command    $repl=@${CURDIR}/stm32f4_disco_offline.repl
    Execute Command    $erased=@${WORK}/erased-1M.bin
    Execute Command    $mcuboot=@${IMAGES}/mcuboot.bin
    Execute Command    $app=@${IMAGES}/smp_svr-1.0.0.signed.bin
    Execute Command    $pty="${PTY}"
    Execute Script    ${CURDIR}/stm32f4_disco_mcuboot.resc
    Create Terminal Tester    ${UART}    timeout=${BOOT_TIMEOUT}
    Start Emulation
    Wait For Line On Uart    Starting bootloader    timeout=${BOOT_TIMEOUT}
    Wait For Line On Uart    Booting Zephyr    timeout=${BOOT_TIMEOUT}

Publish Image
    [Arguments]    ${version}
    [Documentation]    The local update source: one signed image and a manifest naming it.
    Copy File    ${IMAGES}/smp_svr-${version}.signed.bin    ${WORK}/updates/
    Create File    ${WORK}/updates/manifest.yaml
    ...    images: [{file: smp_svr-${version}.signed.bin, hardware: stm32f4_disco}]\n

Run Gateway
    [Arguments]    @{args}
    [Documentation]    smp-gateway with renode/ as working directory (the configs' serial port
    ...                path is relative to it); output goes to the Robot log.
    ${result}=    Run Process    ${GATEWAY}    @{args}    cwd=${CURDIR}
    ...    timeout=${GATEWAY_TIMEOUT}    on_timeout=terminate
    Log    ${result.stdout}
    Log    ${result.stderr}
    RETURN    ${result}
