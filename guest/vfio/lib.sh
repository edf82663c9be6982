# Shared by the test-bed stages of scripts/e2e-vfio, scripts/test-nested-net and
# scripts/test-nested-vsock (sourced from /lib/vfio-stage.sh, which those scripts add to every
# image). The stage defines fail() (prints its logs, then
# E2E-VFIO-FAIL: why) before it calls anything here.
# shellcheck shell=sh disable=SC2154 # $work, $vmm and $console_in are the stage's

now() { cut -d' ' -f1 /proc/uptime; }
elapsed_over() { awk -v a="$1" -v b="$(now)" -v t="$2" 'BEGIN { exit !(b - a > t) }'; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# Prints "$1 alive at <uptime> s" every 5 s, in the background, until the test bed ends. A
# stage's waits may be silent for up to 120 s before they report; with this line, a console
# silent for scripts/testbed's --stall (TESTBED_LINUX_STAGE_STALL) means the test bed stopped.
keep_alive() {
    (while sleep 5; do echo "$1 alive at $(now) s"; done) &
}

# Types line $1 into the console of the current VMM: the FIFO $console_in, the stdin of pid
# $vmm. Opening a FIFO for writing blocks until it has a reader, so once the VMM is gone a plain
# `printf >fifo` would hang the stage, and the test bed with it, without a word: the open gets
# 10 s here, and the stage fails naming the line.
type_line() {
    kill -0 "$vmm" 2>/dev/null || fail "the VMM (pid $vmm) exited before '$1' could be typed into its console"
    timeout 10 sh -c 'printf "%s\n" "$1" >"$2"' type_line "$1" "$console_in" ||
        fail "could not type '$1' into the console of the VMM (pid $vmm) within 10 s"
}

# The last $1 lines of each non-empty file after it (for a stage's fail()).
dump_logs() {
    dl_lines=$1
    shift
    for f in "$@"; do
        [ -s "$f" ] || continue
        echo "----- last lines of $f"
        tail -n "$dl_lines" "$f" | tr -d '\r'
    done
}

# The guest console $1 as a failure report: its last $2 lines and, before them, what a guest
# kernel said when it crashed (the first oops, BUG or panic and the 60 lines after it), which a
# reboot of the guest (panic=-1) pushes out of the last lines. The guest's "Kernel panic" is
# reworded: the test bed's serial driver takes those words for its own kernel's panic.
dump_console() {
    [ -s "$1" ] || return 0
    tr -d '\r' <"$1" | sed 's/Kernel panic/Kernel-panic (guest)/' >"$1.report"
    dc_first=$(grep -nE 'Kernel-panic|BUG:|Oops|general protection|double fault|Call Trace' "$1.report" | head -n1 | cut -d: -f1)
    if [ -n "$dc_first" ]; then
        echo "----- the guest kernel's first crash report in $1 (line $dc_first)"
        sed -n "$((dc_first > 5 ? dc_first - 5 : 1)),$((dc_first + 60))p" "$1.report"
    fi
    echo "----- last lines of $1"
    tail -n "$2" "$1.report"
}

# The value of key $1 on the kernel command line, else $2.
arg() {
    read -r arg_cmdline </proc/cmdline
    for word in $arg_cmdline; do
        case "$word" in "$1"=*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}

# Binds QEMU's edu device (PCI 1234:11e8) to vfio-pci; sets $dev (its sysfs path) and $bdf.
bind_edu() {
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
}

# Starts ch-luod in kernel mode (/dev/liveupdate) on socket $1, its log in $2.
start_kernel_agent() {
    ch-luod -v --socket "$1" >"$2" 2>&1 &
    ka_start=$(now)
    while ! ch-luod --socket "$1" ping >/dev/null 2>&1; do
        elapsed_over "$ka_start" 10 && fail "ch-luod did not answer within 10 s"
        sleep 0.1
    done
    ka_mode=$(ch-luod --socket "$1" ping)
    [ "$ka_mode" = kernel ] || fail "ch-luod runs in mode '$ka_mode', not kernel"
}

# Has the agent at $1 (log $2) load /kexec/bzImage and /kexec/initrd.cpio.gz with command line
# $4, to boot once the sessions named in $3 (separated by white space) are frozen (waiting at
# most $5 seconds, default 120); returns when the image is loaded, with ch-luod kexec's pid in
# $kexec_pid and its output in $work/kexec.log.
load_next_kernel() {
    nk_sessions=""
    for nk_name in $3; do nk_sessions="$nk_sessions --session $nk_name"; done
    # shellcheck disable=SC2086 # one --session NAME pair per session
    ch-luod --socket "$1" kexec --kernel /kexec/bzImage --initrd /kexec/initrd.cpio.gz \
        --cmdline "$4" --timeout "${5:-120}" $nk_sessions >"$work/kexec.log" 2>&1 &
    kexec_pid=$!
    nk_start=$(now)
    # The agent may have loaded (and given up on) an image before: wait for a new line.
    nk_before=$(grep -c 'loaded; waiting' "$2")
    until [ "$(grep -c 'loaded; waiting' "$2")" -gt "$nk_before" ]; do
        kill -0 "$kexec_pid" 2>/dev/null || fail "ch-luod kexec exited before the image was loaded"
        elapsed_over "$nk_start" 60 && fail "the kexec image was not loaded within 60 s"
        sleep 0.05
    done
}

# Live-updates the VM of API socket $1 into session $2 while the kernel loaded by
# load_next_kernel waits for it; the machine then kexecs, so this returns only by failing,
# saying why the kexec did not happen.
live_update_across_kexec() {
    ch-remote --api-socket "$1" live-update --session "$2" >"$work/remote.log" 2>&1 &
    lu_remote=$!
    wait "$kexec_pid"
    lu_rc=$?
    sleep 2
    kill -0 "$lu_remote" 2>/dev/null && fail "ch-luod kexec exited $lu_rc and the live-update call still waits"
    kill -0 "$vmm" 2>/dev/null || fail "ch-luod kexec exited $lu_rc and the VMM is gone"
    fail "ch-luod kexec exited $lu_rc: $(cat "$work/kexec.log") / live-update: $(cat "$work/remote.log")"
}

# Copies the lines of log $1 that match one of the shell patterns after $3 to the kernel log as
# "$2 log: <line>", until the machine kexecs. The kernel log's console output is synchronous;
# busybox tail -f polls once a second and tty output can be lost at a kexec. Run it in the
# background.
watch_log() {
    wl_log=$1 wl_prefix=$2
    shift 2
    wl_seen=$(wc -l <"$wl_log")
    while :; do
        wl_now=$(wc -l <"$wl_log")
        if [ "$wl_now" -gt "$wl_seen" ]; then
            tail -n "+$((wl_seen + 1))" "$wl_log" | head -n "$((wl_now - wl_seen))" | tr -d '\r' |
                while IFS= read -r l; do
                    for pattern in "$@"; do
                        # shellcheck disable=SC2254 # the patterns are patterns
                        case "$l" in $pattern) echo "$wl_prefix log: $l" >/dev/kmsg; break ;; esac
                    done
                done
            wl_seen=$wl_now
        fi
        sleep 0.05
    done
}

# Waits for the VMM ($vmm, log $1) that restores the VM to attach the detached edu again.
wait_attached_again() {
    aa_start=$(now)
    until grep -q 'attached again' "$1" 2>/dev/null; do
        kill -0 "$vmm" 2>/dev/null || fail "the restoring VMM exited"
        grep -q 'Cannot attach VFIO device' "$1" && fail "the VMM could not attach edu again"
        elapsed_over "$aa_start" 120 && fail "edu was not attached again within 120 s of the restore"
        sleep 0.2
    done
    grep -q 'VFIO device .* adopted' "$1" && fail "the restored VMM claims to have adopted the device"
}
