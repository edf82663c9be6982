#!/bin/sh
# Test-bed stage of scripts/e2e-vfio: QEMU's edu device (PCI 1234:11e8, behind the emulated
# Intel IOMMU) bound to vfio-pci and passed by our VMM to the probe guest (`edu=1`), which
# checks the identification and liveness registers, runs DMA round trips between its RAM and
# the device buffer and counts the MSIs. Passes when the probe reports, with errors=0, the edu
# identity, live=ok, at least $min_dma transfers and one MSI per transfer.
#
# Runs the VMM once per case named by e2e_vfio_backends= on the kernel command line
# (default "iommufd container restart"; "add-device" adds the vm.add-device case below): iommufd (vfio cdev + /dev/iommu, RAM mapped by
# memfd), and container (the same with /dev/iommu removed, so the VMM falls back to the group
# and container API). The iommufd run also asks for a live update with ch-luod in kernel mode
# (/dev/liveupdate): the VMM must refuse it, saying the device cannot cross a kexec, and the
# guest must run on with its DMA and interrupts.
# restart: restart-mode live updates (`ch-luod --emulate`, a successor pre-started with
# `--restore source_url=luo://NAME`, `ch-remote live-update`), first of a probe guest without
# the device (the baseline pause), then up to $max_updates in a row of one driving edu (each
# successor hands the adopted device on), until the pause caught a transfer in flight (status
# every 100 ms: round trips of two 100 ms transfers back to back, so the guest is nearly always
# waiting for one). After
# each: the successor adopted the device (no attach, so no reset), the guest's dma and irqs go
# on rising with one MSI per transfer and errors=0, the liveness mark and the PCI command
# register (memory, bus master) are as the guest left them. Last, an update cancelled after the
# pause (CHV_TEST_LIVE_UPDATE_FAIL_AT=save) must leave the VMM driving the device as before.
# Markers: E2E-VFIO-BOUND, E2E-VFIO-RESULT <backend>: <edu line>, E2E-VFIO-REFUSED <answer>,
# E2E-VFIO-BASELINE <status line>, E2E-VFIO-RESTART <n>: <figures>, E2E-VFIO-CANCELLED
# <figures>, E2E-VFIO-HOTADD <reply> | handed over: <status line>, E2E-VFIO-PASS or
# E2E-VFIO-FAIL: why.

# shellcheck source=guest/vfio/lib.sh
. /lib/vfio-stage.sh
work=/tmp/vfio
min_dma=10
max_updates=3
backends=$(arg e2e_vfio_backends "iommufd container restart" | tr , ' ')

fail() {
    {
        dump_logs 30 "$work/vmm.log" "$work"/vmm-*.log "$work/serial.log" "$work/luod.log" "$work/emu.log"
        # The host stops reading at the marker: let the lines above reach it first.
        sleep 2
        echo "E2E-VFIO-FAIL: $*"
    }
    reboot -f
    exit 1
}
for f in /lib/vfio-stage.sh /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/probe-guest.elf; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
mkdir -p "$work" || fail "cannot create $work"

bind_edu
group=$(basename "$(readlink "$dev/iommu_group")")
echo "E2E-VFIO-BOUND $bdf group=$group cdev=$(ls "$dev/vfio-dev" 2>/dev/null) iommu=$([ -c /dev/iommu ] && echo yes || echo no)"

# The probe's last complete edu line.
edu_line() { tr -d '\r' 2>/dev/null <"$work/serial.log" | sed '$d' | grep -o 'probe: edu id=.* errors=[0-9]*$' | tail -n1; }
field() { echo "$1" | grep -o " $2=[0-9a-z]*" | cut -d= -f2; }

agent_socket=$work/luod.sock
api_socket=$work/api.sock

start_agent() { start_kernel_agent "$agent_socket" "$work/luod.log"; }

# Waits until the probe has done $1 transfers or more; the last edu line is in $line.
wait_dma() {
    t=$(now)
    line=""
    while :; do
        kill -0 "$vmm" 2>/dev/null || fail "$backend: the VMM exited"
        line=$(edu_line)
        dma=$(field "$line" dma)
        [ -n "$dma" ] && [ "$dma" -ge "$1" ] && break
        tr -d '\r' 2>/dev/null <"$work/serial.log" | grep -q 'probe: edu \(error\|absent\)' &&
            { kill "$vmm"; fail "$backend: $(tr -d '\r' <"$work/serial.log" | grep 'probe: edu ' | head -n3)"; }
        elapsed_over "$t" 180 && { kill "$vmm"; fail "$backend: no $1 DMA transfers within 180 s (last: ${line:-none})"; }
        sleep 0.5
    done
}

