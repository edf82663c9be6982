#!/bin/sh
# Test-bed stage of scripts/bench-kexec-many-vms: N small probe VMs (heartbeat guests) under
# our VMM on one kernel-mode ch-luod, all live-updated at once into one real kexec, and all
# restored after it by N VMMs started together.
#   Stage 1: boots the N VMs one by one (each `many_mib` MiB, 1 vCPU), waits until every one prints status
#     lines, has the agent load the next kernel for the N sessions, prints MANY-REQ with the
#     realtime clock and sends every VM its `live-update` at once. The agent kexecs once all N
#     are frozen.
#   Stage 2: starts the agent, prints MANY-RESTORE-START, starts the N restoring VMMs together
#     (each with an event monitor), waits for each one's `restored` event and two status lines
#     of its guest after it, checks errors=0, and prints per VM
#     `MANY-VM <i> <restored event's properties> | <VMM clock of its "VM restored" log line> |
#     <hb_gap_us of the guest's first status line after the restore>`.
# Markers: MANY-STAGE1/2, MANY-REQ, MANY-RESTORE-START, MANY-VM, MANY-AHEAD (the agent's
# retrieval of the guests' memfds ahead of the VMMs, in ms, or -), MANY-PASS or MANY-FAIL: why.
# Needs in the initramfs: /bin/cloud-hypervisor, /bin/ch-remote, /bin/ch-luod,
# /lib/vfio-stage.sh (guest/vfio/lib.sh), /guest/probe-guest.elf; the first image also
# /kexec/bzImage and /kexec/initrd.cpio.gz (an image of this stage).

# shellcheck source=guest/vfio/lib.sh
. /lib/vfio-stage.sh

work=/tmp/many
agent=$work/luod.sock
mkdir -p "$work"
vms=$(arg many_vms 8)
mib=$(arg many_mib 64)
stage=$(arg e2e_stage 1)

fail() {
    {
        dump_logs 20 "$work/luod.log" "$work/kexec.log"
        for i in $(seq 1 "$vms"); do dump_logs 5 "$work/vm$i.err"; done
        echo "MANY-FAIL: stage $stage: $*"
    } >&2
    reboot -f
    exit 1
}

# The realtime clock in microseconds (busybox date has no %N).
unix_us() { adjtimex | awk '/time.tv_sec/ { s = $2 } /time.tv_usec/ { u = $2 } END { printf "%d%06d\n", s, u }'; }

# The status lines a probe printed on serial log $1.
statuses() { tr -d '\r' <"$1" 2>/dev/null | grep -c 'probe: status seq=.* uptime_ms='; }

# Waits until VM $1's serial log holds at least $2 status lines, failing once $4 seconds have
# passed since $3 (a `now`) or when its VMM exits.
wait_vm_statuses() {
    until [ "$(statuses "$work/vm$1.log")" -ge "$2" ]; do
        kill -0 "$(cat "$work/vm$1.pid")" 2>/dev/null || fail "the VMM of VM $1 exited"
        elapsed_over "$3" "$4" && fail "VM $1 printed fewer than $2 status lines within $4 s"
        sleep 0.1
    done
}

# Waits up to $2 seconds until every VM's serial log (this stage's) holds at least $1 status
# lines.
wait_statuses() {
    ws_start=$(now)
    for i in $(seq 1 "$vms"); do wait_vm_statuses "$i" "$1" "$ws_start" "$2"; done
}

# Starts the VMM of VM $1 with the further arguments; its serial output goes to vm$1.log, its
# log to vm$1.err, its events to vm$1.events. Its stdin is a FIFO held open by a sleeper.
start_vmm() {
    sv_i=$1
    shift
    mkfifo "$work/vm$sv_i.in"
    sleep 100000 >"$work/vm$sv_i.in" &
    cloud-hypervisor -v --api-socket "path=$work/vm$sv_i.sock" --liveupdate "agent=$agent" \
        --event-monitor "path=$work/vm$sv_i.events" "$@" \
        <"$work/vm$sv_i.in" >"$work/vm$sv_i.log" 2>"$work/vm$sv_i.err" &
    echo $! >"$work/vm$sv_i.pid"
}

