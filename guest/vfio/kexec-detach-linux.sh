#!/bin/sh
# Test-bed stage of `scripts/e2e-vfio --backends kexec-detach-linux`: the kexec-detach case
# with the small Linux guest instead of the probe guest, so the hot-plug and the hot-unplug go
# through Linux's ACPI PCI hot-plug driver (acpiphp). The same script runs in both kernels; the
# second kernel's command line has `e2e_stage=2`.
#
# Stage 1: edu bound to vfio-pci, ch-luod in kernel mode, the VMM with the Linux guest and no
#   device. Once the guest's shell answers, `ch-remote add-device path=...,kexec=detach`
#   hot-adds edu and the guest must find it at the BDF of the API reply by itself (no rescan).
#   Then `ch-luod kexec` loads the next kernel and `ch-remote live-update` runs: the VMM asks
#   the guest to release edu (an ACPI eject request), acpiphp ejects it (no guest driver holds
#   it), the VMM closes it, freezes and hands the VM over; the agent kexecs.
# Stage 2: edu bound to vfio-pci again, a fresh ch-luod, and `cloud-hypervisor --restore
#   source_url=luo://NAME` on a FIFO and a log (the restored VM's serial console is the VMM's
#   stdio): the VMM attaches edu again in its slot (an ACPI device check) and the guest must
#   see it again at the same BDF, answer on its console, and its kernel log must hold the
#   device's enumeration once more than before the kexec (it was removed and found again).
# Markers: E2E-VFIO-LINUX-STAGE1/2, E2E-VFIO-LINUX <what>, E2E-VFIO-PASS or E2E-VFIO-FAIL.
# Needs in the initramfs (scripts/e2e-vfio adds them): /bin/cloud-hypervisor, /bin/ch-remote,
# /bin/ch-luod, /guest/bzImage, /guest/initramfs.cpio.gz; the first image also
# /kexec/bzImage and /kexec/initrd.cpio.gz.
# shellcheck disable=SC2016 # the lines typed to the guest are expanded by the guest's shell

# shellcheck source=guest/vfio/lib.sh
. /lib/vfio-stage.sh
work=/tmp/vfio
cmdline=$(cat /proc/cmdline)
agent_socket=$work/luod.sock
api_socket=$work/api.sock
console_log=$work/console.log
vmm_log=$work/vmm.log
session=edu-linux
# The kernel prints this for each enumeration of edu ("pci 0000:00:03.0: [1234:11e8] type 00 ...").
enum_pattern='\[1234:11e8\]'

stage=$(arg e2e_stage 1)

fail() {
    {
        dump_logs 40 "$vmm_log" "$work/luod.log" "$work/kexec.log" "$work/remote.log"
        dump_console "$console_log" 40
        sleep 2
        echo "E2E-VFIO-FAIL: kexec-detach-linux stage $stage: $*"
    } >&2
    reboot -f
    exit 1
}

# Print the first match of the extended regex $1 in the console log after line $2 (CRs
# removed), waiting up to $3 seconds; fail when it does not come or the VMM exits first.
wait_match() {
    wm_start=$(now)
    while :; do
        wm_hit=$(tail -n "+$(($2 + 1))" "$console_log" | tr -d '\r' | grep -oE -- "$1" | head -n1)
        if [ -n "$wm_hit" ]; then
            printf '%s\n' "$wm_hit"
            return 0
        fi
        grep -qF "Kernel panic" "$console_log" && fail "guest kernel panic"
        kill -0 "$vmm" 2>/dev/null || fail "the VMM exited before /$1/ appeared"
        elapsed_over "$wm_start" "$3" && fail "no /$1/ on the guest console within $3 s"
        sleep 0.1
    done
}
lines() { wc -l <"$console_log"; }
# Type a line on the guest's serial console (the VMM's stdin FIFO, held open on fd 3).
type_line() { printf '%s\n' "$1" >&3; }

# Types a command that prints "<tag>=<value>:END" and prints the value. The tag is spelled
# with an arithmetic expansion ($2 is the tag's stem) so the echo of the typed line cannot
# match.
ask() {
    ask_from=$(lines)
    type_line "echo $2\$((1+1))=$1:END"
    wait_match "${2}2=[^:]*:END" "$ask_from" "$3" | sed "s/^${2}2=//; s/:END\$//"
}

# The guest's kernel log lines about edu and PCI hot-plug, as E2E-VFIO-LINUX lines.
print_dmesg() {
    pd_from=$(lines)
    type_line "dmesg | grep -iE '11e8|acpiphp|eject|pci 0000:00:$slot' | grep -v 'Slot .* registered' | sed 's/^/GUEST-DMESG: /'; echo DMESG\$((1+1)):END"
    wait_match 'DMESG2:END' "$pd_from" 60 >/dev/null
    tail -n "+$((pd_from + 1))" "$console_log" | tr -d '\r' | grep '^GUEST-DMESG: ' |
        sed "s/^GUEST-DMESG: /E2E-VFIO-LINUX $1 dmesg: /"
}

# The number of enumerations of edu in the guest's kernel log.
enumerations() { ask "\$(dmesg | grep -c '$enum_pattern')" ENUM 60; }

# Waits in the guest up to 30 s for its PCI device $bdf, then prints "vendor/device/".
guest_identity() {
    ask "\$(i=0; while [ ! -e /sys/bus/pci/devices/$bdf ] && [ \$i -lt 300 ]; do usleep 100000; i=\$((i+1)); done; cat /sys/bus/pci/devices/$bdf/vendor /sys/bus/pci/devices/$bdf/device 2>/dev/null | tr '\\n' /)" "$1" 60
}