# The live update must be refused before the pause, saying why, and the guest run on.
check_refused_update() {
    out=$(ch-remote --api-socket "$api_socket" live-update --session vfio 2>&1) &&
        { kill "$vmm"; fail "$backend: a live update with a VFIO device succeeded: $out"; }
    echo "E2E-VFIO-REFUSED $(echo "$out" | tr '\n' ' ')"
    echo "$out" | grep -q 'cannot be preserved across a kexec' ||
        { kill "$vmm"; fail "$backend: the refusal does not say the device cannot cross a kexec: $out"; }
    state=$(ch-remote --api-socket "$api_socket" info 2>/dev/null | tr -d ' \n' |
        grep -o '"state":"[A-Za-z]*"' | head -n1 | cut -d'"' -f4)
    [ "$state" = Running ] || { kill "$vmm"; fail "$backend: the VM is '$state' after the refusal"; }
    wait_dma $((dma + 4))
    echo "E2E-VFIO after the refusal: $line"
}

run_vmm() {
    backend=$1
    rm -f "$work/serial.log" "$work/vmm.log" "$api_socket"
    set -- --device "path=$dev"
    [ "$backend" = iommufd ] &&
        set -- "$@" --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket"
    cloud-hypervisor -v --kernel /guest/probe-guest.elf \
        --cmdline "edu=1 fill=1 status_ms=500" --memory size=64M --cpus boot=1 \
        --serial "file=$work/serial.log" --console off "$@" >"$work/vmm.log" 2>&1 &
    vmm=$!
    wait_dma "$min_dma"
    [ "$backend" = iommufd ] && check_refused_update
    kill "$vmm"
    wait "$vmm" 2>/dev/null
    echo "E2E-VFIO-RESULT $backend: $line"
    grep -o 'VFIO device .* attached.*' "$work/vmm.log" | head -n1
    grep -q "attached ($backend_name)" "$work/vmm.log" ||
        fail "$backend: the VMM did not use the $backend_name backend"
    id=$(field "$line" id)
    case "$id" in 0x*00ed) ;; *) fail "$backend: bad edu id $id" ;; esac
    echo "$line" | grep -q ' live=ok' || fail "$backend: liveness check failed: $line"
    [ "$(field "$line" errors)" = 0 ] || fail "$backend: errors: $line"
    [ "$(field "$line" irqs)" = "$dma" ] || fail "$backend: not one MSI per transfer: $line"
}

emu_socket=$work/emu.sock

start_emulated_agent() {
    [ -S "$emu_socket" ] && return
    ch-luod --emulate -v --socket "$emu_socket" >"$work/emu.log" 2>&1 &
    t=$(now)
    while ! ch-luod --socket "$emu_socket" ping >/dev/null 2>&1; do
        elapsed_over "$t" 10 && fail "ch-luod --emulate did not answer within 10 s"
        sleep 0.1
    done
}

# The probe's status lines; of the first three with seq > $1, the one with the longest stall
# (the pause: the line printed right after it may come before the shell reads the log, and
# edu's round trips make stalls of their own), once there are three.
status_lines() { tr -d '\r' 2>/dev/null <"$work/serial.log" | grep -o 'probe: status seq=.*'; }
pause_status() {
    status_lines | while read -r l; do
        [ "$(field "$l" seq)" -gt "$1" ] 2>/dev/null && echo "$(field "$l" stall_us) $l"
    done | head -n3 | awk '$1 > max || NR == 1 { max = $1; best = $0 } NR == 3 { print best }' |
        cut -d' ' -f2-
}
last_seq() { field "$(status_lines | tail -n1)" seq; }

# One restart-mode update of $vmm (API $api_socket) into session $1: the successor is started
# first and waits for the session; afterwards $vmm and $api_socket are the successor's, and
# $after is the guest's status line that covers the pause.
restart_update() {
    session=$1
    next_api=$work/api-$session.sock
    seq=$(last_seq)
    cloud-hypervisor -v --api-socket "path=$next_api" --liveupdate "agent=$emu_socket" \
        --restore "source_url=luo://$session" >"$work/vmm-$session.log" 2>&1 &
    next=$!
    out=$(ch-remote --api-socket "$api_socket" live-update --session "$session" 2>&1) ||
        { kill "$vmm" "$next"; fail "$backend: live update $session failed: $out"; }
    echo "E2E-VFIO live-update $session: $(echo "$out" | tr -d ' \n' | cut -c1-400)"
    # The old VMM exits once it handed the VM over (the test bed's timeout covers a hang).
    wait "$vmm" || fail "$backend: the old VMM exited with an error after update $session"
    vmm=$next
    api_socket=$next_api
    after=""
    t=$(now)
    while [ -z "$after" ]; do
        kill -0 "$vmm" 2>/dev/null ||
            fail "$backend: the successor exited: $(tail -n 20 "$work/vmm-$session.log")"
        elapsed_over "$t" 60 && { kill "$vmm"; fail "$backend: not three status lines within 60 s of update $session"; }
        sleep 0.2
        after=$(pause_status "$seq")
    done
}

