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
# More kexecs (e2e_kexecs=N, default 1; e.g. 2 for 7.2 -> 7.3 -> 7.2): stage K <= N, once the
#   guest is verified, updates it across the next kexec the same way (its image holds the next
#   kernel and image in /kexec); stage N+1 ends the run. Each stage names its kernel (uname -r)
#   and, after a kexec, the hop with the restoring VMM's pause: E2E-KEXEC-HOP K: FROM -> TO.
# Markers on the console (the host timestamps them): E2E-KEXEC-STAGE1/2, E2E-KEXEC-RESTORE,
# E2E-KEXEC-RUNNING, E2E-KEXEC-PASS or E2E-KEXEC-FAIL: why.
# In the test bed it is environment-free: knobs come from the kernel command line (e2e_cpus=,
# e2e_fill=, e2e_case=) and its files lie at / in the initramfs. On a bare-metal host
# (scripts/e2e-kexec --bare-metal) E2E_BASE names the directory holding bin/, guest/ and
# kexec/, E2E_BARE_METAL=1 makes every end an exit instead of a reboot, and stage 2 is started
# after the kexec by the systemd unit that script installs.
#
# Error cases (e2e_case=; each ends with E2E-KEXEC-PASS):
#   no-luo      kernel booted with liveupdate=off: ch-luod must refuse to start, naming why;
#   bad-target  targets the agent can tell are unfit are refused before the guest is paused:
#               `ch-luod kexec` of a file that is no kernel (kexec_file_load fails) and of the
#               real kernel with a command line lacking liveupdate=on (refused before loading);
#               after each, the VMM's live update is refused (409, no next kernel loaded)
#               before it pauses anything, the agent holds no session and the guest runs on
#               with errors=0. Then what cannot be told in advance: a kexec into a kernel built
#               without LUO (/kexec/noluo-bzImage, the Linux guest's kernel) goes through, and
#               the new kernel has no /dev/liveupdate: the session, and the guest with it, is
#               gone. Every case also checks that a second kernel-mode ch-luod is refused with
#               "busy" (EBUSY on /dev/liveupdate).
#
# Case agent-upgrade (a real kexec, like the default case): the kernel-mode agent is upgraded in
# place while it holds a real LUO session with no connection open. In stage 1 agent-holder
# leaves session "held" (a memfd with a pattern) at the agent, closes its connection and stays
# alive; `ch-luod --upgrade`
# takes /dev/liveupdate, the session fd and the listening socket over and the old agent exits;
# the new one lists the same session, and creating "held" again is refused by the kernel (it
# still has the session). agent-holder freezes "held", and the VMM's update and the kexec go
# through the new agent. In stage 2 the fresh agent is upgraded again before anything is
# retrieved; agent-holder finds every byte of "held" through it, and the probe is restored.
#
# Case inherited (a real kexec, like the default case, but without ch-luod; test bed only):
# luo-standin plays systemd's part for LUOSession= (docs/systemd.md). In stage 1 it creates the
# session (its kernel name differs from the fd name, as systemd's derived names do), loads the
# next kernel, and starts the VMM with the session as fd 3 and LISTEN_PID/LISTEN_FDS/
# LISTEN_FDNAMES set (`--liveupdate inherit=probe`). The stage checks that an update into
# another session is refused (400), live-updates the VM into the inherited session, checks that
# the guest stays paused and that a second update is refused (409), then stops the VMM with
# SIGTERM as `systemctl kexec` stops the unit; the stand-in, still holding the session, reboots
# into the next kernel. In stage 2 it retrieves the session and starts
# `--restore source_url=luo://probe` the same way; the VMM must FINISH the session.

base="${E2E_BASE:-}"
PATH="$base/bin:$PATH"
work="${E2E_WORK:-/tmp/e2e}"
# The test bed ends by powering QEMU off; a bare-metal host must not be rebooted by a test.
reboot() {
    [ -n "${E2E_BARE_METAL:-}" ] || command reboot "$@"
}
agent_socket=$work/luod.sock
api_socket=$work/api.sock
session=probe
# Stands for the name systemd derives from the unit (case inherited).
kernel_session=standin-0123abcd-probe
# E2E_ARGS (bare metal) adds knobs; they ride along on the next kernel's command line.
cmdline="$(cat /proc/cmdline) ${E2E_ARGS:-}"

