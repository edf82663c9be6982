#!/bin/sh
# Test-bed stage of `scripts/e2e-vfio --backends kexec-detach`: a kexec-mode live update of a
# probe guest driving QEMU's edu device through kernel VFIO with `--device ...,kexec=detach`.
# The same script runs in both kernels; the second kernel's command line has `e2e_stage=2`.
#
# Stage 1: edu bound to vfio-pci, ch-luod in kernel mode, the VMM with the probe guest
#   (`edu=1 hotplug=1`: it polls the PCI hot-plug controller) and the device with
#   kexec=detach. Once the guest has done DMA, `ch-luod kexec` loads the next kernel and
#   `ch-remote live-update` runs: the VMM asks the guest to release edu (the guest stops its
#   DMA and ejects: a hot-unplug), closes the device, then prepares, freezes and hands the VM
#   over; the agent kexecs.
# Stage 2: edu bound to vfio-pci again in the new kernel, a fresh ch-luod, and
#   `cloud-hypervisor --restore source_url=luo://edu`: the VM resumes without edu, then the VMM
#   attaches it again in its slot and tells the guest (a hot-plug); the guest re-initialises
#   it and its DMA and MSIs go on from where they were (counters carried), errors=0.
# Markers: E2E-VFIO-DETACH-STAGE1/2, E2E-VFIO-DETACH <what>, E2E-VFIO-PASS or E2E-VFIO-FAIL.

work=/tmp/vfio
cmdline=$(cat /proc/cmdline)
agent_socket=$work/luod.sock
api_socket=$work/api.sock
session=edu

arg() {
    for word in $cmdline; do
        case "$word" in "$1"=*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}
stage=$(arg e2e_stage 1)

fail() {
    {
        for f in "$work/vmm.log" "$work/serial.log" "$work/luod.log" "$work/kexec.log" "$work/remote.log"; do
            [ -s "$f" ] || continue
            echo "----- last lines of $f"
            tail -n 30 "$f" | tr -d '\r'
        done
        sleep 2
        echo "E2E-VFIO-FAIL: kexec-detach stage $stage: $*"
    }
    reboot -f
    exit 1
}
now() { cut -d' ' -f1 /proc/uptime; }
elapsed_over() { awk -v a="$1" -v b="$(now)" -v t="$2" 'BEGIN { exit !(b - a > t) }'; }

for f in /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/probe-guest.elf; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
mkdir -p "$work" || fail "cannot create $work"
[ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (kernel without LUO or no liveupdate=on)"

# edu to vfio-pci, in either kernel.
dev=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] && dev="$d" && break
done
[ -n "$dev" ] || fail "no edu device (QEMU needs -device edu)"
bdf=${dev##*/}
if [ -e "$dev/driver" ]; then
    echo "$bdf" >"$dev/driver/unbind" || fail "cannot unbind $bdf from its driver"
fi
echo vfio-pci >"$dev/driver_override" || fail "cannot set driver_override of $bdf"
echo "$bdf" >/sys/bus/pci/drivers_probe
driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)")
[ "$driver" = vfio-pci ] || fail "edu $bdf is bound to '${driver:-nothing}', not vfio-pci"
echo "E2E-VFIO-DETACH-STAGE$stage edu $bdf bound to vfio-pci"

ch-luod -v --socket "$agent_socket" >"$work/luod.log" 2>&1 &
t=$(now)
while ! ch-luod --socket "$agent_socket" ping >/dev/null 2>&1; do
    elapsed_over "$t" 10 && fail "ch-luod did not answer within 10 s"
    sleep 0.1
done
[ "$(ch-luod --socket "$agent_socket" ping)" = kernel ] || fail "ch-luod is not in kernel mode"

edu_line() { tr -d '\r' 2>/dev/null <"$work/serial.log" | grep -o 'probe: edu id=.* errors=[0-9]*.*$' | tail -n1; }
field() { echo "$1" | grep -o " $2=[0-9a-z]*" | cut -d= -f2; }

# Waits until the probe's edu line says present=1 with dma >= $1; the line is in $line.
wait_dma() {
    t=$(now)
    while :; do
        kill -0 "$vmm" 2>/dev/null || fail "the VMM exited"
        line=$(edu_line)
        dma=$(field "$line" dma)
        [ "$(field "$line" present)" = 1 ] && [ -n "$dma" ] && [ "$dma" -ge "$1" ] && break
        elapsed_over "$t" 180 && fail "no $1 DMA transfers with edu present within 180 s (last: ${line:-none})"
        sleep 0.5
    done
    [ "$(field "$line" errors)" = 0 ] || fail "the probe reported errors: $line"
    [ "$(field "$line" irqs)" = "$(field "$line" dma)" ] || fail "not one MSI per transfer: $line"
}

