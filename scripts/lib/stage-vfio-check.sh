#!/bin/sh
# Stage for scripts/testbed: bind QEMU's edu device (PCI 1234:11e8) to vfio-pci and check the
# VFIO and iommufd nodes appear. Prints VFIO-EDU-OK or VFIO-EDU-FAIL. Needs the QEMU options
# shown in docs/testbed.md (q35 with kernel-irqchip=split, intel-iommu, edu, intel_iommu=on).
for dev in /sys/bus/pci/devices/*; do
    [ "$(cat "$dev/vendor"):$(cat "$dev/device")" = "0x1234:0x11e8" ] || continue
    group="$(basename "$(readlink "$dev/iommu_group")")"
    echo "edu at ${dev##*/}, IOMMU group $group"
    echo vfio-pci >"$dev/driver_override"
    echo "${dev##*/}" >/sys/bus/pci/drivers_probe
    if [ -c "/dev/vfio/$group" ] && [ -c /dev/iommu ] && ls /dev/vfio/devices/vfio* >/dev/null 2>&1; then
        echo "VFIO-EDU-OK: /dev/vfio/$group /dev/iommu $(ls /dev/vfio/devices)"
    else
        echo "VFIO-EDU-FAIL: VFIO nodes missing after binding vfio-pci"
    fi
    reboot -f
done
echo "VFIO-EDU-FAIL: no edu device (add --qemu-arg -device --qemu-arg edu)"
reboot -f