for f in /lib/vfio-stage.sh /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/bzImage /guest/initramfs.cpio.gz; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
mkdir -p "$work" || fail "cannot create $work"
[ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (kernel without LUO or no liveupdate=on)"

# edu to vfio-pci, in either kernel.
bind_edu
host_bdf=$bdf
echo "E2E-VFIO-LINUX-STAGE$stage edu $host_bdf bound to vfio-pci"
start_kernel_agent "$agent_socket" "$work/luod.log"
mkfifo "$work/vmm.in" || fail "mkfifo failed"

if [ "$stage" = 1 ]; then
    t0=$(now)
    cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
        --kernel /guest/bzImage --initramfs /guest/initramfs.cpio.gz \
        --cmdline "console=ttyS0 panic=-1" --memory size=256M --cpus boot=1 \
        --serial tty --console off <"$work/vmm.in" >"$console_log" 2>"$vmm_log" &
    vmm=$!
    # Holding the write end open keeps the VMM's stdin from seeing EOF.
    exec 3>"$work/vmm.in"
    wait_match LINUX-GUEST-READY 0 300 >/dev/null
    echo "E2E-VFIO-LINUX guest ready after $(since "$t0") s"
    # Kernel messages on the console could split the lines this script reads; dmesg has them.
    type_line 'dmesg -n 1'
    [ "$(enumerations)" = 0 ] || fail "the guest has edu before the hot-add"

    reply=$(ch-remote --api-socket "$api_socket" add-device "path=$dev,kexec=detach" 2>&1) ||
        fail "hot add-device failed: $reply"
    reply=$(echo "$reply" | tr -d ' \n')
    echo "E2E-VFIO-LINUX hot-add reply: $reply"
    grep -o 'VFIO device .*' "$vmm_log" | sed 's/^/E2E-VFIO-LINUX vmm: /'
    bdf=$(echo "$reply" | sed -n 's/.*"bdf":"\([^"]*\)".*/\1/p')
    case "$bdf" in 0000:00:[01][0-9a-f].0) ;; *) fail "no guest BDF in the add-device reply: $reply" ;; esac
    slot=$(echo "$bdf" | cut -d: -f3 | cut -d. -f1)
    seen=$(guest_identity SEEN)
    echo "E2E-VFIO-LINUX seen after hot-add: $bdf $seen"
    [ "$seen" = "0x1234/0x11e8/" ] || fail "the guest does not see edu at $bdf after the hot-add (got '$seen')"
    print_dmesg hot-add
    enum_before=$(enumerations)
    [ "$enum_before" = 1 ] || fail "the guest's kernel log has $enum_before enumerations of edu, expected 1"

    next="$(echo "$cmdline" | sed 's/ *e2e_stage=[^ ]*//') e2e_stage=2 e2e_guest_bdf=$bdf e2e_enum_before=$enum_before"
    load_next_kernel "$agent_socket" "$work/luod.log" "$session" "$next"
    # The VMM's release, unplug and freeze lines are the last it says before the machine
    # kexecs: polled often and written through the kernel log, whose console output is
    # synchronous (busybox tail -f polls once a second, and tty output can be lost at a kexec).
    watch_log "$vmm_log" E2E-VFIO-LINUX '*the guest to release*' '*unplugged*' '*handed over*' &
    echo "E2E-VFIO-LINUX live-update at $(now)"
    live_update_across_kexec "$api_socket" "$session"
fi

bdf=$(arg e2e_guest_bdf "")
slot=$(echo "$bdf" | cut -d: -f3 | cut -d. -f1)
enum_before=$(arg e2e_enum_before 0)
[ -n "$bdf" ] || fail "no e2e_guest_bdf on the command line"
echo "E2E-VFIO-LINUX restore at $(now)"
cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
    --restore "source_url=luo://$session" <"$work/vmm.in" >"$console_log" 2>"$vmm_log" &
vmm=$!
exec 3>"$work/vmm.in"
wait_attached_again "$vmm_log"
echo "E2E-VFIO-LINUX $(grep -o 'VFIO device .* attached again.*' "$vmm_log" | head -n1)"
echo "E2E-VFIO-LINUX restore steps: $(grep -o 'VM restored from session.*' "$vmm_log" | head -n1)"
answer=$(ask '$((6*7))' ANSWER 120)
echo "E2E-VFIO-LINUX guest answers after the kexec: $answer"
[ "$answer" = 42 ] || fail "the guest answered '$answer' to 6*7"
seen=$(guest_identity AGAIN)
echo "E2E-VFIO-LINUX seen again after the kexec: $bdf $seen"
[ "$seen" = "0x1234/0x11e8/" ] || fail "the guest does not see edu at $bdf after the kexec (got '$seen')"
print_dmesg after-kexec
enum_after=$(enumerations)
echo "E2E-VFIO-LINUX enumerations of edu in the guest's kernel log: $enum_before before the kexec, $enum_after after"
[ "$enum_after" = $((enum_before + 1)) ] ||
    fail "the guest enumerated edu $enum_after times, expected $((enum_before + 1)) (removed and found again)"
errors=$(grep -E 'cloud-hypervisor: +[0-9.]+s: <ERROR>|^Error|panicked' "$vmm_log" | head -n 5)
[ -z "$errors" ] || fail "the restored VMM logged errors: $errors"
echo "E2E-VFIO-PASS"
reboot -f
