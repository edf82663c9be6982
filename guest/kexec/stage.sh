#!/bin/sh
# Test-bed stage of scripts/e2e-kexec: live update of the probe guest across a real kexec.
# The same script runs in both kernels; the stage-2 kernel's command line has `e2e_stage=2`.
#
# Stage 1: ch-luod (kernel mode, /dev/liveupdate), the VMM with the probe guest, then
#   `ch-remote live-update` (in the background: in kernel mode the agent answers the VMM's
#   handover only if the kexec fails) and `ch-luod kexec`, which loads /kexec/bzImage with
#   /kexec/initrd.cpio.gz (this same stage), waits until the session is frozen and reboots.
# Stage 2: a fresh ch-luod, then `cloud-hypervisor --restore source_url=luo://probe`; the probe
#   must go on printing status lines with errors=0 until it has verified all its pattern again.
# Markers on the console (the host timestamps them): E2E-KEXEC-STAGE1/2, E2E-KEXEC-RESTORE,
# E2E-KEXEC-RUNNING, E2E-KEXEC-PASS or E2E-KEXEC-FAIL: why.
# Environment-free: knobs come from the kernel command line (e2e_cpus=, e2e_fill=, e2e_case=).
#
# Error cases (e2e_case=, one boot each, no kexec happens; each ends with E2E-KEXEC-PASS):
#   no-luo      kernel booted with liveupdate=off: ch-luod must refuse to start, naming why;
#   bad-kernel  the session is frozen, then `ch-luod kexec` gets a file that is no kernel:
#               kexec_file_load fails, the VMM's handover fails, it cancels and its guest runs
#               on with errors=0 through two more full passes. Every case also checks that a
#               second kernel-mode ch-luod is refused with "busy" (EBUSY on /dev/liveupdate).

work=/tmp/e2e
agent_socket=$work/luod.sock
api_socket=$work/api.sock
session=probe
cmdline=$(cat /proc/cmdline)

arg() {
    for word in $cmdline; do
        case "$word" in "$1"=*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}
cpus=$(arg e2e_cpus 1)
fill=$(arg e2e_fill 5)
stage=$(arg e2e_stage 1)
case_name=$(arg e2e_case kexec)

fail() {
    {
        for f in "$work/luod.log" "$work/vmm.log" "$work/vmm.err" "$work/kexec.log" "$work/remote.log"; do
            [ -s "$f" ] || continue
            echo "----- last lines of $f"
            tail -n 25 "$f" | tr -d '\r'
        done
        echo "E2E-KEXEC-FAIL: $*"
    } >&2
    reboot -f
    exit 1
}
now() { cut -d' ' -f1 /proc/uptime; }
elapsed_over() { awk -v a="$1" -v b="$(now)" -v t="$2" 'BEGIN { exit !(b - a > t) }'; }

# The probe's last complete status line in FILE (the last line may still be being written).
last_line() { tr -d '\r' <"$1" | grep -o 'probe: status .* uptime_ms=[0-9]*$' | tail -n1; }
# The value of KEY in that line (empty if none).
last_status() { last_line "$1" | grep -o " $2=[0-9]*" | cut -d= -f2; }

start_agent() {
    ch-luod -v --socket "$agent_socket" 2>&1 | tee "$work/luod.log" &
    t=$(now)
    while ! ch-luod --socket "$agent_socket" ping >/dev/null 2>&1; do
        elapsed_over "$t" 10 && fail "ch-luod did not answer within 10 s"
        sleep 0.1
    done
    mode=$(ch-luod --socket "$agent_socket" ping)
    [ "$mode" = kernel ] || fail "ch-luod runs in mode '$mode', not kernel"
    out=$(ch-luod --socket "$work/second.sock" 2>&1) && fail "a second kernel-mode ch-luod started"
    echo "$out" | grep -q busy || fail "a second ch-luod failed without saying busy: $out"
    echo "E2E-KEXEC second ch-luod refused: $out"
}

for f in /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/probe-guest.elf; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
mkdir -p "$work" || fail "cannot create $work"

