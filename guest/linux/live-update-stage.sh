#!/bin/sh
# Test-bed stage: boot the small Linux guest under our VMM on nested KVM with a raw virtio-blk
# disk, write a string onto the disk from the guest, live-update the VMM in restart mode
# (ch-luod --emulate), and check through the successor's serial console that the guest runs
# on, its clock advances and the disk still holds the string (and takes a second write).
# Prints NESTED-LIVE-UPDATE-PASS or NESTED-LIVE-UPDATE-FAIL: <why>.
# Needs in the initramfs (scripts/test-nested-live-update adds them): /bin/cloud-hypervisor,
# /bin/ch-remote, /bin/ch-luod, /bin/serial-drive, /guest/bzImage, /guest/initramfs.cpio.gz
# Both VMMs run with stdin from a FIFO and stdout+stderr to a file that this script polls:
# the serial console moves from one process to the other, which one serial-drive cannot follow.
# shellcheck disable=SC2016 # the lines typed to the guest are expanded by the guest's shell
timeout="${NESTED_TIMEOUT:-1200}"
work=/tmp/lu
agent_socket=$work/luod.sock
old_socket=$work/old.sock
new_socket=$work/new.sock
disk=$work/disk.img
session=linux
data="LIVE-UPDATE-DATA-$$-$(cut -d' ' -f1 /proc/uptime | tr -d .)"
data2="AFTER-UPDATE-DATA-$$"

