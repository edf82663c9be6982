#!/bin/sh
# Test-bed stage: boot the small Linux guest under our VMM on nested KVM, type a command
# on its serial console and check the answer. Prints NESTED-LINUX-PASS or NESTED-LINUX-FAIL.
# Needs in the initramfs (scripts/test-nested-linux adds them):
#   /bin/cloud-hypervisor, /bin/serial-drive, /guest/bzImage, /guest/initramfs.cpio.gz
# Booting Linux on nested KVM under TCG is slow (minutes), hence the long timeout.
fail() {
    echo "NESTED-LINUX-FAIL: $*"
    reboot -f
}
for f in /bin/cloud-hypervisor /bin/serial-drive /guest/bzImage /guest/initramfs.cpio.gz; do
    [ -e "$f" ] || fail "$f is missing from the test-bed initramfs"
done

start=$(cut -d' ' -f1 /proc/uptime)
# shellcheck disable=SC2016 # the guest's shell expands it
if serial-drive --timeout "${NESTED_TIMEOUT:-1200}" --fail "Kernel panic" \
    --expect LINUX-GUEST-READY --send 'echo $((6*7))' --expect-line 42 -- \
    /bin/cloud-hypervisor --kernel /guest/bzImage --initramfs /guest/initramfs.cpio.gz \
    --cmdline "console=ttyS0 panic=-1" --memory size=256M --cpus boot=1 \
    --serial tty --console off; then
    end=$(cut -d' ' -f1 /proc/uptime)
    echo "NESTED-LINUX-PASS (guest answered after $(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }') s)"
else
    fail "the guest did not answer 42"
fi
reboot -f