if [ "$case_name" = no-luo ]; then
    echo "E2E-KEXEC-CASE no-luo"
    [ -e /dev/liveupdate ] && fail "/dev/liveupdate exists although the kernel has liveupdate=off"
    out=$(ch-luod --socket "$agent_socket" 2>&1) && fail "ch-luod started without /dev/liveupdate"
    echo "E2E-KEXEC ch-luod said: $out"
    echo "$out" | grep -q 'liveupdate=on' || fail "ch-luod's error does not say what is missing: $out"
    echo "E2E-KEXEC-PASS"
    reboot -f
    exit 0
fi
[ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (kernel without LUO or no liveupdate=on)"

# Waits until the probe's iter in FILE reaches $2 (errors must stay 0), or fails.
wait_iter() {
    wi_start=$(now)
    until [ "$(last_status "$1" iter)" -ge "$2" ] 2>/dev/null; do
        kill -0 "$3" 2>/dev/null || fail "the VMM exited while waiting for iter >= $2"
        elapsed_over "$wi_start" 300 && fail "iter did not reach $2 within 300 s"
        sleep 0.2
    done
    wi_errors=$(last_status "$1" errors)
    [ "$wi_errors" = 0 ] || fail "the probe reported errors=$wi_errors"
}

if [ "$stage" = 1 ]; then
    echo "E2E-KEXEC-STAGE1 cpus=$cpus fill=$fill"
    for f in /kexec/bzImage /kexec/initrd.cpio.gz; do
        [ -e "$f" ] || fail "$f is missing from the outer initramfs"
    done
    start_agent
    mkfifo "$work/vmm.in" || fail "mkfifo failed"
    cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
        --kernel /guest/probe-guest.elf --cmdline "fill=$fill status_ms=200" \
        --memory size=256M --cpus "boot=$cpus" --serial tty --console off \
        <"$work/vmm.in" >"$work/vmm.log" 2>"$work/vmm.err" &
    vmm_pid=$!
    exec 3>"$work/vmm.in"
    t=$(now)
    # Two full passes before the update, so the pattern is established everywhere.
    until [ "$(last_status "$work/vmm.log" iter)" -ge $((2 * cpus)) ] 2>/dev/null; do
        kill -0 "$vmm_pid" 2>/dev/null || fail "the VMM exited before the guest ran"
        elapsed_over "$t" 300 && fail "no probe status with iter >= $((2 * cpus)) within 300 s"
        sleep 0.2
    done
    errors=$(last_status "$work/vmm.log" errors)
    [ "$errors" = 0 ] || fail "the probe reported errors=$errors before the update"
    echo "E2E-KEXEC probe before: $(last_line "$work/vmm.log")"

    if [ "$case_name" = bad-kernel ]; then
        echo "E2E-KEXEC-CASE bad-kernel"
        ch-remote --api-socket "$api_socket" live-update --session "$session" >"$work/remote.log" 2>&1 &
        remote_pid=$!
        t=$(now)
        until ch-luod --socket "$agent_socket" list | grep -q '"frozen"'; do
            elapsed_over "$t" 120 && fail "the session did not freeze within 120 s"
            sleep 0.05
        done
        ch-luod --socket "$agent_socket" kexec --kernel /bin/ch-remote --cmdline x --timeout 10 \
            --session "$session" >"$work/kexec.log" 2>&1 && fail "ch-luod kexec of a non-kernel succeeded"
        echo "E2E-KEXEC kexec said: $(cat "$work/kexec.log")"
        grep -q 'kexec_file_load' "$work/kexec.log" || fail "the kexec error does not name kexec_file_load"
        wait "$remote_pid" && fail "the live-update call succeeded although the kexec failed"
        echo "E2E-KEXEC live-update said: $(tr '\n' ' ' <"$work/remote.log")"
        sessions=$(ch-luod --socket "$agent_socket" list)
        [ -z "$sessions" ] || fail "the VMM did not cancel its session: $sessions"
        iter0=$(last_status "$work/vmm.log" iter)
        wait_iter "$work/vmm.log" $((iter0 + 2 * cpus)) "$vmm_pid"
        echo "E2E-KEXEC probe after the failed kexec: $(last_line "$work/vmm.log")"
        echo "E2E-KEXEC-PASS"
        reboot -f
        exit 0
    fi
    # The kexec first: loading the image takes a while, and the barrier waits for the session
    # (--session) while the VMM prepares; the live update starts once the image is loaded, so
    # the guest's pause does not include the load.
    next="$(echo "$cmdline" | sed 's/ *e2e_stage=[^ ]*//') e2e_stage=2"
    ch-luod --socket "$agent_socket" kexec --kernel /kexec/bzImage \
        --initrd /kexec/initrd.cpio.gz --cmdline "$next" --timeout 120 --session "$session" \
        >"$work/kexec.log" 2>&1 &
    kexec_pid=$!
    t=$(now)
    until grep -q 'loaded; waiting' "$work/luod.log"; do
        kill -0 "$kexec_pid" 2>/dev/null || fail "ch-luod kexec exited before the image was loaded"
        elapsed_over "$t" 60 && fail "the kexec image was not loaded within 60 s"
        sleep 0.05
    done
    echo "E2E-KEXEC-LIVE-UPDATE"
    ch-remote --api-socket "$api_socket" live-update --session "$session" >"$work/remote.log" 2>&1 &
    remote_pid=$!
    wait "$kexec_pid"
    rc=$?
    # Only a failed kexec gets here: the guest must run on in the old VMM.
    sleep 2
    kill -0 "$remote_pid" 2>/dev/null && fail "ch-luod kexec exited $rc and the live-update call still waits"
    kill -0 "$vmm_pid" 2>/dev/null || fail "ch-luod kexec exited $rc and the VMM is gone"
    fail "ch-luod kexec exited $rc: $(cat "$work/kexec.log")"
fi

echo "E2E-KEXEC-STAGE2"
start_agent
ch-luod --socket "$agent_socket" list
mkfifo "$work/vmm.in" || fail "mkfifo failed"
echo "E2E-KEXEC-RESTORE"
cloud-hypervisor -v --liveupdate "agent=$agent_socket" --restore "source_url=luo://$session" \
    <"$work/vmm.in" >"$work/vmm.log" 2>"$work/vmm.err" &
vmm_pid=$!
exec 3>"$work/vmm.in"
t=$(now)
until [ -n "$(last_status "$work/vmm.log" iter)" ]; do
    kill -0 "$vmm_pid" 2>/dev/null || fail "the restoring VMM exited"
    elapsed_over "$t" 120 && fail "no probe status line within 120 s of the restore"
    sleep 0.05
done
echo "E2E-KEXEC-RUNNING"
first=$(last_line "$work/vmm.log")
echo "E2E-KEXEC probe first after: $first"
iter0=$(last_status "$work/vmm.log" iter)
# A pass under way at the pause may have started before it: two more passes per CPU make sure
# one whole pass over every CPU's slice ran after the restore.
target=$((iter0 + 2 * cpus))
t=$(now)
until [ "$(last_status "$work/vmm.log" iter)" -ge "$target" ] 2>/dev/null; do
    kill -0 "$vmm_pid" 2>/dev/null || fail "the restored VMM exited"
    elapsed_over "$t" 300 && fail "iter did not reach $target within 300 s"
    sleep 0.2
done
last=$(last_line "$work/vmm.log")
echo "E2E-KEXEC probe verified: $last"
errors=$(last_status "$work/vmm.log" errors)
[ "$errors" = 0 ] || fail "the probe reported errors=$errors after the kexec"
grep -q 'probe: mismatch' "$work/vmm.log" && fail "the probe reported a mismatch"
grep -E '<ERROR>|panicked' "$work/vmm.err" && fail "the restored VMM logged an error"
echo "E2E-KEXEC restore steps: $(grep -o 'VM restored from session.*' "$work/vmm.err" | head -n1)"
grep -F '<WARN>' "$work/vmm.err" | sed 's/^/E2E-KEXEC restored VMM warned: /'
sessions=$(ch-luod --socket "$agent_socket" list)
[ -z "$sessions" ] || fail "the agent still holds sessions after FINISH: $sessions"
echo "E2E-KEXEC-PASS"
reboot -f