arg() {
    for word in $cmdline; do
        case "$word" in "$1"=*) echo "${word#*=}"; return ;; esac
    done
    echo "$2"
}
cpus=$(arg e2e_cpus 1)
fill=$(arg e2e_fill 5)
stage=$(arg e2e_stage 1)
kexecs=$(arg e2e_kexecs 1)
case_name=$(arg e2e_case kexec)
# The kernel the previous stage ran (set on the command line of the kexec into this one).
from_kernel=$(arg e2e_from "")

fail() {
    {
        for f in "$work/luod.log" "$work/vmm.log" "$work/vmm.err" "$work/kexec.log" "$work/remote.log" \
            "$work/standin.log"; do
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

# Upgrades the agent in place (case agent-upgrade): a new ch-luod takes everything over from the
# running one, which must exit; both log to luod.log.
upgrade_agent() {
    handed=$(grep -c 'handed over to the new agent' "$work/luod.log")
    ch-luod -v --upgrade --socket "$agent_socket" 2>&1 | tee -a "$work/luod.log" &
    t=$(now)
    until [ "$(grep -c 'handed over to the new agent' "$work/luod.log")" -gt "$handed" ]; do
        elapsed_over "$t" 20 && fail "the running agent did not hand over within 20 s"
        sleep 0.1
    done
    t=$(now)
    while ! ch-luod --socket "$agent_socket" ping >/dev/null 2>&1; do
        elapsed_over "$t" 10 && fail "the new ch-luod did not answer within 10 s"
        sleep 0.1
    done
    echo "E2E-KEXEC agent upgraded in place"
}

# Case agent-upgrade, stage 1, before the update (see the header).
agent_upgrade_stage1() {
    echo "E2E-KEXEC-CASE agent-upgrade"
    # The holder stays alive (as a VMM would) once it has left the session: the agent drops a
    # session whose creator exited before handing it over.
    agent-holder hold "$agent_socket" held >"$work/holder-hold.log" 2>&1 &
    t=$(now)
    until grep -q 'held with' "$work/holder-hold.log"; do
        kill -0 $! 2>/dev/null || fail "agent-holder could not leave a session: $(cat "$work/holder-hold.log")"
        elapsed_over "$t" 10 && fail "agent-holder did not leave a session within 10 s"
        sleep 0.1
    done
    cat "$work/holder-hold.log"
    before=$(ch-luod --socket "$agent_socket" list)
    upgrade_agent
    after=$(ch-luod --socket "$agent_socket" list)
    echo "E2E-KEXEC sessions after the upgrade: $after"
    [ -n "$after" ] && [ "$after" = "$before" ] ||
        fail "the new agent lists '$after', the old one listed '$before'"
    out=$(timeout 10 agent-holder hold "$agent_socket" held 2>&1) && fail "a second session \"held\" was created"
    echo "$out" | grep -q 'exists already' || fail "creating \"held\" again did not fail with EEXIST: $out"
    echo "E2E-KEXEC the kernel still holds \"held\": $out"
    agent-holder freeze "$agent_socket" held >"$work/holder.log" 2>&1 &
}

for f in "$base"/bin/cloud-hypervisor "$base"/bin/ch-remote "$base"/bin/ch-luod "$base"/guest/probe-guest.elf; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
[ "$case_name" != inherited ] || [ -e "$base"/bin/luo-standin ] ||
    fail "$base/bin/luo-standin is missing from the initramfs"
[ "$case_name" != agent-upgrade ] || [ -e "$base"/bin/agent-holder ] ||
    fail "$base/bin/agent-holder is missing from the initramfs"
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
if [ "$case_name" = bad-target ] && [ "$stage" = 2 ]; then
    # The kernel without LUO took the kexec: it cannot give the session back.
    echo "E2E-KEXEC-STAGE$stage kernel $(uname -r) (from ${from_kernel:-?})"
    [ -e /dev/liveupdate ] && fail "the kernel without LUO has /dev/liveupdate"
    echo "E2E-KEXEC the kernel without LUO booted; no /dev/liveupdate: the session and its guest are gone"
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

# The VM's state as the API reports it (Running, Paused, ...).
vm_state() {
    ch-remote --api-socket "$api_socket" info 2>/dev/null | tr -d ' \n' |
        grep -o '"state":"[A-Za-z]*"' | head -n1 | cut -d'"' -f4
}

# Case inherited, stage 1 (see the header); returns only by failing.
inherited_stage1() {
    echo "E2E-KEXEC-STAGE1 cpus=$cpus fill=$fill"
    echo "E2E-KEXEC-CASE inherited"
    for f in "$base"/kexec/bzImage "$base"/kexec/initrd.cpio.gz; do
        [ -e "$f" ] || fail "$f is missing from the outer initramfs"
    done
    next="$(echo "$cmdline" | sed 's/ *e2e_stage=[^ ]*//') e2e_stage=2"
    mkfifo "$work/vmm.in" || fail "mkfifo failed"
    # The stand-in's own lines go to standin.log; the VMM's to vmm.log and vmm.err (a shell
    # redirects its stderr, then execs it: LISTEN_PID stays its pid).
    # shellcheck disable=SC2016
    luo-standin create --session "$kernel_session" --fdname "$session" --pidfile "$work/vmm.pid" \
        --kexec-kernel "$base"/kexec/bzImage --kexec-initrd "$base"/kexec/initrd.cpio.gz \
        --kexec-cmdline "$next" -- /bin/sh -c 'exec "$@" 2>"$0"' "$work/vmm.err" \
        cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "inherit=$session" \
        --kernel "$base"/guest/probe-guest.elf --cmdline "fill=$fill status_ms=200" \
        --memory size=256M --cpus "boot=$cpus" --serial tty --console off \
        <"$work/vmm.in" >"$work/vmm.log" 2>"$work/standin.log" &
    standin_pid=$!
    exec 3>"$work/vmm.in"
    t=$(now)
    until [ -s "$work/vmm.pid" ]; do
        kill -0 "$standin_pid" 2>/dev/null || fail "luo-standin exited before starting the VMM"
        elapsed_over "$t" 60 && fail "luo-standin did not start the VMM within 60 s"
        sleep 0.1
    done
    vmm_pid=$(cat "$work/vmm.pid")
    sed 's/^/E2E-KEXEC /' "$work/standin.log"
    # Two full passes before the update, so the pattern is established everywhere.
    wait_iter "$work/vmm.log" $((2 * cpus)) "$vmm_pid"
    echo "E2E-KEXEC probe before: $(last_line "$work/vmm.log")"
    grep -q "Inherited live-update session \"$session\" (kernel name \"$kernel_session\")" "$work/vmm.err" ||
        fail "the VMM did not log the inherited session with its kernel name"

    out=$(ch-remote --api-socket "$api_socket" live-update --session other 2>&1) &&
        fail "a live update into another session than the inherited one succeeded"
    echo "E2E-KEXEC other session said: $(echo "$out" | tr '\n' ' ')"
    echo "$out" | grep -q '400' || fail "a live update into another session is not a 400: $out"
    echo "$out" | grep -q 'not the inherited session' || fail "the 400 does not say why: $out"
    [ "$(vm_state)" = Running ] || fail "the VM is '$(vm_state)' after a refused update, not Running"

    echo "E2E-KEXEC-LIVE-UPDATE"
    ch-remote --api-socket "$api_socket" live-update --session "$session" >"$work/remote.log" 2>&1 ||
        fail "the live update into the inherited session failed: $(cat "$work/remote.log")"
    echo "E2E-KEXEC live-update said: $(tr '\n' ' ' <"$work/remote.log")"
    grep -q '"timings_us"' "$work/remote.log" || fail "the live-update answer has no timings"
    kill -0 "$vmm_pid" 2>/dev/null || fail "the VMM exited after the live update (it must wait to be stopped)"
    [ "$(vm_state)" = Paused ] || fail "the VM is '$(vm_state)' after the live update, not Paused"
    paused_iter=$(last_status "$work/vmm.log" iter)
    out=$(ch-remote --api-socket "$api_socket" live-update --session "$session" 2>&1) &&
        fail "a second live update into the inherited session succeeded"
    echo "E2E-KEXEC second update said: $(echo "$out" | tr '\n' ' ')"
    echo "$out" | grep -q '409' || fail "a second live update is not a 409: $out"
    echo "$out" | grep -q 'takes no further live update' || fail "the 409 does not say why: $out"
    sleep 1
    [ "$(last_status "$work/vmm.log" iter)" = "$paused_iter" ] || fail "the guest ran on after its live update"

    # `systemctl kexec`: the unit is stopped (SIGTERM), then the stand-in reboots with the session.
    echo "E2E-KEXEC stopping the VMM with SIGTERM"
    kill -TERM "$vmm_pid"
    wait "$standin_pid"
    rc=$?
    fail "luo-standin exited $rc instead of rebooting: $(tail -n 3 "$work/standin.log")"
}

# Case inherited, stage 2: the stand-in retrieves the session and starts the restoring VMM.
inherited_stage2() {
    echo "E2E-KEXEC-STAGE2"
    mkfifo "$work/vmm.in" || fail "mkfifo failed"
    echo "E2E-KEXEC-RESTORE"
    # shellcheck disable=SC2016
    luo-standin retrieve --session "$kernel_session" --fdname "$session" --pidfile "$work/vmm.pid" \
        -- /bin/sh -c 'exec "$@" 2>"$0"' "$work/vmm.err" \
        cloud-hypervisor -v --liveupdate "inherit=$session" --restore "source_url=luo://$session" \
        <"$work/vmm.in" >"$work/vmm.log" 2>"$work/standin.log" &
    vmm_pid=$!
    exec 3>"$work/vmm.in"
}

# After a refused target ($1): the live update must be refused before the guest is paused
# (409, no next kernel loaded), leave no session at the agent, and the guest must run on.
update_refused() {
    ur_iter=$(last_status "$work/vmm.log" iter)
    out=$(ch-remote --api-socket "$api_socket" live-update --session "$session" 2>&1) &&
        fail "the live update went on after the agent refused $1"
    echo "E2E-KEXEC live-update after $1 said: $(echo "$out" | tr '\n' ' ')"
    echo "$out" | grep -q '409' || fail "the refused live update is not a 409: $out"
    echo "$out" | grep -q 'the guest was not paused' || fail "the refusal does not say the guest was not paused: $out"
    [ "$(vm_state)" = Running ] || fail "the VM is '$(vm_state)' after the refused update, not Running"
    sessions=$(ch-luod --socket "$agent_socket" list)
    [ -z "$sessions" ] || fail "the agent holds sessions after the refused update: $sessions"
    wait_iter "$work/vmm.log" $((ur_iter + cpus)) "$vmm_pid"
    echo "E2E-KEXEC probe after $1: $(last_line "$work/vmm.log")"
}

# Live-updates the VM across a kexec into kernel $1 (default /kexec/bzImage) with
# /kexec/initrd.cpio.gz (the next stage), adding $2 to its command line; returns only by failing. The kexec first: loading the image takes a while, and the
# barrier waits for the session (--session) while the VMM prepares; the live update starts once
# the image is loaded, so the guest's pause does not include the load.
kexec_with_the_guest() {
    next_image="${1:-$base/kexec/bzImage}"
    for f in "$next_image" "$base"/kexec/initrd.cpio.gz; do
        [ -e "$f" ] || fail "$f is missing from this stage's initramfs"
    done
    next="$(echo "$cmdline" | sed -e 's/ *e2e_stage=[^ ]*//' -e 's/ *e2e_from=[^ ]*//') e2e_stage=$((stage + 1)) e2e_from=$(uname -r)${2:+ $2}"
    ch-luod --socket "$agent_socket" kexec --kernel "$next_image" \
        --initrd "$base"/kexec/initrd.cpio.gz --cmdline "$next" --timeout 120 --session "$session" \
        >"$work/kexec.log" 2>&1 &
    kexec_pid=$!
    t=$(now)
    until grep -q 'loaded; waiting' "$work/luod.log"; do
        kill -0 "$kexec_pid" 2>/dev/null || fail "ch-luod kexec exited before the image was loaded: $(cat "$work/kexec.log")"
        elapsed_over "$t" 60 && fail "the kexec image was not loaded within 60 s"
        sleep 0.05
    done
    echo "E2E-KEXEC-LIVE-UPDATE from $(uname -r)"
    ch-remote --api-socket "$api_socket" live-update --session "$session" >"$work/remote.log" 2>&1 &
    remote_pid=$!
    wait "$kexec_pid"
    rc=$?
    # Only a failed kexec gets here: the guest must run on in the old VMM.
    sleep 2
    kill -0 "$remote_pid" 2>/dev/null && fail "ch-luod kexec exited $rc and the live-update call still waits"
    kill -0 "$vmm_pid" 2>/dev/null || fail "ch-luod kexec exited $rc and the VMM is gone"
    fail "ch-luod kexec exited $rc: $(cat "$work/kexec.log")"
}

if [ "$case_name" = inherited ] && [ "$stage" = 1 ]; then
    inherited_stage1
fi

if [ "$stage" = 1 ]; then
    echo "E2E-KEXEC-STAGE1 cpus=$cpus fill=$fill kernel $(uname -r)"
    start_agent
    mkfifo "$work/vmm.in" "$work/vmm.errpipe" || fail "mkfifo failed"
    # The VMM's log on the console too: its freeze timings are the last thing it says before
    # the machine kexecs.
    tee "$work/vmm.err" <"$work/vmm.errpipe" &
    cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
        --kernel "$base"/guest/probe-guest.elf --cmdline "fill=$fill status_ms=200" \
        --memory size=256M --cpus "boot=$cpus" --serial tty --console off \
        <"$work/vmm.in" >"$work/vmm.log" 2>"$work/vmm.errpipe" &
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

    if [ "$case_name" = bad-target ]; then
        echo "E2E-KEXEC-CASE bad-target"
        next="$(echo "$cmdline" | sed 's/ *e2e_stage=[^ ]*//') e2e_stage=2 e2e_from=$(uname -r)"
        out=$(ch-luod --socket "$agent_socket" kexec --kernel "$base"/bin/ch-remote --cmdline "$next" \
            --timeout 10 --session "$session" 2>&1) && fail "ch-luod kexec of a non-kernel succeeded"
        echo "E2E-KEXEC kexec of a file that is no kernel said: $out"
        echo "$out" | grep -q 'kexec_file_load' || fail "the kexec error does not name kexec_file_load: $out"
        update_refused "a file that is no kernel"
        out=$(ch-luod --socket "$agent_socket" kexec --kernel "$base"/kexec/bzImage \
            --initrd "$base"/kexec/initrd.cpio.gz --cmdline "console=ttyS0 panic=-1 e2e_stage=2" \
            --timeout 10 --session "$session" 2>&1) && fail "ch-luod kexec without liveupdate=on succeeded"
        echo "E2E-KEXEC kexec with a command line lacking liveupdate=on said: $out"
        echo "$out" | grep -q 'lacks liveupdate=on' || fail "the kexec error does not name liveupdate=on: $out"
        update_refused "a command line without liveupdate=on"
        # What cannot be told in advance: the next kernel has no LUO at all.
        # That kernel (the Linux guest's) has no KVM either: the test bed's /init must not ask.
        kexec_with_the_guest "$base"/kexec/noluo-bzImage testbed_no_kvm=1
    fi
    [ "$case_name" != agent-upgrade ] || agent_upgrade_stage1
    kexec_with_the_guest
fi

if [ "$case_name" = inherited ]; then
    inherited_stage2
else
    echo "E2E-KEXEC-STAGE$stage kernel $(uname -r) (from ${from_kernel:-?})"
    start_agent
    listed=$(ch-luod --socket "$agent_socket" list)
    echo "$listed"
    # The last kernel's agent named the session and its owner (agent/manifest.rs): the new one
    # took it for that owner (root here) as it started, before any VMM asked.
    case "$listed" in
    *"{\"name\":\"$session\",\"direction\":\"incoming\",\"owner_uid\":0"*) ;;
    *) fail "the new agent did not take session $session for its owner from the manifest: $listed" ;;
    esac
    if [ "$case_name" = agent-upgrade ]; then
        upgrade_agent
        out=$(agent-holder check "$agent_socket" held 2>&1) || fail "agent-holder check: $out"
        echo "E2E-KEXEC $out"
    fi
    mkfifo "$work/vmm.in" || fail "mkfifo failed"
    echo "E2E-KEXEC-RESTORE"
    cloud-hypervisor -v --api-socket "path=$api_socket" --liveupdate "agent=$agent_socket" \
        --restore "source_url=luo://$session" <"$work/vmm.in" >"$work/vmm.log" 2>"$work/vmm.err" &
    vmm_pid=$!
    exec 3>"$work/vmm.in"
