#!/bin/sh
# Test-bed stage of scripts/test-nested-kernel-update: the small Linux guest under our VMM,
# live-updated across kexecs from one kernel version to the next and back (7.2 -> 7.3 -> 7.2),
# with its disk. The same script runs in every kernel; the command line says which stage it is
# (ku_stage=K, default 1), how many kexecs there are (ku_kexecs=N), the kernel it came from
# (ku_from=) and the guest's uptime there (ku_up=).
#
# The guest's disk is the test bed's own virtio disk (/dev/vda, a file on the machine running
# QEMU), so it outlives every kexec of the test-bed kernel, as a host's disks do.
# Stage 1: ch-luod in kernel mode; the VMM boots the guest with --disk path=/dev/vda; the guest
#   writes a string to its disk (fsync), which the test bed must then read at /dev/vda; its
#   uptime is noted; then the live update across the kexec into /kexec/bzImage.
# Stage K > 1: a fresh ch-luod; `cloud-hypervisor --restore` must emit vm/restored; on the
#   guest's console (typed lines, answers with a fixed suffix): its uptime must have advanced
#   past the previous stage's, it must read the string back from its disk past the page cache
#   (iflag=direct), and write a new one (sector K) that the test bed then sees. Then, while K <=
#   N, the next live update across a kexec; the last stage prints KERNEL-UPDATE-PASS.
# Markers: KERNEL-UPDATE-STAGEK kernel <uname -r>, KERNEL-UPDATE-HOP K: FROM -> TO: pause_us=,
# KERNEL-UPDATE-PASS or KERNEL-UPDATE-FAIL: why.
# Needs in the initramfs (the script adds them): /bin/cloud-hypervisor, /bin/ch-remote,
# /bin/ch-luod, /lib/vfio-stage.sh (guest/vfio/lib.sh), /guest/bzImage, /guest/initramfs.cpio.gz,
# and, in every image but the last, /kexec/bzImage and /kexec/initrd.cpio.gz.
# shellcheck disable=SC2016 # the lines typed to the guest are expanded by the guest's shell

# shellcheck source=guest/vfio/lib.sh
. /lib/vfio-stage.sh

work=/tmp/ku
agent_socket=$work/luod.sock
api_socket=$work/api.sock
session=linux
disk=/dev/vda
stage=$(arg ku_stage 1)
kexecs=$(arg ku_kexecs 2)
from=$(arg ku_from "")
up_before=$(arg ku_up 0)
# The string of stage 1, known to every stage (the same on every command line).
data=KERNEL-UPDATE-DATA-$(arg ku_data 0)

fail() {
    {
        dump_logs 30 "$work/luod.log" "$work/kexec.log" "$work/remote.log"
        dump_console "$work/vmm.log" 30
        echo "KERNEL-UPDATE-FAIL: stage $stage: $*"
    } >&2
    reboot -f
    exit 1
}
say() { echo "KERNEL-UPDATE $*"; }

# The first match of the extended regex $1 in the console log after line $2 (CRs removed),
# waiting up to $3 seconds; fails when the VMM exits first.
wait_match() {
    wm_start=$(now)
    while :; do
        wm_hit=$(tail -n "+$(($2 + 1))" "$work/vmm.log" | tr -d '\r' | grep -oE -- "$1" | head -n1)
        if [ -n "$wm_hit" ]; then
            printf '%s\n' "$wm_hit"
            return 0
        fi
        grep -qF "Kernel panic" "$work/vmm.log" && fail "guest kernel panic"
        kill -0 "$vmm" 2>/dev/null || fail "the VMM exited before /$1/ appeared"
        elapsed_over "$wm_start" "$3" && fail "no /$1/ on the guest console within $3 s"
        sleep 0.1
    done
}

# Types a command printing "<tag>2=<value>:END" and prints the value (the tag is spelled with
# an arithmetic expansion, so the echo of the typed line cannot match).
ask() {
    ask_from=$(wc -l <"$work/vmm.log")
    printf '%s\n' "echo $2\$((1+1))=$1:END" >"$work/vmm.in"
    wait_match "${2}2=[^:]*:END" "$ask_from" "$3" | sed "s/^${2}2=//; s/:END\$//"
}

# The string at sector $1 of the test bed's /dev/vda.
host_sector() { dd if="$disk" bs=512 skip="$1" count=1 iflag=direct 2>/dev/null | tr -d '\000'; }

