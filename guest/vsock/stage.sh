#!/bin/sh
# Test-bed stage of scripts/test-nested-vsock: virtio-vsock streams between the test-bed host
# and the small Linux guest, across a restart-mode live update and then a kexec-mode one (a
# real kexec of the test kernel). The same script runs in both kernels; the second kernel's
# command line has `vsock_stage=2`. vsock-tool (guest/vsock/vsock-tool.c) is in both images
# and in the guest's initramfs: `listen`/`send` over AF_VSOCK in the guest, `listen-unix`/
# `send-unix` over the VMM's hybrid UNIX sockets here. Every stream is deterministic and
# checksummed; a sender checks every echoed byte, a listener every byte it receives.
#
# Stage 1 (first kernel): ch-luod in kernel mode (for the kexec) and ch-luod --emulate (for the
#   restart); the VMMs reach "the agent" through a symlink (see guest/net/stage.sh). A host
#   echo listener at SOCKET_5000; VMM A boots the guest with `--vsock cid=3,socket=SOCKET`; the
#   guest runs `vsock-tool listen 1234`.
#   R  restart mode: two streams run while A is live-updated into the successor B: the guest
#      sends 3 MiB to host port 5000 (the host listener echoes) and a host client sends 4 MiB
#      to the guest's port 1234 through `CONNECT 1234` (the guest echoes); each writes a burst,
#      then 16 KiB every 50 ms, and holds its last 256 KiB back until the update is over (then
#      the rest at full speed). Each
#      stream must stay one connection and come back whole, once, in order (both ends'
#      counts, checksums and byte checks), echo must have flowed during the live-update call,
#      and B's vsock counters must show no reset.
#   K  before the kexec: one more connection each way carries 768 KiB and is held open (a
#      guest send to 5000 and a host client to 1234). Then `ch-luod kexec` and B's update.
# Stage 2 (second kernel): the host echo listener again; `cloud-hypervisor --restore` (VMM C)
#   binds SOCKET again; right after vm/restored a NEW host client's CONNECT 1234 must reach the
#   guest's listener of before the kexec at once and carry 4 MiB intact; both held connections
#   must end in the guest with a reset (the listener's child and the guest's sender report
#   result=reset, neither hangs), having carried their 768 KiB intact; a NEW guest connection
#   to host port 5000 must carry 2 MiB intact; C's counters count the resets.
# What a kexec cannot keep: no host process or host socket survives it, so a connection with
# a host end cannot go on: a guest agent sees its connections reset and must reconnect (its
# listeners stay and take new connections at once).
# Markers: VSOCK-E2E-STAGE1/2, VSOCK-E2E <what> (figures), VSOCK-E2E-PASS or VSOCK-E2E-FAIL: why.
# Needs in the initramfs (scripts/test-nested-vsock adds them): /bin/cloud-hypervisor,
# /bin/ch-remote, /bin/ch-luod, /bin/vsock-tool, /lib/vfio-stage.sh (guest/vfio/lib.sh),
# /guest/bzImage, /guest/initramfs.cpio.gz (with /bin/vsock-tool); the first image also
# /kexec/bzImage and /kexec/initrd.cpio.gz.
# shellcheck disable=SC2016 # the lines typed to the guest are expanded by the guest's shell

# shellcheck source=guest/vfio/lib.sh
. /lib/vfio-stage.sh
keep_alive VSOCK-E2E

work=/tmp/vs
sock=$work/v.sock
session_restart=vsock-restart
session_kexec=vsock-kexec
stage=$(arg vsock_stage 1)
vmm_errors='cloud-hypervisor: +[0-9.]+s: <ERROR>|^Error|panicked'
KiB=1024
MiB=1048576