# Restart-mode updates: first without the device (the baseline pause), then with it.
run_restart() {
    backend=restart
    start_emulated_agent
    rm -f "$work/serial.log" "$work/vmm.log" "$work/api"*.sock
    api_socket=$work/api.sock
    common="--memory size=64M --cpus boot=1 --serial file=$work/serial.log --console off"
    # shellcheck disable=SC2086 # $common is a word list
    cloud-hypervisor -v --kernel /guest/probe-guest.elf --cmdline "fill=1 status_ms=250" \
        $common --api-socket "path=$api_socket" --liveupdate "agent=$emu_socket" \
        >"$work/vmm.log" 2>&1 &
    vmm=$!
    t=$(now)
    until [ "$(last_seq)" -ge 4 ] 2>/dev/null; do
        kill -0 "$vmm" 2>/dev/null || fail "$backend: the baseline VMM exited"
        elapsed_over "$t" 120 && { kill "$vmm"; fail "$backend: no baseline status lines"; }
        sleep 0.2
    done
    restart_update nodev
    echo "E2E-VFIO-BASELINE stall_us=$(field "$after" stall_us) max_stall_us=$(field "$after" max_stall_us): $after"
    kill "$vmm"
    wait "$vmm" 2>/dev/null

    rm -f "$work/serial.log" "$work/vmm.log" "$work/api"*.sock
    api_socket=$work/api.sock
    # shellcheck disable=SC2086 # $common is a word list
    cloud-hypervisor -v --kernel /guest/probe-guest.elf --cmdline "edu=1 fill=1 status_ms=100" \
        $common --api-socket "path=$api_socket" --liveupdate "agent=$emu_socket" \
        --device "path=$dev" >"$work/vmm.log" 2>&1 &
    vmm=$!
    wait_dma "$min_dma"
    grep -q "attached (Iommufd)" "$work/vmm.log" || fail "$backend: the VMM did not use the iommufd backend"
    n=1
    while [ "$n" -le "$max_updates" ]; do
        before=$line
        restart_update "edu$n"
        log="$work/vmm-edu$n.log"
        grep -q "VFIO device .* adopted" "$log" || { kill "$vmm"; fail "$backend: update $n: the successor did not adopt the device"; }
        grep -q "VFIO device .* attached" "$log" && { kill "$vmm"; fail "$backend: update $n: the successor opened the device afresh"; }
        wait_dma $(($(field "$before" dma) + 6))
        pause_dma_before=$(field "$before" pause_dma)
        pause_irqs_before=$(field "$before" pause_irqs)
        echo "E2E-VFIO-RESTART $n: stall_us=$(field "$after" stall_us) max_stall_us=$(field "$after" max_stall_us) pause_dma=$(($(field "$line" pause_dma) - pause_dma_before)) pause_irqs=$(($(field "$line" pause_irqs) - pause_irqs_before)) pause_gap_us=$(field "$line" pause_gap_us) pause_irq_wait_us=$(field "$line" pause_irq_wait_us) dma=$(field "$before" dma)->$(field "$line" dma) irqs=$(field "$before" irqs)->$(field "$line" irqs) mark=$(field "$line" mark) cmd=$(field "$line" cmd) errors=$(field "$line" errors)"
        echo "E2E-VFIO after update $n: $line"
        [ "$(field "$line" errors)" = 0 ] || { kill "$vmm"; fail "$backend: update $n: errors: $line"; }
        [ "$(field "$line" irqs)" = "$(field "$line" dma)" ] || { kill "$vmm"; fail "$backend: update $n: not one MSI per transfer: $line"; }
        [ "$(field "$line" irqs)" -gt "$(field "$before" irqs)" ] || { kill "$vmm"; fail "$backend: update $n: no MSI after the update: $line"; }
        echo "$line" | grep -q ' mark=ok' || { kill "$vmm"; fail "$backend: update $n: the liveness mark is gone (device reset?): $line"; }
        [ $(($(field "$line" cmd) & 6)) = 6 ] || { kill "$vmm"; fail "$backend: update $n: memory or bus mastering is off (device reset?): $line"; }
        [ "$(field "$line" pause_dma)" -gt 0 ] && break
        n=$((n + 1))
    done
    kill "$vmm"
    wait "$vmm" 2>/dev/null
    result=$line
    [ "$(field "$line" pause_dma)" -gt 0 ] ||
        echo "E2E-VFIO-NOTE no pause of $max_updates caught a transfer in flight"
    run_cancelled
    echo "E2E-VFIO-RESULT restart: $result"
}