# Loads the next kernel and live-updates the VM across the kexec; returns only by failing.
next_kexec() {
    up=$(ask '$(cut -d" " -f1 /proc/uptime)' UP 60)
    next="$(sed -e 's/ *ku_stage=[^ ]*//' -e 's/ *ku_from=[^ ]*//' -e 's/ *ku_up=[^ ]*//' /proc/cmdline)"
    next="$next ku_stage=$((stage + 1)) ku_from=$(uname -r) ku_up=$up"
    load_next_kernel "$agent_socket" "$work/luod.log" "$session" "$next"
    say "live update across the kexec from $(uname -r) at guest uptime $up s"
    live_update_across_kexec "$api_socket" "$session"
}

say "STAGE$stage kernel $(uname -r)${from:+ (from $from)}"
for f in /lib/vfio-stage.sh /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/bzImage /guest/initramfs.cpio.gz; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
[ -b "$disk" ] || fail "no $disk: QEMU needs a virtio disk and the test kernel CONFIG_VIRTIO_BLK"
[ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (kernel without LUO or no liveupdate=on)"
mkdir -p "$work" || fail "cannot create $work"
start_kernel_agent "$agent_socket" "$work/luod.log"
mkfifo "$work/vmm.in" || fail "mkfifo failed"

if [ "$stage" = 1 ]; then
    cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
        --kernel /guest/bzImage --initramfs /guest/initramfs.cpio.gz \
        --cmdline "console=ttyS0 panic=-1" --memory size=256M --cpus boot=1 \
        --disk "path=$disk" --serial tty --console off \
        <"$work/vmm.in" >"$work/vmm.log" 2>&1 &
    vmm=$!
    exec 3>"$work/vmm.in"
    wait_match LINUX-GUEST-READY 0 600 >/dev/null
    printf '%s\n' 'dmesg -n 1' >"$work/vmm.in"
    rc=$(ask "\$(echo $data | dd of=/dev/vda conv=fsync 2>/dev/null; echo \$?)" WRITE 120)
    [ "$rc" = 0 ] || fail "the guest could not write its disk (dd exited $rc)"
    [ "$(host_sector 0 | head -c ${#data})" = "$data" ] ||
        fail "the test bed's $disk does not hold the guest's string after its fsync"
    say "the guest wrote $data to its disk; the test bed reads it at $disk"
    next_kexec
fi

# Stage K > 1: the VM comes back on this kernel.
t=$(now)
cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
    --restore "source_url=luo://$session" <"$work/vmm.in" >"$work/vmm.log" 2>&1 &
vmm=$!
exec 3>"$work/vmm.in"
until grep -q 'VM restored from session' "$work/vmm.log"; do
    kill -0 "$vmm" 2>/dev/null || fail "the restoring VMM exited"
    elapsed_over "$t" 120 && fail "the VM was not restored within 120 s"
    sleep 0.05
done
pause=$(grep -o 'VM restored from session.*' "$work/vmm.log" | grep -o '("pause", [0-9]*)' | grep -o '[0-9]*')
up=$(ask '$(cut -d" " -f1 /proc/uptime)' UP 120)
say "HOP $((stage - 1)): ${from:-?} -> $(uname -r): pause_us=${pause:-?}, guest uptime $up_before -> $up s"
awk -v a="$up_before" -v b="$up" 'BEGIN { exit !(b > a) }' || fail "the guest's uptime did not advance ($up_before -> $up)"
seen=$(ask "\$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c ${#data})" DISK 60)
[ "$seen" = "$data" ] || fail "the guest read '$seen' from its disk, expected '$data'"
marker="STAGE$stage-$(uname -r)"
rc=$(ask "\$(echo $marker | dd of=/dev/vda bs=512 seek=$stage conv=fsync 2>/dev/null; echo \$?)" WRITE 60)
[ "$rc" = 0 ] || fail "the guest could not write its disk after the kexec (dd exited $rc)"
[ "$(host_sector "$stage" | head -c ${#marker})" = "$marker" ] ||
    fail "the test bed's $disk does not hold '$marker' at sector $stage"
say "the guest read its disk back and wrote $marker; its console answers"
grep -E 'cloud-hypervisor: +[0-9.]+s: <ERROR>|panicked' "$work/vmm.log" && fail "the restored VMM logged an error"
if [ "$stage" -le "$kexecs" ]; then
    next_kexec
fi
echo "KERNEL-UPDATE-PASS"
reboot -f