fail() {
    {
        dump_logs 30 "$work/a.log" "$work/b.log" "$work/c.log" "$work/luod.log" "$work/restart-luod.log" \
            "$work/kexec.log" "$work/remote.log" "$work/h5000.out" "$work/hr.out" "$work/hk.out" "$work/hn.out"
        dump_console "${console:-/nonexistent}" 40
        # What the current VMM's devices moved (did the serial port take the typed input?).
        [ -z "$console" ] ||
            echo "----- counters: $(timeout 5 ch-remote --api-socket "${console%.console}.sock" counters 2>&1 | tr -d ' \n')"
        sleep 2
        echo "VSOCK-E2E-FAIL: stage $stage: $*"
    } >&2
    reboot -f
    exit 1
}
say() { echo "VSOCK-E2E $*"; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
# Field $2 of a tool's result line $1 ("... key=value ...").
field() { printf '%s\n' "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# The VMM whose serial console is current: its console log, its stdin FIFO and its pid.
console="" console_in="" vmm=""
lines() { wc -l <"$console"; }

# Print the first match of the extended regex $1 in the console log after line $2 (CRs
# removed), waiting up to $3 seconds; fail when it does not come or the VMM exits first.
wait_match() {
    wm_start=$(now)
    while :; do
        # A snapshot, without its last line while the guest is still printing it (a result
        # line read half-written would be taken for the whole line).
        cat "$console" >"$work/console.snap"
        if [ -n "$(tail -c 1 "$work/console.snap")" ]; then
            sed -i '$d' "$work/console.snap"
        fi
        wm_hit=$(tail -n "+$(($2 + 1))" "$work/console.snap" | tr -d '\r' | grep -oE -- "$1" | head -n1)
        if [ -n "$wm_hit" ]; then
            printf '%s\n' "$wm_hit"
            return 0
        fi
        grep -qF "Kernel panic" "$console" && fail "guest kernel panic"
        kill -0 "$vmm" 2>/dev/null || fail "the VMM exited before /$1/ appeared on the guest console"
        elapsed_over "$wm_start" "$3" && fail "no /$1/ on the guest console within $3 s"
        sleep 0.1
    done
}

# Types a command that prints "<tag>2=<value>:END" and prints the value (the tag is spelled
# with an arithmetic expansion so the echo of the typed line cannot match).
ask() {
    ask_from=$(lines)
    type_line "echo $2\$((1+1))=$1:END"
    wait_match "${2}2=[^:]*:END" "$ask_from" "$3" | sed "s/^${2}2=//; s/:END\$//"
}

# A guest tool's result line: the first line on the console matching the regex $1 (from
# "VSOCK-" on, to the end of the line), within $2 seconds.
guest_line() { wait_match "$1[^ ]*( [a-z_]+=[^ ]*)*" 0 "$2"; }

# A host tool's first line matching the regex $2 in file $1, within $3 seconds, while $4 (a
# pid, optional) runs.
host_line() {
    hl_start=$(now)
    while :; do
        hl_hit=$(grep -E -- "$2" "$1" 2>/dev/null | head -n1)
        if [ -n "$hl_hit" ]; then
            printf '%s\n' "$hl_hit"
            return 0
        fi
        if [ -n "${4:-}" ] && ! kill -0 "$4" 2>/dev/null; then
            sleep 0.2
            hl_hit=$(grep -E -- "$2" "$1" 2>/dev/null | head -n1)
            [ -n "$hl_hit" ] && { printf '%s\n' "$hl_hit"; return 0; }
            fail "$1: the tool exited without a line /$2/: $(cat "$1")"
        fi
        elapsed_over "$hl_start" "$3" && fail "no /$2/ in $1 within $3 s: $(cat "$1")"
        sleep 0.1
    done
}

# Waits up to $2 seconds for process $1 to exit and returns its status; fails naming $3.
wait_gone() {
    wg_start=$(now)
    while kill -0 "$1" 2>/dev/null; do
        elapsed_over "$wg_start" "$2" && fail "$3 did not end within $2 s"
        sleep 0.1
    done
    wait "$1"
}

# Word $2 (1-based) of progress file $1 ("<sent> <echoed>" or "<bytes>"), 0 when absent.
progress() {
    pr=$(cut -d' ' -f"$2" "$1" 2>/dev/null)
    echo "${pr:-0}"
}

# Waits up to $4 s until word $2 of progress file $1 is at least $3.
wait_progress() {
    wp_start=$(now)
    until [ "$(progress "$1" "$2")" -ge "$3" ]; do
        elapsed_over "$wp_start" "$4" && fail "$1 reached $(progress "$1" "$2") of $3 bytes in $4 s"
        sleep 0.1
    done
}

# Checks a sender's line $1 (name $2) against the listener's line $3: the sender ended ok with
# every byte echoed, the listener saw the end of the stream with the same bytes and checksum.
check_pair() {
    [ "$(field "$1" result)" = ok ] || fail "$2: the sender says $1"
    [ "$(field "$3" result)" = eof ] || fail "$2: the listener says $3"
    [ "$(field "$3" verified)" = yes ] || fail "$2: the listener got other bytes than the stream's: $3"
    if [ "$(field "$1" bytes)" != "$(field "$3" bytes)" ] || [ "$(field "$1" echoed)" != "$(field "$1" bytes)" ] ||
        [ "$(field "$1" sum)" != "$(field "$3" sum)" ]; then
        fail "$2: sender and listener disagree: $1 / $3"
    fi
}

# The value of property $2 of the first event named $3 in event-monitor file $1.
event_property() {
    awk -v ev="\"event\": \"$3\"" -v key="\"$2\":" '
        index($0, ev) { inside = 1 }
        inside && index($0, key) { sub(/.*: *"?/, ""); sub(/"?,? *$/, ""); print; exit }
        inside && /^}/ { inside = 0 }' "$1"
}
has_event() { grep -q "\"event\": \"$2\"" "$1"; }

check_vmm_log() {
    cv_errors=$(tr -d '\r' <"$1" | grep -E "$vmm_errors" | head -n 5)
    [ -z "$cv_errors" ] || fail "$1 has errors: $cv_errors"
}

# Counter $2 of the vsock device of the VMM with API socket $1.
counter() {
    ch-remote --api-socket "$1" counters 2>/dev/null | tr -d ' \n' |
        grep -oE "\"_vsock0\":\\{[^}]*\\}" | grep -oE "\"$2\":[0-9]+" | cut -d: -f2
}

# Starts the host's echo listener for guest connections to port 5000.
host_listener() {
    vsock-tool listen-unix "${sock}_5000" --progress "$work/h5000.progress" >"$work/h5000.out" 2>&1 &
    host_line "$work/h5000.out" VSOCK-LISTENING 10 $! >/dev/null
}

# ---------------------------------------------------------------------------------------------
echo "VSOCK-E2E-STAGE$stage"
for f in /lib/vfio-stage.sh /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /bin/vsock-tool \
    /guest/bzImage /guest/initramfs.cpio.gz; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
[ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (kernel without LUO or no liveupdate=on)"
mkdir -p "$work" || fail "cannot create $work"
start_kernel_agent "$work/luod.sock" "$work/luod.log"
host_listener

if [ "$stage" = 1 ]; then
    for f in /kexec/bzImage /kexec/initrd.cpio.gz; do
        [ -e "$f" ] || fail "$f is missing from the outer initramfs"
    done
    ch-luod --emulate -v --socket "$work/restart.sock" >"$work/restart-luod.log" 2>&1 &
    t=$(now)
    until [ "$(ch-luod --socket "$work/restart.sock" ping 2>/dev/null)" = restart ]; do
        elapsed_over "$t" 10 && fail "ch-luod --emulate did not answer within 10 s"
        sleep 0.1
    done
    ln -s restart.sock "$work/agent.sock"
    mkfifo "$work/a.in" "$work/b.in" || fail "mkfifo failed"

    t0=$(now)
    cloud-hypervisor -v --api-socket "path=$work/a.sock" --liveupdate "agent=$work/agent.sock" \
        --kernel /guest/bzImage --initramfs /guest/initramfs.cpio.gz \
        --cmdline "console=ttyS0 panic=-1" --memory size=256M --cpus boot=1 \
        --vsock "cid=3,socket=$sock" --serial tty --console off --event-monitor "path=$work/a.events" \
        <"$work/a.in" >"$work/a.console" 2>"$work/a.log" &
    vmm=$! console=$work/a.console console_in=$work/a.in
    exec 3>"$work/a.in"
    wait_match LINUX-GUEST-READY 0 120 >/dev/null
    say "guest ready after $(secs "$t0") s"
    type_line 'dmesg -n 1'
    dev=$(ask '$(ls /sys/bus/virtio/drivers/vmw_vsock_virtio_transport | grep -c virtio)' VSDEV 60)
    [ "$dev" = 1 ] || fail "no virtio-vsock device bound in the guest ($dev): CONFIG_VIRTIO_VSOCKETS?"
    type_line 'vsock-tool listen 1234 &'
    l=$(guest_line 'VSOCK-LISTENING tag=1234|vsock-tool 1234:' 60)
    case "$l" in VSOCK-LISTENING*) ;; *) fail "the guest's listener failed: $l" ;; esac

    # R: a stream each way across a restart-mode live update.
    r_t=$(now)
    vsock-tool send-unix "$sock" 1234 $((4 * MiB)) --tag hr --burst "$MiB" --pace 50 \
        --hold "$work/hr.go" --progress "$work/hr.progress" >"$work/hr.out" 2>&1 &
    hr_pid=$!
    say "R: host client: $(host_line "$work/hr.out" 'VSOCK-CONNECTED' 60 "$hr_pid")"
    wait_progress "$work/hr.progress" 1 "$MiB" 120
    say "R: host client wrote its 1 MiB burst after $(secs "$r_t") s, then 16 KiB every 50 ms"
    from=$(lines)
    type_line "vsock-tool send 2 5000 $((3 * MiB)) --tag gr --burst $((512 * KiB)) --pace 50 --hold /tmp/gr.go &"
    say "R: guest client: $(wait_match 'VSOCK-CONNECTED tag=gr connect_ms=[0-9]+' "$from" 60)"
    wait_progress "$work/h5000.progress" 1 $((512 * KiB)) 120
    say "R: the guest wrote its 512 KiB burst, then 16 KiB every 50 ms"
    cloud-hypervisor -v --api-socket "path=$work/b.sock" --liveupdate "agent=$work/agent.sock" \
        --restore "source_url=luo://$session_restart" --event-monitor "path=$work/b.events" \
        <"$work/b.in" >"$work/b.console" 2>"$work/b.log" &
    b_pid=$!
    exec 4>"$work/b.in"
    sleep 0.5
    kill -0 "$b_pid" 2>/dev/null || fail "the successor exited while waiting for the handover"
    a_resets=$(counter "$work/a.sock" closed_connections)
    h_before=$(progress "$work/hr.progress" 2)
    g_before=$(progress "$work/h5000.progress" 1)
    read -r lu_start _ </proc/uptime
    response=$(timeout 60 ch-remote --api-socket "$work/a.sock" live-update --session "$session_restart" 2>&1) ||
        fail "restart-mode live-update failed: $response"
    read -r lu_end _ </proc/uptime
    h_after=$(progress "$work/hr.progress" 2)
    g_after=$(progress "$work/h5000.progress" 1)
    say "R: live-update call $(awk -v a="$lu_start" -v b="$lu_end" 'BEGIN { printf "%.2f", b - a }') s, answer: $(echo "$response" | tr -d ' \n')"
    wait_gone "$vmm" 30 "the old VMM" || fail "the old VMM exited with status $?"
    check_vmm_log "$work/a.log"
    vmm=$b_pid console=$work/b.console console_in=$work/b.in
    # The device counts every connection it drops, a clean end (RST after both shutdowns)
    # too: with both streams still open, the successor must count what A counted.
    resets=$(counter "$work/b.sock" closed_connections)
    open=$(counter "$work/b.sock" open_connections)
    say "R: vsock counters: resets $a_resets before the update, $resets in the successor after it; $open connections open in the successor"
    [ "$resets" = "$a_resets" ] || fail "R: the successor counts $resets resets, the old VMM counted $a_resets: a connection was dropped"
    [ "$open" = 2 ] || fail "R: the successor has $open vsock connections open, expected the 2 streams"
    say "R: during the live-update call the host client got $((h_after - h_before)) bytes of echo ($h_before -> $h_after), the host listener $((g_after - g_before)) bytes from the guest ($g_before -> $g_after)"
    [ "$h_after" -gt "$h_before" ] || fail "R: no echo reached the host client during the update: the stream did not run through it"
    [ "$g_after" -gt "$g_before" ] || fail "R: nothing of the guest's stream reached the host during the update"
    [ "$h_before" -lt $((4 * MiB - 256 * KiB)) ] || fail "R: the host stream reached its hold point before the update"
    [ "$g_before" -gt 0 ] || fail "R: the guest stream had not started before the update"
    [ "$g_before" -lt $((3 * MiB - 256 * KiB)) ] || fail "R: the guest stream reached its hold point before the update"
    : >"$work/hr.go"
    type_line ': >/tmp/gr.go'
    wait_gone "$hr_pid" 120 "R: the host client"
    hr=$(host_line "$work/hr.out" 'VSOCK-SEND' 1)
    gl=$(guest_line 'VSOCK-CONN tag=1234 n=1 ' 120)
    say "R: host->guest: $hr"
    say "R: guest listener: $gl"
    check_pair "$hr" "R: host->guest" "$gl"
    gr=$(guest_line 'VSOCK-SEND tag=gr ' 120)
    hl=$(host_line "$work/h5000.out" 'VSOCK-CONN [^ ]* n=1 ' 30)
    say "R: guest->host: $gr"
    say "R: host listener: $hl"
    check_pair "$gr" "R: guest->host" "$hl"
    has_event "$work/b.events" restored || fail "R: no vm/restored event from the successor"
    say "R: pause_us=$(event_property "$work/b.events" pause_us restored) (restored event of the successor); the streams' longest echo gap: host $(field "$hr" max_gap_ms) ms, guest $(field "$gr" max_gap_ms) ms"
    sessions=$(ch-luod --socket "$work/restart.sock" list)
    [ -z "$sessions" ] || fail "R: the restart-mode agent still holds sessions: $sessions"

    # K, before the kexec: a connection each way, held open after 768 KiB.
    # The host listener's children share its progress file; the one of the R stream is done.
    : >"$work/h5000.progress"
    type_line "vsock-tool send 2 5000 $MiB --tag gk --hold /tmp/never &"
    wait_progress "$work/h5000.progress" 1 $((768 * KiB)) 60
    vsock-tool send-unix "$sock" 1234 "$MiB" --tag hk --hold "$work/never" \
        --progress "$work/hk.progress" >"$work/hk.out" 2>&1 &
    wait_progress "$work/hk.progress" 2 $((768 * KiB)) 60
    open=$(counter "$work/b.sock" open_connections)
    resets=$(counter "$work/b.sock" closed_connections)
    say "K: before the kexec, 2 held connections carried 768 KiB each; vsock connections open: $open, resets (ends) counted: $resets"
    [ "$open" = 2 ] || fail "K: the VMM has $open vsock connections open, expected the 2 held ones"
    check_vmm_log "$work/b.log"
    ln -sfn luod.sock "$work/agent.sock"
    [ "$(ch-luod --socket "$work/agent.sock" ping)" = kernel ] || fail "the agent symlink does not lead to the kernel-mode agent"
    next="$(sed 's/ *vsock_stage=[^ ]*//' /proc/cmdline) vsock_stage=2 vsock_resets=$resets"
    load_next_kernel "$work/luod.sock" "$work/luod.log" "$session_kexec" "$next"
    say "K: live update across the kexec at $(now)"
    live_update_across_kexec "$work/b.sock" "$session_kexec"