# An update cancelled after the pause (fault injected in save) gives the device back: the same
# VMM runs on, its irqfd registered again, and DMA and MSIs go on.
run_cancelled() {
    rm -f "$work/serial.log" "$work/vmm.log" "$work/api"*.sock
    api_socket=$work/api.sock
    # shellcheck disable=SC2086 # $common is a word list
    CHV_TEST_LIVE_UPDATE_FAIL_AT=save cloud-hypervisor -v --kernel /guest/probe-guest.elf \
        --cmdline "edu=1 fill=1 status_ms=250" $common --api-socket "path=$api_socket" \
        --liveupdate "agent=$emu_socket" --device "path=$dev" >"$work/vmm.log" 2>&1 &
    vmm=$!
    wait_dma "$min_dma"
    before=$line
    out=$(ch-remote --api-socket "$api_socket" live-update --session cancelled 2>&1) &&
        { kill "$vmm"; fail "$backend: the update with an injected failure succeeded: $out"; }
    echo "$out" | grep -q 'injected failure' ||
        { kill "$vmm"; fail "$backend: the cancelled update failed for another reason: $out"; }
    wait_dma $(($(field "$before" dma) + 6))
    kill "$vmm"
    wait "$vmm" 2>/dev/null
    echo "E2E-VFIO-CANCELLED dma=$(field "$before" dma)->$(field "$line" dma) irqs=$(field "$before" irqs)->$(field "$line" irqs) pause_dma=$(field "$line" pause_dma) errors=$(field "$line" errors)"
    [ "$(field "$line" errors)" = 0 ] || fail "$backend: errors after the cancelled update: $line"
    [ "$(field "$line" irqs)" = "$(field "$line" dma)" ] ||
        fail "$backend: not one MSI per transfer after the cancelled update: $line"
}