echo "MANY-STAGE$stage vms=$vms mib=$mib kernel $(uname -r)"
start_kernel_agent "$agent" "$work/luod.log"

if [ "$stage" = 1 ]; then
    # One after the other: QEMU's TCG has crashed with 8 nested VMs booting at once.
    for i in $(seq 1 "$vms"); do
        start_vmm "$i" --kernel /guest/probe-guest.elf --memory "size=${mib}M" --cpus boot=1 \
            --serial tty --console off --cmdline "heartbeat=1 heartbeat_us=2000 status_ms=200"
        wait_vm_statuses "$i" 1 "$(now)" 120
    done
    wait_statuses 2 $((120 + 10 * vms))
    next="$(sed 's/ *e2e_stage=[^ ]*//' /proc/cmdline) e2e_stage=2"
    load_next_kernel "$agent" "$work/luod.log" "$(seq 1 "$vms" | sed 's/^/vm/')" "$next" $((120 + 5 * vms))
    echo "MANY-REQ unix_us=$(unix_us)"
    for i in $(seq 1 "$vms"); do
        ch-remote --api-socket "$work/vm$i.sock" live-update --session "vm$i" >"$work/remote$i.log" 2>&1 &
    done
    wait "$kexec_pid"
    rc=$?
    sleep 2
    fail "ch-luod kexec exited $rc: $(cat "$work/kexec.log")"
fi

echo "MANY-RESTORE-START"
for i in $(seq 1 "$vms"); do
    start_vmm "$i" --restore "source_url=luo://vm$i"
done
t=$(now)
for i in $(seq 1 "$vms"); do
    until grep -q '"event": "restored"' "$work/vm$i.events" 2>/dev/null; do
        kill -0 "$(cat "$work/vm$i.pid")" 2>/dev/null || fail "the restoring VMM of VM $i exited"
        elapsed_over "$t" $((120 + 5 * vms)) && fail "VM $i was not restored within $((120 + 5 * vms)) s"
        sleep 0.05
    done
    echo "MANY-RESTORED $i"
done
wait_statuses 2 $((120 + 10 * vms))
for i in $(seq 1 "$vms"); do
    last=$(tr -d '\r' <"$work/vm$i.log" | grep 'probe: status seq=.* uptime_ms=' | tail -n1)
    errors=$(echo "$last" | grep -o ' errors=[0-9]*' | cut -d= -f2)
    [ "$errors" = 0 ] || fail "VM $i: the probe reports errors=$errors after the kexec: $last"
    # The line the guest was printing at the pause ends here (its start was lost with the old
    # kernel), or the first line here spans the pause: the larger hb_gap_us is the guest's.
    gap=$(tr -d '\r' <"$work/vm$i.log" | grep 'hb_gap_us=' | head -n2 | grep -o 'hb_gap_us=[0-9]*' |
        cut -d= -f2 | sort -n | tail -n1)
    restored=$(tr -d '\n' <"$work/vm$i.events" | grep -o '"event": "restored", *"properties": {[^}]*}' |
        sed 's/^.*"properties": //')
    clock=$(grep -o '^cloud-hypervisor: *[0-9.]*s: <INFO> vmm::live_update: VM restored' "$work/vm$i.err" |
        grep -o '[0-9.]*s:' | tr -d 's:')
    echo "MANY-VM $i $restored | $clock | ${gap:-?}"
done
# What the agent retrieved ahead of the VMMs (the last kernel's manifest), and how long it took.
ahead=$(grep -o 'retrieved ahead in [0-9.]* ms' "$work/luod.log" | grep -o '[0-9.]* ms' | cut -d' ' -f1)
echo "MANY-AHEAD ms=${ahead:--}"
sessions=$(ch-luod --socket "$agent" list)
[ -z "$sessions" ] || fail "the agent still holds sessions after every restore: $sessions"
echo "MANY-PASS"
reboot -f
