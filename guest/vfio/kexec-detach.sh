#!/bin/sh
# Test-bed stage of `scripts/e2e-vfio --backends kexec-detach`: a kexec-mode live update of a
# probe guest driving QEMU's edu device through kernel VFIO with `--device ...,kexec=detach`.
# The same script runs in both kernels; the second kernel's command line has `e2e_stage=2`.
#
# Stage 1: first a guest that does not release the device (probe hotplug=0): the update is
#   refused after the VMM's wait and the guest goes on driving it. Then:
#   edu bound to vfio-pci, ch-luod in kernel mode, the VMM with the probe guest
#   (`edu=1 hotplug=1`: it polls the PCI hot-plug controller) and the device with
#   kexec=detach. Once the guest has done DMA, `ch-luod kexec` loads the next kernel and
#   `ch-remote live-update` runs: the VMM asks the guest to release edu (the guest stops its
#   DMA and ejects: a hot-unplug), closes the device, then prepares, freezes and hands the VM
#   over; the agent kexecs.
# Stage 2: edu bound to vfio-pci again in the new kernel, a fresh ch-luod, and
#   `cloud-hypervisor --restore source_url=luo://edu`: the VM resumes without edu, then the VMM
#   attaches it again in its slot and tells the guest (a hot-plug); the guest re-initialises
#   it and its DMA and MSIs go on from where they were (counters carried), errors=0. Then
#   `ch-remote remove-device` (the guest releases edu, which leaves vm.info) and `add-device`
#   again (the guest takes it up again).
# Markers: E2E-VFIO-DETACH-STAGE1/2, E2E-VFIO-DETACH <what>, E2E-VFIO-PASS or E2E-VFIO-FAIL.

# shellcheck source=guest/vfio/lib.sh
. /lib/vfio-stage.sh
work=/tmp/vfio
cmdline=$(cat /proc/cmdline)
agent_socket=$work/luod.sock
api_socket=$work/api.sock
session=edu
stage=$(arg e2e_stage 1)