# `vm.add-device` (iommufd backend): a VMM started with only --api-socket, a probe config
# created with ch-remote, the device cold-added with `ch-remote add-device`, then booted: the
# probe must drive edu. Then hot-add: a probe guest booted without the device, the device
# added to the running VM (200 with id and BDF, opened by the VMM, the guest running on),
# handed to a successor by a restart-mode live update (adopted, not opened again), and a
# reboot of the successor, after which the guest finds the device at boot and drives it.
run_add_device() {
    backend=add-device
    rm -f "$work/serial.log" "$work/vmm.log" "$api_socket"
    cat >"$work/vm.json" <<JSON
{"payload": {"kernel": "/guest/probe-guest.elf", "cmdline": "edu=1 fill=1 status_ms=500"},
 "cpus": {"boot_vcpus": 1, "max_vcpus": 1}, "memory": {"size": 67108864},
 "serial": {"mode": "File", "file": "$work/serial.log"}, "console": {"mode": "Off"}}
JSON
    cloud-hypervisor -v --api-socket "path=$api_socket" >"$work/vmm.log" 2>&1 &
    vmm=$!
    t=$(now)
    until ch-remote --api-socket "$api_socket" ping >/dev/null 2>&1; do
        elapsed_over "$t" 10 && { kill "$vmm"; fail "$backend: the API did not answer within 10 s"; }
        sleep 0.1
    done
    out=$(ch-remote --api-socket "$api_socket" create "$work/vm.json" 2>&1) ||
        { kill "$vmm"; fail "$backend: create failed: $out"; }
    out=$(ch-remote --api-socket "$api_socket" add-device "path=$dev,id=edu0" 2>&1) ||
        { kill "$vmm"; fail "$backend: cold add-device failed: $out"; }
    [ -z "$out" ] || { kill "$vmm"; fail "$backend: a cold add printed '$out' (expected 204)"; }
    out=$(ch-remote --api-socket "$api_socket" boot 2>&1) ||
        { kill "$vmm"; fail "$backend: boot failed: $out"; }
    wait_dma "$min_dma"
    kill "$vmm"
    wait "$vmm" 2>/dev/null
    echo "E2E-VFIO-RESULT add-device cold: $line"
    check_edu_line "$backend cold"

    start_emulated_agent
    rm -f "$work/serial.log" "$work/vmm.log" "$work/api"*.sock
    api_socket=$work/api.sock
    cloud-hypervisor -v --kernel /guest/probe-guest.elf --cmdline "edu=1 fill=1 status_ms=500" \
        --memory size=64M --cpus boot=1 --serial "file=$work/serial.log" --console off \
        --api-socket "path=$api_socket" --liveupdate "agent=$emu_socket" >"$work/vmm.log" 2>&1 &
    vmm=$!
    t=$(now)
    until tr -d '\r' 2>/dev/null <"$work/serial.log" | grep -q 'probe: edu absent'; do
        kill -0 "$vmm" 2>/dev/null || fail "$backend: the VMM exited before the guest ran"
        elapsed_over "$t" 120 && { kill "$vmm"; fail "$backend: the guest did not report edu absent"; }
        sleep 0.2
    done
    out=$(ch-remote --api-socket "$api_socket" add-device "path=$dev" 2>&1) ||
        { kill "$vmm"; fail "$backend: hot add-device failed: $out"; }
    echo "E2E-VFIO-HOTADD $(echo "$out" | tr -d ' \n')"
    reply=$(echo "$out" | tr -d ' \n')
    case "$reply" in *'"id":"_vfio_device0"'*) ;; *) kill "$vmm"; fail "$backend: unexpected hot-add reply: $out" ;; esac
    case "$reply" in *'"bdf":"0000:00:0'?'.0"'*) ;; *) kill "$vmm"; fail "$backend: unexpected hot-add reply: $out" ;; esac
    grep -q "VFIO device .* attached" "$work/vmm.log" ||
        { kill "$vmm"; fail "$backend: the VMM log shows no attach after the hot-add"; }
    seq=$(last_seq)
    t=$(now)
    until [ "$(last_seq)" -ge $((seq + 2)) ] 2>/dev/null; do
        kill -0 "$vmm" 2>/dev/null || fail "$backend: the VMM exited after the hot-add"
        elapsed_over "$t" 60 && { kill "$vmm"; fail "$backend: the guest stopped after the hot-add"; }
        sleep 0.2
    done
    # The hot-added device is a live-update participant like a boot-time one: handed over.
    restart_update addhot
    grep -q "VFIO device .* adopted" "$work/vmm-addhot.log" ||
        { kill "$vmm"; fail "$backend: the successor did not adopt the hot-added device"; }
    echo "E2E-VFIO-HOTADD handed over: $after"
    # The guest scanned PCI before the device came: it drives it from the next boot.
    : >"$work/serial.log"
    out=$(ch-remote --api-socket "$api_socket" reboot 2>&1) ||
        { kill "$vmm"; fail "$backend: reboot failed: $out"; }
    wait_dma "$min_dma"
    kill "$vmm"
    wait "$vmm" 2>/dev/null
    echo "E2E-VFIO-RESULT add-device hot+reboot: $line"
    check_edu_line "$backend hot"
}

# The last edu line ($line) shows edu's identity, liveness, one MSI per transfer, no error.
check_edu_line() {
    id=$(field "$line" id)
    case "$id" in 0x*00ed) ;; *) fail "$1: bad edu id $id" ;; esac
    echo "$line" | grep -q ' live=ok' || fail "$1: liveness check failed: $line"
    [ "$(field "$line" errors)" = 0 ] || fail "$1: errors: $line"
    [ "$(field "$line" irqs)" = "$(field "$line" dma)" ] || fail "$1: not one MSI per transfer: $line"
}

for backend in $backends; do
    if [ "$backend" = add-device ]; then
        [ -c /dev/iommu ] || fail "/dev/iommu is missing (the add-device case uses iommufd)"
        run_add_device
        continue
    fi
    if [ "$backend" = restart ]; then
        [ -c /dev/iommu ] || fail "/dev/iommu is missing (the restart case needs the iommufd backend)"
        run_restart
        continue
    fi
    case "$backend" in
    iommufd)
        [ -c /dev/iommu ] || fail "/dev/iommu is missing (CONFIG_IOMMUFD, CONFIG_VFIO_DEVICE_CDEV)"
        [ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (no liveupdate=on?)"
        start_agent
        backend_name=Iommufd
        ;;
    container)
        # Without /dev/iommu the VMM must fall back to the group and container API (renamed,
        # not removed: a later case needs it back).
        mv /dev/iommu /dev/.iommu-off 2>/dev/null
        backend_name=Container
        ;;
    *) fail "unknown backend '$backend'" ;;
    esac
    run_vmm "$backend"
    [ -e /dev/.iommu-off ] && mv /dev/.iommu-off /dev/iommu
done
echo "E2E-VFIO-PASS"
reboot -f
