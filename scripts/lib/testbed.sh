# shellcheck shell=bash
# The QEMU test bed: a TCG machine with nested SVM booting the test kernel and an initramfs
# that runs a stage script. Needs lib/common.sh and lib/initramfs.sh sourced first.

# The marker the outer /init prints when the machine is unusable (used by scripts/testbed).
# shellcheck disable=SC2034
TESTBED_ERROR=TESTBED-ERROR

# `scripts/testbed --stall` for the Linux-guest stages of scripts/test-nested-net and
# scripts/test-nested-vsock: they print a line every 5 s whatever they wait for (`keep_alive`,
# guest/vfio/lib.sh), so a console silent for 30 s means the test bed itself stopped
# (docs/testbed.md, "A silent test bed"); the slow tests count that as a crash of the test bed
# and run the script again.
# shellcheck disable=SC2034
TESTBED_LINUX_STAGE_STALL=30

# Write the outer /init into STAGE ($1). It mounts the basics, checks /dev/kvm (unless the
# command line has testbed_no_kvm=1: a stage that runs no VM, e.g. after a kexec into a kernel
# without KVM), runs /stage.sh and then ends the machine with reboot -f (QEMU's -no-reboot makes
# that an exit).
testbed_write_init() {
    local stage="$1"
    cat >"$stage/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
echo "TESTBED-INIT: kernel $(uname -r), cmdline: $(cat /proc/cmdline)"
if [ ! -c /dev/kvm ] && ! grep -qw testbed_no_kvm=1 /proc/cmdline; then
    echo "TESTBED-ERROR: /dev/kvm is missing (no nested SVM? QEMU needs -cpu ...,+svm)"
    reboot -f
fi
echo TESTBED-STAGE-START
sh /stage.sh
echo "TESTBED-STAGE-EXIT rc=$?"
sync
reboot -f
INIT
    chmod 755 "$stage/init"
}

# Build a test-bed initramfs at OUT ($1) from a stage script ($2) and "HOST:GUEST" specs
# (the rest). The split is at the last colon, so host paths may hold colons.
testbed_initramfs() {
    local out="$1" script="$2"
    shift 2
    [ -r "$script" ] || die "--run: stage script $script not found"
    local stage spec
    stage="$(mktemp -d)"
    initramfs_stage_busybox "$stage"
    testbed_write_init "$stage"
    install -m 755 "$script" "$stage/stage.sh"
    for spec in "$@"; do
        case "$spec" in *:*) ;; *) die "--add wants HOST_PATH:GUEST_PATH, got '$spec'" ;; esac
        initramfs_add_file "$stage" "${spec%:*}" "${spec##*:}"
    done
    initramfs_pack "$stage" "$out"
    rm -rf "$stage"
}

# Make sure QEMU is there.
testbed_prereqs() {
    command -v qemu-system-x86_64 >/dev/null 2>&1 || ensure_packages qemu-system-x86
    need_cmd qemu-system-x86_64 qemu-system-x86
}
