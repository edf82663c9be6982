#!/bin/sh
# Test-bed stage of scripts/e2e-vfio: QEMU's edu device (PCI 1234:11e8, behind the emulated
# Intel IOMMU) bound to vfio-pci and passed by our VMM to the probe guest (`edu=1`), which
# checks the identification and liveness registers, runs DMA round trips between its RAM and
# the device buffer and counts the MSIs. Passes when the probe reports, with errors=0, the edu
# identity, live=ok, at least $min_dma transfers and one MSI per transfer.
#
# Runs the VMM once per backend named by e2e_vfio_backends= on the kernel command line
# (default "iommufd container"): iommufd (vfio cdev + /dev/iommu, RAM mapped by memfd), and
# container (the same with /dev/iommu removed, so the VMM falls back to the group and
# container API). The iommufd run also asks for a live update with ch-luod in kernel mode
# (/dev/liveupdate): the VMM must refuse it, saying the device cannot cross a kexec, and the
# guest must run on with its DMA and interrupts.
# Markers: E2E-VFIO-BOUND, E2E-VFIO-RESULT <backend>: <edu line>, E2E-VFIO-REFUSED <answer>,
# E2E-VFIO-PASS or E2E-VFIO-FAIL: why.

work=/tmp/vfio
cmdline=$(cat /proc/cmdline)
min_dma=10

arg() {
    for word in $cmdline; do
        case "$word" in "$1"=*) echo "${word#*=}" | tr , ' '; return ;; esac
    done
    echo "$2"
}
backends=$(arg e2e_vfio_backends "iommufd container")

fail() {
    {
        for f in "$work/vmm.log" "$work/serial.log" "$work/luod.log"; do
            [ -s "$f" ] || continue
            echo "----- last lines of $f"
            tail -n 30 "$f" | tr -d '\r'
        done
        # The host stops reading at the marker: let the lines above reach it first.
        sleep 2
        echo "E2E-VFIO-FAIL: $*"
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

dev=""
for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor"):$(cat "$d/device")" = "0x1234:0x11e8" ] && dev="$d" && break
done
[ -n "$dev" ] || fail "no edu device (QEMU needs -device edu)"
bdf=${dev##*/}
[ -e "$dev/iommu_group" ] || fail "edu $bdf has no IOMMU group (intel-iommu and intel_iommu=on?)"
if [ -e "$dev/driver" ]; then
    echo "$bdf" >"$dev/driver/unbind" || fail "cannot unbind $bdf from its driver"
fi
echo vfio-pci >"$dev/driver_override" || fail "cannot set driver_override of $bdf"
echo "$bdf" >/sys/bus/pci/drivers_probe
driver=$(basename "$(readlink "$dev/driver" 2>/dev/null)")
[ "$driver" = vfio-pci ] || fail "edu $bdf is bound to '${driver:-nothing}', not vfio-pci"
group=$(basename "$(readlink "$dev/iommu_group")")
echo "E2E-VFIO-BOUND $bdf group=$group cdev=$(ls "$dev/vfio-dev" 2>/dev/null) iommu=$([ -c /dev/iommu ] && echo yes || echo no)"

# The probe's last complete edu line.
edu_line() { tr -d '\r' 2>/dev/null <"$work/serial.log" | grep -o 'probe: edu id=.* errors=[0-9]*$' | tail -n1; }
field() { echo "$1" | grep -o " $2=[0-9a-zx]*" | cut -d= -f2; }

agent_socket=$work/luod.sock
api_socket=$work/api.sock

start_agent() {
    ch-luod -v --socket "$agent_socket" >"$work/luod.log" 2>&1 &
    t=$(now)
    while ! ch-luod --socket "$agent_socket" ping >/dev/null 2>&1; do
        elapsed_over "$t" 10 && fail "ch-luod did not answer within 10 s"
        sleep 0.1
    done
    mode=$(ch-luod --socket "$agent_socket" ping)
    [ "$mode" = kernel ] || fail "ch-luod runs in mode '$mode', not kernel"
}

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

for backend in $backends; do
    case "$backend" in
    iommufd)
        [ -c /dev/iommu ] || fail "/dev/iommu is missing (CONFIG_IOMMUFD, CONFIG_VFIO_DEVICE_CDEV)"
        [ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (no liveupdate=on?)"
        start_agent
        backend_name=Iommufd
        ;;
    container)
        # Without /dev/iommu the VMM must fall back to the group and container API.
        rm -f /dev/iommu
        backend_name=Container
        ;;
    *) fail "unknown backend '$backend'" ;;
    esac
    run_vmm "$backend"
done
echo "E2E-VFIO-PASS"
reboot -f