fi
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
# The guest's clock: its TSC never went back (the VMM moves it forward by the pause).
tsc_back=$(last_status "$work/vmm.log" tsc_back)
[ "$tsc_back" = 0 ] || fail "the probe saw its TSC go back $tsc_back times after the kexec"
grep -q 'probe: mismatch' "$work/vmm.log" && fail "the probe reported a mismatch"
grep -E '<ERROR>|panicked' "$work/vmm.err" && fail "the restored VMM logged an error"
steps=$(grep -o 'VM restored from session.*' "$work/vmm.err" | head -n1)
echo "E2E-KEXEC restore steps: $steps"
hop_pause=$(echo "$steps" | grep -o '("pause", [0-9]*)' | grep -o '[0-9]*')
echo "E2E-KEXEC-HOP $((stage - 1)): ${from_kernel:-?} -> $(uname -r): pause_us=${hop_pause:-?} errors=$errors tsc_back=$tsc_back"
grep -F '<WARN>' "$work/vmm.err" | sed 's/^/E2E-KEXEC restored VMM warned: /'
if [ "$case_name" = inherited ]; then
    grep -q "Session \"$session\" finished" "$work/vmm.err" || fail "the restored VMM did not FINISH the session"
    sed 's/^/E2E-KEXEC /' "$work/standin.log"
else
    sessions=$(ch-luod --socket "$agent_socket" list)
    [ -z "$sessions" ] || fail "the agent still holds sessions after FINISH: $sessions"
fi
if [ "$case_name" = kexec ]; then
    # Both of the session's memfds, guest RAM and the saved state, were retrieved by the agent
    # as it started, not in the VMM's restore: after every kexec of a chain (the second one's
    # RAM is a memfd LUO gave back, no longer named memfd:).
    ahead=$(grep -o '[0-9]* file(s) of the last kernel.s sessions retrieved ahead in [0-9.]* ms' "$work/luod.log")
    case "$ahead" in
    "2 file(s)"*) ;;
    *) fail "the new kernel's agent did not retrieve the guest's RAM and state ahead of the VMM: '$ahead'" ;;
    esac
    echo "E2E-KEXEC agent: $ahead"
fi
if [ "$stage" -le "$kexecs" ] && [ "$case_name" = kexec ]; then
    # The next kexec (e.g. back to the first kernel): the same update, from this stage.
    echo "E2E-KEXEC probe before: $last"
    kexec_with_the_guest
fi
echo "E2E-KEXEC-PASS"
reboot -f