fi

# Stage 2: the VM comes back on the new kernel; no host process of before is left.
[ -e "$sock" ] && fail "$sock exists before the restore"
mkfifo "$work/c.in" || fail "mkfifo failed"
say "restore at $(now)"
t0=$(now)
cloud-hypervisor -v --api-socket "path=$work/c.sock" --liveupdate "agent=$work/luod.sock" \
    --restore "source_url=luo://$session_kexec" --event-monitor "path=$work/c.events" \
    <"$work/c.in" >"$work/c.console" 2>"$work/c.log" &
vmm=$! console=$work/c.console console_in=$work/c.in
exec 3>"$work/c.in"
until has_event "$work/c.events" restored; do
    kill -0 "$vmm" 2>/dev/null || fail "the restoring VMM exited"
    elapsed_over "$t0" 120 && fail "no vm/restored event within 120 s"
    sleep 0.05
done
restored=$(now)
[ -S "$sock" ] || fail "K: $sock is not bound again after vm/restored"
resets=$(counter "$work/c.sock" closed_connections)
say "K: restored VMM's vsock counters: resets $(arg vsock_resets "") before the kexec, $resets after the restore; $(counter "$work/c.sock" open_connections) connections open"
[ "$resets" = $(($(arg vsock_resets 0) + 2)) ] || fail "K: the restored VMM counts $resets resets, expected the 2 held connections more than before the kexec"