# Each thread of process $1 with the number of the system call it waits in (-1 or "running"
# when it is not in one): shows where a hung VMM is stuck.
threads() {
    kill -0 "$1" 2>/dev/null || return 0
    for t in /proc/"$1"/task/*; do
        echo "  $2 thread $(cat "$t/comm" 2>/dev/null): syscall $(cut -d' ' -f1 "$t/syscall" 2>/dev/null)"
    done
}

# To stderr (the console too): fail may run inside a command substitution.
fail() {
    # The marker goes last: the test bed stops reading once it sees it.
    {
        for f in "$work/old.log" "$work/new.log" "$work/luod.log"; do
            [ -s "$f" ] || continue
            echo "----- last lines of $f"
            tail -n 30 "$f" | tr -d '\r'
        done
        echo "-----"
        threads "${old_pid:-}" "old VMM"
        threads "${new_pid:-}" successor
        [ -S "${new_socket:-/nonexistent}" ] && echo "successor counters: $(timeout 5 ch-remote --api-socket "$new_socket" counters 2>&1)"
        echo "NESTED-LIVE-UPDATE-FAIL: $*"
    } >&2
    reboot -f
    exit 1
}
now() { cut -d' ' -f1 /proc/uptime; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
timing() { echo "LIVE-UPDATE-TIMING $1: $2 s"; }

# Print the first match of the extended regex $2 in the log $1 (CRs removed), waiting up to
# $3 seconds; fail when it does not come or when $4 (a process id) exits first.
wait_match() {
    wm_start=$(now)
    while :; do
        wm_hit=$(tr -d '\r' <"$1" | grep -oE -- "$2" | head -n1)
        if [ -n "$wm_hit" ]; then
            printf '%s\n' "$wm_hit"
            return 0
        fi
        if grep -qF "Kernel panic" "$1"; then
            fail "guest kernel panic in $1"
        fi
        if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null; then
            fail "process $4 exited before /$2/ appeared in $1"
        fi
        if awk -v a="$wm_start" -v b="$(now)" -v t="$3" 'BEGIN { exit !(b - a > t) }'; then
            fail "no /$2/ in $1 within $3 s"
        fi
        sleep 0.1
    done
}

# Type a line on a VMM's serial console (its stdin FIFO, held open on fd 3 or 4).
type_old() { printf '%s\n' "$1" >&3; }
type_new() { printf '%s\n' "$1" >&4; }

for f in /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/bzImage /guest/initramfs.cpio.gz; do
    [ -e "$f" ] || fail "$f is missing from the test-bed initramfs"
done
mkdir -p "$work" || fail "cannot create $work"

# The session agent, in restart mode (no /dev/liveupdate needed).
ch-luod --emulate -v --socket "$agent_socket" >"$work/luod.log" 2>&1 &
luod_pid=$!
t=$(now)
while ! ch-luod --socket "$agent_socket" ping >/dev/null 2>&1; do
    kill -0 "$luod_pid" 2>/dev/null || fail "ch-luod exited at start"
    awk -v a="$t" -v b="$(now)" 'BEGIN { exit !(b - a > 10) }' && fail "ch-luod did not answer within 10 s"
    sleep 0.1
done

# A small raw disk; the first sector is all zeros.
dd if=/dev/zero of="$disk" bs=1024 count=1024 2>/dev/null || fail "cannot create $disk"

mkfifo "$work/old.in" "$work/new.in" || fail "mkfifo failed"
phase=$(now)
cloud-hypervisor -v --api-socket "path=$old_socket" --liveupdate "agent=$agent_socket" \
    --kernel /guest/bzImage --initramfs /guest/initramfs.cpio.gz \
    --cmdline "console=ttyS0 panic=-1" --memory size=256M --cpus boot=1 \
    --disk "path=$disk" --serial tty --console off \
    <"$work/old.in" >"$work/old.log" 2>&1 &
old_pid=$!
vmm_started=$(now)
# Holding the write ends open keeps the VMMs' stdin from seeing EOF.
exec 3>"$work/old.in"

wait_match "$work/old.log" LINUX-GUEST-READY "$timeout" "$old_pid" >/dev/null
timing "guest ready (old VMM)" "$(since "$phase")"

# A ticker inside the guest: its clock every 100 ms, to see the pause the guest saw.
type_old 'while :; do cut -d" " -f1 /proc/uptime; usleep 100000; done >/tmp/ticks &'
# The echo of a typed line shows the command; its output ends in a fixed suffix (":END"),
# with a value the command line itself does not contain.
phase=$(now)
type_old "echo $data | dd of=/dev/vda conv=fsync 2>/dev/null && echo WRITE-RC=\$?:END"
wait_match "$work/old.log" 'WRITE-RC=[0-9]+:END' 120 "$old_pid" | grep -qx 'WRITE-RC=0:END' ||
    fail "the guest could not write /dev/vda"
timing "guest wrote the disk" "$(since "$phase")"
host_copy=$(head -c ${#data} "$disk")
[ "$host_copy" = "$data" ] || fail "the disk image holds '$host_copy', not '$data', after the guest's fsync"
type_old 'echo UP1=$(cut -d" " -f1 /proc/uptime):END'
up1=$(wait_match "$work/old.log" 'UP1=[0-9.]+:END' 60 "$old_pid" | sed 's/^UP1=//; s/:END$//')
echo "LIVE-UPDATE guest uptime before the update: $up1 s"
# The guest booted after its VMM started, so its uptime cannot exceed the test bed's time since
# then; and its 100 ms ticker must have ticked all along (its timers fire). Both failed when KVM
# was left believing the guest's TSC stood still (see vmm/src/cpu/tsc.rs).
elapsed=$(since "$vmm_started")
if awk -v up="$up1" -v el="$elapsed" 'BEGIN { exit !(up > 1.5 * el + 1) }'; then
    fail "the guest's clock runs fast before any update: uptime $up1 s after $elapsed s of test-bed time"
fi
type_old 'echo STEP1=$(awk "NR > 1 && \$1 - p > g { g = \$1 - p } { p = \$1 } END { printf \"%.2f\", g }" /tmp/ticks):END'
step1=$(wait_match "$work/old.log" 'STEP1=[0-9.]+:END' 60 "$old_pid" | sed 's/^STEP1=//; s/:END$//')
echo "LIVE-UPDATE largest step of the guest's 100 ms ticker before the update: $step1 s"
awk -v g="$step1" 'BEGIN { exit !(g > 5) }' &&
    fail "the guest's timers stall before any update (ticker step $step1 s)"

# The successor starts first and waits for the handover.
cloud-hypervisor -v --api-socket "path=$new_socket" --liveupdate "agent=$agent_socket" \
    --restore "source_url=luo://$session" \
    <"$work/new.in" >"$work/new.log" 2>&1 &
new_pid=$!
exec 4>"$work/new.in"
sleep 0.5
kill -0 "$new_pid" 2>/dev/null || fail "the successor exited while waiting for the handover"

phase=$(now)
response=$(timeout 60 ch-remote --api-socket "$old_socket" live-update --session "$session" 2>&1)
rc=$?
timing "live-update API call" "$(since "$phase")"
echo "LIVE-UPDATE response: $response"
[ "$rc" -eq 0 ] || fail "ch-remote live-update exited $rc (143: no answer within 60 s)"

# The old VMM must exit by itself, with status 0.
t=$(now)
while kill -0 "$old_pid" 2>/dev/null; do
    awk -v a="$t" -v b="$(now)" 'BEGIN { exit !(b - a > 30) }' && fail "the old VMM did not exit within 30 s of the update"
    sleep 0.1
done
wait "$old_pid"
old_rc=$?
timing "old VMM exited after the call" "$(since "$phase")"
[ "$old_rc" -eq 0 ] || fail "the old VMM exited with status $old_rc"

# The successor owns the console now: clock, then the disk read past the page cache.
type_new 'echo UP2=$(cut -d" " -f1 /proc/uptime):END'
up2=$(wait_match "$work/new.log" 'UP2=[0-9.]+:END' 120 "$new_pid" | sed 's/^UP2=//; s/:END$//')
timing "successor answered on the console after the call" "$(since "$phase")"
echo "LIVE-UPDATE guest uptime after the update: $up2 s"
awk -v a="$up1" -v b="$up2" 'BEGIN { exit !(b > a) }' || fail "guest uptime did not advance ($up1 -> $up2)"

type_new "echo DISK=\$(dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | head -c ${#data}):END"
disk_seen=$(wait_match "$work/new.log" 'DISK=[A-Z0-9-]*:END' 60 "$new_pid" | sed 's/^DISK=//; s/:END$//')
echo "LIVE-UPDATE guest read from /dev/vda after the update: $disk_seen"
[ "$disk_seen" = "$data" ] || fail "the guest read '$disk_seen' from /dev/vda, expected '$data'"

# The restored block queue must take new requests too.
type_new "echo $data2 | dd of=/dev/vda bs=512 seek=1 conv=fsync 2>/dev/null && echo WRITE2-RC=\$?:END"
wait_match "$work/new.log" 'WRITE2-RC=[0-9]+:END' 60 "$new_pid" | grep -qx 'WRITE2-RC=0:END' ||
    fail "the guest could not write /dev/vda after the update"
host_copy=$(dd if="$disk" bs=512 skip=1 count=1 2>/dev/null | head -c ${#data2})
[ "$host_copy" = "$data2" ] || fail "the disk image holds '$host_copy' at sector 1, not '$data2'"

# The guest's timers fire after the update too: the ticker goes on by itself.
type_new 'echo TICKS1=$(wc -l </tmp/ticks):END'
ticks1=$(wait_match "$work/new.log" 'TICKS1=[0-9]+:END' 60 "$new_pid" | sed 's/^TICKS1=//; s/:END$//')
sleep 3
type_new 'echo TICKS2=$(wc -l </tmp/ticks):END'
ticks2=$(wait_match "$work/new.log" 'TICKS2=[0-9]+:END' 60 "$new_pid" | sed 's/^TICKS2=//; s/:END$//')
echo "LIVE-UPDATE guest ticker lines 3 s apart after the update: $ticks1 -> $ticks2"
[ "$ticks2" -gt "$ticks1" ] || fail "the guest's timers do not fire after the update (ticker stuck at $ticks1 lines)"

# The largest step of the guest's own clock over the update.
type_new 'echo GAP=$(awk "NR > 1 && \$1 - p > g { g = \$1 - p } { p = \$1 } END { printf \"%.2f\", g }" /tmp/ticks):END'
gap=$(wait_match "$work/new.log" 'GAP=[0-9.]+:END' 60 "$new_pid" | sed 's/^GAP=//; s/:END$//')
echo "LIVE-UPDATE largest step of the guest's 100 ms ticker: $gap s"

# No errors from either VMM process (its log lines, "Error: ..." on exit, a Rust panic);
# warnings and the guest's own complaints after the update are shown, not judged.
vmm_errors='cloud-hypervisor: +[0-9.]+s: <ERROR>|^Error|panicked'
for f in "$work/old.log" "$work/new.log"; do
    errors=$(tr -d '\r' <"$f" | grep -E "$vmm_errors" | head -n 5)
    [ -z "$errors" ] || fail "$f has errors: $errors"
done
tr -d '\r' <"$work/new.log" | grep -iE 'warn|error|stall|bug' | sed 's/^/LIVE-UPDATE note from the successor: /'
echo "----- successor console"
tr -d '\r' <"$work/new.log"
echo "-----"

kill "$new_pid" "$luod_pid" 2>/dev/null
echo "NESTED-LIVE-UPDATE-PASS (uptime $up1 -> $up2 s, largest guest clock step $gap s)"
reboot -f