fail() {
    {
        dump_logs 30 "$work/vmm.log" "$work/serial.log" "$work/luod.log" "$work/kexec.log" "$work/remote.log"
        sleep 2
        echo "E2E-VFIO-FAIL: kexec-detach stage $stage: $*"
    }
    reboot -f
    exit 1
}
for f in /lib/vfio-stage.sh /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/probe-guest.elf; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
mkdir -p "$work" || fail "cannot create $work"
[ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (kernel without LUO or no liveupdate=on)"

# edu to vfio-pci, in either kernel.
bind_edu
echo "E2E-VFIO-DETACH-STAGE$stage edu $bdf bound to vfio-pci"
start_kernel_agent "$agent_socket" "$work/luod.log"

# The probe's last complete edu line (the file's last line may still be being written).
edu_line() { tr -d '\r' 2>/dev/null <"$work/serial.log" | sed '$d' | grep -o 'probe: edu id=.* errors=[0-9]*.*$' | tail -n1; }
field() { echo "$1" | grep -o " $2=[0-9a-z]*" | cut -d= -f2; }

# Waits until the probe's edu line has dma >= $1 and, with hotplug=1, present=1; the line is
# in $line.
wait_dma() {
    t=$(now)
    while :; do
        kill -0 "$vmm" 2>/dev/null || fail "the VMM exited"
        line=$(edu_line)
        dma=$(field "$line" dma)
        present=$(field "$line" present)
        [ "${present:-1}" = 1 ] && [ -n "$dma" ] && [ "$dma" -ge "$1" ] && break
        elapsed_over "$t" 180 && fail "no $1 DMA transfers with edu present within 180 s (last: ${line:-none})"
        sleep 0.5
    done
    [ "$(field "$line" errors)" = 0 ] || fail "the probe reported errors: $line"
    [ "$(field "$line" irqs)" = "$(field "$line" dma)" ] || fail "not one MSI per transfer: $line"
}

# Starts the VMM ($vmm) with the probe guest (command line $1) and edu with kexec=detach.
start_vm() {
    cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
        --kernel /guest/probe-guest.elf --cmdline "$1" \
        --memory size=64M --cpus boot=1 --serial "file=$work/serial.log" --console off \
        --device "path=$dev,kexec=detach" >"$work/vmm.log" 2>&1 &
    vmm=$!
}

if [ "$stage" = 1 ]; then
    # A guest that never releases the device (hotplug=0: the probe ignores the controller):
    # the update must be refused after the VMM's wait, and the guest go on with the device.
    start_vm "edu=1 fill=1 status_ms=200"
    wait_dma 3
    t=$(now)
    out=$(ch-remote --api-socket "$api_socket" live-update --session "$session" 2>&1) &&
        fail "a live update whose guest kept the device succeeded: $out"
    echo "E2E-VFIO-DETACH refused after $(since "$t") s: $(echo "$out" | tr '\n' ' ')"
    echo "$out" | grep -q 'did not release' || fail "the refusal does not say the guest kept the device: $out"
    [ -z "$(ch-luod --socket "$agent_socket" list)" ] || fail "the refused update left a session"
    wait_dma $(($(field "$line" dma) + 3))
    echo "E2E-VFIO-DETACH after the refusal: $line"
    kill "$vmm"
    wait "$vmm" 2>/dev/null
    rm -f "$work/serial.log" "$api_socket"

    start_vm "edu=1 hotplug=1 fill=1 status_ms=200"
    wait_dma 6
    echo "E2E-VFIO-DETACH before: $line"
    next="$(echo "$cmdline" | sed 's/ *e2e_stage=[^ ]*//') e2e_stage=2 e2e_dma_before=$(field "$line" dma)"
    load_next_kernel "$agent_socket" "$work/luod.log" "$session" "$next"
    # The VMM's release, unplug and freeze lines and the guest's hot-plug lines are the last
    # things said before the machine kexecs.
    watch_log "$work/vmm.log" E2E-VFIO-DETACH '*the guest to release*' '*unplugged*' '*frozen*' &
    watch_log "$work/serial.log" E2E-VFIO-DETACH '*hotplug*' &
    echo "E2E-VFIO-DETACH live-update"
    live_update_across_kexec "$api_socket" "$session"
fi

echo "E2E-VFIO-DETACH restore"
cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
    --restore "source_url=luo://$session" >"$work/vmm.log" 2>&1 &
vmm=$!
# The serial file is the old VMM's: it was in the first kernel's tmpfs, so this one is new.
wait_attached_again "$work/vmm.log"
echo "E2E-VFIO-DETACH $(grep -o 'VFIO device .* attached again.*' "$work/vmm.log" | head -n1)"
echo "E2E-VFIO-DETACH restore steps: $(grep -o 'VM restored from session.*' "$work/vmm.log" | head -n1)"
dma_before=$(arg e2e_dma_before 0)
wait_dma $((dma_before + 6))
echo "E2E-VFIO-DETACH after: $line"
[ "$(field "$line" unplugs)" = 1 ] || fail "the guest did not see exactly one hot-unplug: $line"
[ "$(field "$line" plugs)" = 1 ] || fail "the guest did not see exactly one hot-plug: $line"
echo "$line" | grep -q ' live=ok' || fail "liveness check failed after the hot-plug: $line"
pause=$(grep -o '("pause", [0-9]*)' "$work/vmm.log" | head -n1 | grep -o '[0-9]*')
echo "E2E-VFIO-DETACH pause_us=$pause dma=$dma_before->$(field "$line" dma) irqs=$(field "$line" irqs) errors=$(field "$line" errors)"

# vm.remove-device on the running VM: the guest releases edu, which leaves the VM and vm.info;
# vm.add-device brings it back as a new device, and the guest takes it up again.
out=$(ch-remote --api-socket "$api_socket" remove-device _vfio_device0 2>&1) || fail "remove-device failed: $out"
t=$(now)
until [ "$(field "$(edu_line)" unplugs)" = 2 ] && grep -q 'device 0 unplugged' "$work/vmm.log"; do
    kill -0 "$vmm" 2>/dev/null || fail "the VMM exited after remove-device"
    elapsed_over "$t" 30 && fail "edu was not unplugged within 30 s of remove-device: $(edu_line)"
    sleep 0.2
done
ch-remote --api-socket "$api_socket" info | grep -q "$dev" && fail "vm.info still lists the removed device"
echo "E2E-VFIO-DETACH removed: $(edu_line)"
reply=$(ch-remote --api-socket "$api_socket" add-device "path=$dev" 2>&1) || fail "add-device after the removal failed: $reply"
echo "E2E-VFIO-DETACH added again: $(echo "$reply" | tr -d ' \n')"
dma_removed=$(field "$(edu_line)" dma)
wait_dma $((dma_removed + 3))
[ "$(field "$line" plugs)" = 2 ] || fail "the guest did not take up the added device: $line"
echo "E2E-VFIO-DETACH after add-device: $line"
echo "E2E-VFIO-PASS"
reboot -f