# A NEW host connection at once: no retry, the first CONNECT must reach the guest's listener.
hn_t=$(now)
vsock-tool send-unix "$sock" 1234 $((4 * MiB)) --tag hn --timeout 60 >"$work/hn.out" 2>&1
hn_rc=$?
hn=$(host_line "$work/hn.out" 'VSOCK-SEND' 1)
say "K: restored after $(secs "$t0") s; pause_us=$(event_property "$work/c.events" pause_us restored) (spans the kexec)"
say "K: new host->guest connection started $(awk -v a="$restored" -v b="$hn_t" 'BEGIN { printf "%.2f", b - a }') s after vm/restored (after reading the counters), first try: $(host_line "$work/hn.out" 'VSOCK-CONNECTED' 1)"
say "K: new host->guest connection: $hn"
[ "$hn_rc" = 0 ] || fail "K: the new host connection failed: $(cat "$work/hn.out")"
gl=$(guest_line "VSOCK-CONN tag=1234 n=[0-9]+ result=[a-z]+ bytes=$((4 * MiB)) " 60)
say "K: guest listener: $gl"
check_pair "$hn" "K: new host->guest" "$gl"
say "K: new host->guest throughput $(field "$hn" mbps) MB/s each way (4 MiB echoed in $(field "$hn" secs) s)"