if [ "$stage" = 1 ]; then
    cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
        --kernel /guest/probe-guest.elf --cmdline "edu=1 hotplug=1 fill=1 status_ms=200" \
        --memory size=64M --cpus boot=1 --serial "file=$work/serial.log" --console off \
        --device "path=$dev,kexec=detach" >"$work/vmm.log" 2>&1 &
    vmm=$!
    wait_dma 6
    echo "E2E-VFIO-DETACH before: $line"
    next="$(echo "$cmdline" | sed 's/ *e2e_stage=[^ ]*//') e2e_stage=2 e2e_dma_before=$(field "$line" dma)"
    ch-luod --socket "$agent_socket" kexec --kernel /kexec/bzImage --initrd /kexec/initrd.cpio.gz \
        --cmdline "$next" --timeout 120 --session "$session" >"$work/kexec.log" 2>&1 &
    kexec_pid=$!
    t=$(now)
    until grep -q 'loaded; waiting' "$work/luod.log"; do
        kill -0 "$kexec_pid" 2>/dev/null || fail "ch-luod kexec exited before the image was loaded"
        elapsed_over "$t" 60 && fail "the kexec image was not loaded within 60 s"
        sleep 0.05
    done
    # The VMM's log reaches the console as it is written: the unplug and the freeze are the
    # last things it says before the machine kexecs.
    tail -f "$work/vmm.log" "$work/serial.log" 2>/dev/null | while IFS= read -r l; do
        case "$l" in *unplugged* | *hotplug* | *release* | *frozen*) echo "E2E-VFIO-DETACH log: $l" ;; esac
    done &
    echo "E2E-VFIO-DETACH live-update"
    ch-remote --api-socket "$api_socket" live-update --session "$session" >"$work/remote.log" 2>&1 &
    remote=$!
    wait "$kexec_pid"
    rc=$?
    sleep 2
    kill -0 "$remote" 2>/dev/null && fail "ch-luod kexec exited $rc and the live-update call still waits"
    kill -0 "$vmm" 2>/dev/null || fail "ch-luod kexec exited $rc and the VMM is gone"
    fail "ch-luod kexec exited $rc: $(cat "$work/kexec.log") / live-update: $(cat "$work/remote.log")"
fi

echo "E2E-VFIO-DETACH restore"
cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
    --restore "source_url=luo://$session" >"$work/vmm.log" 2>&1 &
vmm=$!
# The serial file is the old VMM's: it was in the first kernel's tmpfs, so this one is new.
t=$(now)
until grep -q 'attached again' "$work/vmm.log" 2>/dev/null; do
    kill -0 "$vmm" 2>/dev/null || fail "the restoring VMM exited"
    grep -q 'Cannot attach VFIO device' "$work/vmm.log" && fail "the VMM could not attach edu again"
    elapsed_over "$t" 120 && fail "edu was not attached again within 120 s of the restore"
    sleep 0.2
done
echo "E2E-VFIO-DETACH $(grep -o 'VFIO device .* attached again.*' "$work/vmm.log" | head -n1)"
echo "E2E-VFIO-DETACH restore steps: $(grep -o 'VM restored from session.*' "$work/vmm.log" | head -n1)"
dma_before=$(arg e2e_dma_before 0)
wait_dma $((dma_before + 6))
echo "E2E-VFIO-DETACH after: $line"
[ "$(field "$line" unplugs)" = 1 ] || fail "the guest did not see exactly one hot-unplug: $line"
[ "$(field "$line" plugs)" = 1 ] || fail "the guest did not see exactly one hot-plug: $line"
echo "$line" | grep -q ' live=ok' || fail "liveness check failed after the hot-plug: $line"
grep -q 'VFIO device .* adopted' "$work/vmm.log" && fail "the restored VMM claims to have adopted the device"
pause=$(grep -o '("pause", [0-9]*)' "$work/vmm.log" | head -n1 | grep -o '[0-9]*')
echo "E2E-VFIO-DETACH pause_us=$pause dma=$dma_before->$(field "$line" dma) irqs=$(field "$line" irqs) errors=$(field "$line" errors)"
echo "E2E-VFIO-PASS"
reboot -f