# The held connections of before the kexec: reset in the guest, after their 768 KiB.
hk=$(guest_line 'VSOCK-CONN tag=1234 n=2 ' 30)
say "K: the guest's end of the held host connection: $hk (on the console when looked for, $(secs "$restored") s after vm/restored)"
[ "$(field "$hk" result)" = reset ] || fail "K: the held host connection did not end with a reset in the guest: $hk"
if [ "$(field "$hk" bytes)" != $((768 * KiB)) ] || [ "$(field "$hk" verified)" != yes ]; then
    fail "K: the held host connection carried other bytes: $hk"
fi
gk=$(guest_line 'VSOCK-SEND tag=gk ' 30)
say "K: the guest's held connection to the host: $gk (on the console when looked for, $(secs "$restored") s after vm/restored)"
[ "$(field "$gk" result)" = reset ] || fail "K: the guest's held connection did not end with a reset: $gk"
[ "$(field "$gk" echoed)" = $((768 * KiB)) ] || fail "K: the guest's held connection carried other bytes: $gk"

# A NEW guest connection to the host: the guest agent's reconnect.
from=$(lines)
gn_t=$(now)
type_line "vsock-tool send 2 5000 $((2 * MiB)) --tag gn &"
gn=$(guest_line 'VSOCK-SEND tag=gn ' 120)
say "K: new guest->host connection: $gn ($(secs "$gn_t") s from typing it)"
hl=$(host_line "$work/h5000.out" 'VSOCK-CONN [^ ]* n=1 ' 30)
say "K: host listener: $hl"
check_pair "$gn" "K: new guest->host" "$hl"
say "K: new guest->host throughput $(field "$gn" mbps) MB/s each way"

check_vmm_log "$work/c.log"
grep -F '<WARN>' "$work/c.log" | sed 's/^/VSOCK-E2E restored VMM warned: /'
sessions=$(ch-luod --socket "$work/luod.sock" list)
[ -z "$sessions" ] || fail "the agent still holds sessions after the restore: $sessions"
echo "VSOCK-E2E-PASS"
reboot -f
