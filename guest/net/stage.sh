#!/bin/sh
# Test-bed stage of scripts/test-nested-net: TCP into the small Linux guest through a virtio-net
# card on a tap (2 queue pairs), across a restart-mode live update and then a kexec-mode one
# (a real kexec of the test kernel). The same script runs in both kernels; the second kernel's
# command line has `net_stage=2`. Everything (taps, VMMs, host-side nc) runs in a network
# namespace the stage creates with `unshare -n`, inside the QEMU VM. The VM's one NIC (eth0,
# 10.98.0.2/24) is moved into that namespace too: it leads only to a tap in a namespace that
# scripts/test-nested-net made on the machine running QEMU, where the outside peer lives
# (10.98.0.1, scripts/lib/net-peer.pl); this kernel forwards between eth0 and our tap.
#
# Stage 1 (first kernel): ch-luod in kernel mode (for the kexec) and ch-luod --emulate (for the
#   restart); the VMMs reach "the agent" through a symlink that points at the restart-mode
#   agent first and at the kernel-mode one for the kexec (a VMM's agent path is fixed for its
#   life, and each update connects anew). VMM A boots the guest with 2 vCPUs and
#   `--net tap=chvnet0,ip=10.99.0.1,mask=255.255.255.0,mac=...,num_queues=4`; the guest sets
#   10.99.0.2/24 on eth0 and must show rx-0, rx-1, tx-0, tx-1.
#   R  restart mode: the host streams 4 MiB into a guest listener (half at once, then 16 KiB
#      every 50 ms, the last 256 KiB held back until the update is over), and A is
#      live-updated into the successor B while the stream runs: the same TCP connection must
#      deliver every byte (count and md5 printed by the guest), B must not re-create the tap
#      (same ifindex, no vm/net-recreated), and host chunks must have been written during the
#      update call.
#   MQ 8 parallel host->guest connections and 2 guest->host ones pinned to vCPU 0 and 1: every
#      checksum must match, and the guest's /proc/interrupts counts of virtio0-input.0/.1 and
#      virtio0-output.0/.1 must all rise (traffic on both queue pairs).
#   X  the outside peer connects to a guest listener on 5004 (the guest routes 10.98.0.0/24
#      through the tap) and streams 8 KiB every 50 ms until stage 2 says "X: peer stop".
#   K  before the kexec: a guest listener on 5002 is started (used after the kexec), and a
#      connection from a host nc to a guest listener on 5003 is established and carries 64 KiB
#      (the guest writes a tick every second back). Then `ch-luod kexec` and B's live update.
# Stage 2 (second kernel): a fresh namespace and ch-luod; `cloud-hypervisor --restore` (VMM C)
#   must emit vm/restored and vm/net-recreated with tap=chvnet0, and the tap must be back with
#   10.99.0.1/24, up, 2 queues and the MAC it had; ping must answer at once; a NEW host
#   connection to the guest's listener of before the kexec must deliver 4 MiB intact; a NEW
#   guest->host connection must deliver the guest's payload intact; the connection of before
#   the kexec must be gone on the guest side (its host end died with the old kernel: the
#   guest's next tick gets a reset), having received its 64 KiB; and MQ once more on the
#   re-created tap. X: once the kernel forwards again, the outside peer's connection of before
#   the kexec carries on (its retransmissions get through): the guest's byte count grows, then
#   the peer closes and the guest prints what it received; scripts/test-nested-net compares
#   that with what the peer sent.
# What a kexec cannot keep: no process or socket of the test-bed kernel survives it, so a TCP
# connection with an end there cannot go on; what must survive is the guest's side (its
# listening socket, its TCP stack, its address and the card), and the host's tap, re-created
# by the VMM. A connection whose other end is outside the test bed goes on (X).
# Markers: NET-E2E-STAGE1/2, NET-E2E <what> (figures), NET-E2E-PASS or NET-E2E-FAIL: why.
# Needs in the initramfs (scripts/test-nested-net adds them): /bin/cloud-hypervisor,
# /bin/ch-remote, /bin/ch-luod, /lib/vfio-stage.sh (guest/vfio/lib.sh: now, since, arg,
# dump_logs, start_kernel_agent, load_next_kernel, live_update_across_kexec),
# /guest/bzImage, /guest/initramfs.cpio.gz; the first image also /kexec/bzImage and
# /kexec/initrd.cpio.gz.
# shellcheck disable=SC2016 # the lines typed to the guest are expanded by the guest's shell

# shellcheck source=guest/vfio/lib.sh
. /lib/vfio-stage.sh
keep_alive NET-E2E

work=/tmp/net
tap=chvnet0
host_ip=10.99.0.1
guest_ip=10.99.0.2
guest_mac=12:34:56:78:9a:bc
net_arg="tap=$tap,ip=$host_ip,mask=255.255.255.0,mac=$guest_mac,num_queues=4,id=net0"
# net_host_mac= on the command line (scripts/test-nested-net --host-mac) fixes the tap's MAC.
host_mac=$(arg net_host_mac "")
[ -z "$host_mac" ] || net_arg="$net_arg,host_mac=$host_mac"
# The outside peer's side: this kernel's NIC and the peer's network.
uplink_ip=10.98.0.2
peer_net=10.98.0.0/24
session_restart=net-restart
session_kexec=net-kexec
payload=$work/payload
payload_size=4194304
stage=$(arg net_stage 1)
vmm_errors='cloud-hypervisor: +[0-9.]+s: <ERROR>|^Error|panicked'

fail() {
    {
        dump_logs 30 "$work/a.log" "$work/b.log" "$work/c.log" "$work/luod.log" "$work/restart-luod.log" \
            "$work/kexec.log" "$work/remote.log"
        dump_console "${console:-/nonexistent}" 40
        # What the current VMM's devices moved (did the serial port take the typed input?).
        [ -z "$console" ] ||
            echo "----- counters: $(timeout 5 ch-remote --api-socket "${console%.console}.sock" counters 2>&1 | tr -d ' \n')"
        sleep 2
        echo "NET-E2E-FAIL: stage $stage: $*"
    } >&2
    reboot -f
    exit 1
}
say() { echo "NET-E2E $*"; }
secs() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
# Megabytes per second of $1 bytes in $2 seconds.
mbps() { awk -v n="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.2f", n / s / 1e6; else print "inf" }'; }
md5() { md5sum <"$1" | cut -c1-32; }
# The tap's queues as sysfs lists them ("rx-0 rx-1 tx-0 tx-1 ").
tap_queues() { for q in "/sys/class/net/$tap/queues/"*; do printf '%s ' "${q##*/}"; done; }

# The VMM whose serial console is current: its console log, its stdin FIFO and its pid.
console="" console_in="" vmm=""
lines() { wc -l <"$console"; }

# Print the first match of the extended regex $1 in the console log after line $2 (CRs
# removed), waiting up to $3 seconds; fail when it does not come (return 1 instead when $4 is
# "soft") or the VMM exits first.
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
        if elapsed_over "$wm_start" "$3"; then
            [ "${4:-}" = soft ] && return 1
            fail "no /$1/ on the guest console within $3 s"
        fi
        sleep 0.1
    done
}

# Types a command that prints "<tag>2=<value>:END" and prints the value. The tag is spelled
# with an arithmetic expansion ($2 is its stem) so the echo of the typed line cannot match.
ask() {
    ask_from=$(lines)
    type_line "echo $2\$((1+1))=$1:END"
    wait_match "${2}2=[^:]*:END" "$ask_from" "$3" | sed "s/^${2}2=//; s/:END\$//"
}

# Waits up to 30 s until the guest listens on $2 (default 1) TCP ports matching the extended
# regex $1 (e.g. 5001, or 510[1-8]).
guest_listens() {
    gl_start=$(now)
    until [ "$(ask "\$(netstat -ltn | grep -cE ':$1 ')" LSN 30)" = "${2:-1}" ]; do
        elapsed_over "$gl_start" 30 && fail "the guest does not listen on ${2:-1} ports /$1/"
        sleep 0.2
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

# The result line "<tag>=<bytes>,<md5>:END" the guest printed for port $2 (tag $1), within $3 s
# ($4: soft, see wait_match).
guest_result() {
    gr_hit=$(wait_match "$1$2=[0-9]+,[0-9a-f]{32}:END" 0 "$3" "${4:-}") || return 1
    echo "$gr_hit" | sed "s/^$1$2=//; s/:END\$//"
}

# Shell functions for the guest, typed once into its shell (which lives through every update):
#   rx PORT           listen, store what comes, print RX<port>=<bytes>,<md5>. Its stdin is a
#                     FIFO opened read-write: busybox nc half-closes at stdin EOF, and a sender
#                     that sees EOF from the network stops sending.
#   tx PORT CPUMASK   send /bin/busybox to the host's PORT from the given vCPUs, print
#                     TX<port>=<bytes>,<md5> (after TXRC<port>=<nc status>).
#   hold PORT         listen and write "tick" back every second until the connection dies,
#                     print HOLD<port>=<bytes received>,<md5>.
#   irqs              the per-queue interrupt counts of the virtio-net card, summed over vCPUs.
guest_functions() {
    while IFS= read -r gf_line; do
        type_line "$gf_line"
    done <<'EOF'
rx() { mkfifo /tmp/in$1; nc -l -p $1 <>/tmp/in$1 >/tmp/rx$1; echo RX$1=$(wc -c </tmp/rx$1),$(md5sum </tmp/rx$1 | cut -c1-32):END; rm -f /tmp/rx$1 /tmp/in$1; }
tx() { taskset $2 nc 10.99.0.1 $1 </bin/busybox >/dev/null; echo TXRC$1=$?:END; echo TX$1=$(wc -c </bin/busybox),$(md5sum </bin/busybox | cut -c1-32):END; }
hold() { while :; do echo tick; sleep 1; done | nc -l -p $1 >/tmp/hold$1; echo HOLD$1=$(wc -c </tmp/hold$1),$(md5sum </tmp/hold$1 | cut -c1-32):END; }
irqs() { awk '/virtio[0-9]+-(input|output)\./ { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; n = $NF; sub(/^virtio[0-9]+-/, "", n); printf "%s/%d,", n, s }' /proc/interrupts; }
EOF
}

# A host listener on port $1 storing what the guest sends into $2 (stdin a FIFO opened
# read-write, so it never half-closes first); its pid in $listener.
host_listen() {
    rm -f "$2.in"
    mkfifo "$2.in"
    nc -l -p "$1" <>"$2.in" >"$2" &
    listener=$!
    sleep 0.2
}

# Writes file $1 to stdout: half at once, then 16 KiB every 50 ms, keeping the last 256 KiB
# until the file $2 exists, then the rest. Each paced chunk's uptime goes to $2.chunks; $2.half
# appears once the first half is written.
paced_send() {
    ps_chunks=$(($(wc -c <"$1") / 16384))
    ps_half=$((ps_chunks / 2))
    ps_hold=$((ps_chunks - 16))
    dd if="$1" bs=16384 count="$ps_half" 2>/dev/null
    : >"$2.half"
    ps_i=$ps_half
    while [ "$ps_i" -lt "$ps_chunks" ]; do
        if [ "$ps_i" -ge "$ps_hold" ] && [ ! -e "$2" ]; then
            usleep 50000
            continue
        fi
        dd if="$1" bs=16384 skip="$ps_i" count=1 2>/dev/null
        read -r ps_up _ </proc/uptime
        echo "$ps_up" >>"$2.chunks"
        ps_i=$((ps_i + 1))
        [ -e "$2" ] || usleep 50000
    done
}

# The value of property $2 of the first event named $3 in event-monitor file $1.
event_property() {
    awk -v ev="\"event\": \"$3\"" -v key="\"$2\":" '
        index($0, ev) { inside = 1 }
        inside && index($0, key) { sub(/.*: *"?/, ""); sub(/"?,? *$/, ""); print; exit }
        inside && /^}/ { inside = 0 }' "$1"
}
has_event() { grep -q "\"event\": \"$2\"" "$1"; }

# The VMM's own errors.
check_vmm_log() {
    cv_errors=$(tr -d '\r' <"$1" | grep -E "$vmm_errors" | head -n 5)
    [ -z "$cv_errors" ] || fail "$1 has errors: $cv_errors"
}

# The guest's per-queue interrupt counts, as "input.0/N,output.0/N,...,".
guest_irqs() { ask '$(irqs)' "IRQ$1" 60; }
irq_count() { echo "$1" | tr ',' '\n' | sed -n "s|^$2/||p"; }

# Multiqueue: 8 host->guest and 2 guest->host connections at once; $1 names the run.
multiqueue() {
    mq_base=$2
    before=$(guest_irqs "B$mq_base")
    say "$1 guest interrupts before: $before"
    for q in input.0 input.1 output.0 output.1; do
        [ -n "$(irq_count "$before" $q)" ] ||
            fail "no virtio0-$q line in the guest's /proc/interrupts ($before): no per-queue MSI-X vectors?"
    done
    head -c 1048576 "$payload" >"$work/mq.payload"
    mq_md5=$(md5 "$work/mq.payload")
    type_line "for p in $(seq -s ' ' $((mq_base + 1)) $((mq_base + 8))); do rx \$p & done"
    guest_listens "$((mq_base / 10))[1-8]" 8
    host_listen $((mq_base + 11)) "$work/mq.to-host.1"
    l1=$listener
    host_listen $((mq_base + 12)) "$work/mq.to-host.2"
    l2=$listener
    mq_t=$(now)
    type_line "tx $((mq_base + 11)) 1 & tx $((mq_base + 12)) 2 &"
    pids=""
    for i in 1 2 3 4 5 6 7 8; do
        nc -w 10 "$guest_ip" $((mq_base + i)) <"$work/mq.payload" >/dev/null &
        pids="$pids $!"
    done
    for p in $pids; do wait_gone "$p" 120 "$1: a host->guest connection" || fail "$1: a host->guest connection failed"; done
    for i in 1 2 3 4 5 6 7 8; do
        r=$(guest_result RX $((mq_base + i)) 120)
        [ "$r" = "1048576,$mq_md5" ] || fail "$1: guest port $((mq_base + i)) got $r, sent 1048576,$mq_md5"
    done
    for i in 1 2; do
        r=$(guest_result TX $((mq_base + 10 + i)) 120)
        lp=$l1
        [ "$i" = 1 ] || lp=$l2
        wait_gone "$lp" 30 "$1: the host listener $i"
        rc=$(wait_match "TXRC$((mq_base + 10 + i))=[0-9]+:END" 0 10)
        [ "$rc" = "TXRC$((mq_base + 10 + i))=0:END" ] || fail "$1: guest sender $i: $rc"
        got="$(wc -c <"$work/mq.to-host.$i"),$(md5 "$work/mq.to-host.$i")"
        [ "$got" = "$r" ] || fail "$1: the host got $got from the guest's vCPU $i, which sent $r"
    done
    mq_s=$(secs "$mq_t")
    to_host=$(($(wc -c <"$work/mq.to-host.1") + $(wc -c <"$work/mq.to-host.2")))
    say "$1 transfers: 8 x 1048576 bytes host->guest and 2 x $((to_host / 2)) bytes guest->host, all checksums match, in $mq_s s ($(mbps $((8 * 1048576 + to_host)) "$mq_s") MB/s in all)"
    after=$(guest_irqs "A$mq_base")
    say "$1 guest interrupts after: $after"
    for q in input.0 input.1 output.0 output.1; do
        b=$(irq_count "$before" $q)
        a=$(irq_count "$after" $q)
        say "$1 virtio0-$q: $b -> $a (+$((a - b)))"
        [ "$a" -gt "$b" ] || fail "$1: virtio0-$q took no interrupt during the parallel transfers ($b -> $a)"
    done
}

# ---------------------------------------------------------------------------------------------
# Into a network namespace of our own: the taps, the VMMs and every host-side peer live there.
# A mount namespace too, for a sysfs of our own: /sys/class/net shows the network namespace
# of the process that mounted sysfs.
if [ -z "${NET_STAGE_NS:-}" ]; then
    export NET_STAGE_NS=1
    unshare -n -m true 2>/dev/null || fail "unshare -n -m failed: the test kernel needs CONFIG_NET_NS"
    exec unshare -n -m sh "$0" "$@"
fi
[ "$(readlink /proc/self/ns/net)" != "$(readlink /proc/1/ns/net)" ] || fail "not in a network namespace of our own"
mount -t sysfs sysfs /sys || fail "cannot mount sysfs in the new namespaces"
ip link set lo up
[ -e /sys/class/net/lo ] || fail "/sys/class/net does not show the new network namespace"
echo "NET-E2E-STAGE$stage netns $(readlink /proc/self/ns/net)"
# The NIC to the outside peer joins us; forwarding starts in stage 1 now, in stage 2 once the
# guest's own traffic has been checked.
nsenter -t 1 -n ip link set eth0 netns $$ || fail "cannot move eth0 (QEMU's NIC) into our namespace"
ip addr add "$uplink_ip/24" dev eth0 || fail "cannot give eth0 $uplink_ip"
ip link set eth0 up || fail "cannot bring eth0 up"
[ "$stage" = 2 ] || echo 1 >/proc/sys/net/ipv4/ip_forward || fail "cannot turn on IPv4 forwarding"
for f in /lib/vfio-stage.sh /bin/cloud-hypervisor /bin/ch-remote /bin/ch-luod /guest/bzImage /guest/initramfs.cpio.gz; do
    [ -e "$f" ] || fail "$f is missing from the initramfs"
done
[ -c /dev/liveupdate ] || fail "/dev/liveupdate is missing (kernel without LUO or no liveupdate=on)"
mkdir -p "$work" || fail "cannot create $work"
# The payload: 4 MiB of our own binary (the same in both kernels' images).
dd if=/bin/cloud-hypervisor of="$payload" bs=1048576 skip=1 count=4 2>/dev/null
[ "$(wc -c <"$payload")" = "$payload_size" ] || fail "cannot cut the payload out of /bin/cloud-hypervisor"
payload_md5=$(md5 "$payload")
start_kernel_agent "$work/luod.sock" "$work/luod.log"

if [ "$stage" = 1 ]; then
    for f in /kexec/bzImage /kexec/initrd.cpio.gz; do
        [ -e "$f" ] || fail "$f is missing from the outer initramfs"
    done
    # The restart-mode agent; the VMMs find "the agent" through a symlink.
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
        --cmdline "console=ttyS0 panic=-1" --memory size=256M --cpus boot=2 \
        --net "$net_arg" --serial tty --console off --event-monitor "path=$work/a.events" \
        <"$work/a.in" >"$work/a.console" 2>"$work/a.log" &
    vmm=$! console=$work/a.console console_in=$work/a.in
    # Holding the write end open keeps the VMM's stdin from seeing EOF.
    exec 3>"$work/a.in"
    wait_match LINUX-GUEST-READY 0 120 >/dev/null
    say "guest ready after $(secs "$t0") s"
    type_line 'dmesg -n 1'
    type_line "ip addr add $guest_ip/24 dev eth0 && ip link set eth0 up"
    guest_functions
    queues=$(ask '$(ls /sys/class/net/eth0/queues | tr "\n" " ")' QUEUES 60)
    say "guest eth0 queues: $queues"
    [ "$queues" = "rx-0 rx-1 tx-0 tx-1 " ] || fail "the guest's eth0 has queues '$queues', expected 2 pairs"
    gmac=$(ask '$(tr : - </sys/class/net/eth0/address)' GMAC 60 | tr - :)
    [ "$gmac" = "$guest_mac" ] || fail "the guest's eth0 has MAC $gmac, expected $guest_mac"
    ip -4 addr show dev "$tap" | grep -q "inet $host_ip/24" || fail "tap $tap has no $host_ip/24: $(ip addr show dev "$tap" 2>&1)"
    tap_mac=$(cat "/sys/class/net/$tap/address")
    tap_ifindex=$(cat "/sys/class/net/$tap/ifindex")
    tap_queues=$(tap_queues)
    if [ -z "$tap_mac" ] || [ -z "$tap_ifindex" ]; then fail "no /sys/class/net/$tap"; fi
    [ "$tap_queues" = "rx-0 rx-1 tx-0 tx-1 " ] || fail "tap $tap has queues '$tap_queues', expected 2 (multiqueue)"
    say "tap $tap: ifindex $tap_ifindex, MAC $tap_mac, queues $tap_queues"
    t=$(now)
    ping -c 3 -i 0.2 -w 30 "$guest_ip" >"$work/ping.log" 2>&1 || fail "no ping answer from the guest: $(cat "$work/ping.log")"
    say "ping: $(grep -o '[0-9]* packets received' "$work/ping.log"), $(grep -o 'min/avg/max = [0-9./]* ms' "$work/ping.log")"

    # A soak of the test bed (scripts/test-nested-net --soak-rounds N): the multi-queue
    # transfers N times over in the first VMM, before any update.
    soak_rounds=$(arg net_soak_rounds 0)
    soak_round=1
    while [ "$soak_round" -le "$soak_rounds" ]; do
        multiqueue "soak round $soak_round of $soak_rounds:" $((6000 + 20 * soak_round))
        soak_round=$((soak_round + 1))
    done
    # R: a TCP stream across a restart-mode live update.
    type_line 'rx 5001 &'
    guest_listens 5001
    flag=$work/r.flag
    r_t=$(now)
    (paced_send "$payload" "$flag" | nc -w 10 "$guest_ip" 5001 >/dev/null; echo $? >"$work/r.rc") &
    t=$(now)
    until [ -e "$flag.half" ]; do
        elapsed_over "$t" 120 && fail "the host could not write half the payload within 120 s"
        sleep 0.1
    done
    say "R: host wrote 2 MiB after $(secs "$r_t") s; the stream goes on, 16 KiB every 50 ms"
    sleep 0.5
    cloud-hypervisor -v --api-socket "path=$work/b.sock" --liveupdate "agent=$work/agent.sock" \
        --restore "source_url=luo://$session_restart" --event-monitor "path=$work/b.events" \
        <"$work/b.in" >"$work/b.console" 2>"$work/b.log" &
    b_pid=$!
    exec 4>"$work/b.in"
    sleep 0.5
    kill -0 "$b_pid" 2>/dev/null || fail "the successor exited while waiting for the handover"
    read -r lu_start _ </proc/uptime
    response=$(timeout 60 ch-remote --api-socket "$work/a.sock" live-update --session "$session_restart" 2>&1) ||
        fail "restart-mode live-update failed: $response"
    read -r lu_end _ </proc/uptime
    say "R: live-update call $(awk -v a="$lu_start" -v b="$lu_end" 'BEGIN { printf "%.2f", b - a }') s, answer: $(echo "$response" | tr -d ' \n')"
    t=$(now)
    while kill -0 "$vmm" 2>/dev/null; do
        elapsed_over "$t" 30 && fail "the old VMM did not exit within 30 s of the update"
        sleep 0.1
    done
    wait "$vmm"
    a_rc=$?
    [ "$a_rc" = 0 ] || fail "the old VMM exited with status $a_rc"
    check_vmm_log "$work/a.log"
    vmm=$b_pid console=$work/b.console console_in=$work/b.in
    during=$(awk -v a="$lu_start" -v b="$lu_end" '$1 >= a && $1 <= b' "$flag.chunks" | wc -l)
    : >"$flag"
    t=$(now)
    until [ -e "$work/r.rc" ]; do
        elapsed_over "$t" 120 && fail "R: the host sender did not finish within 120 s of the update"
        sleep 0.1
    done
    [ "$(cat "$work/r.rc")" = 0 ] || fail "R: the host's nc exited $(cat "$work/r.rc")"
    r=$(guest_result RX 5001 120)
    say "R: the guest received $r; the host sent $payload_size,$payload_md5 over one connection in $(secs "$r_t") s (paced)"
    [ "$r" = "$payload_size,$payload_md5" ] || fail "R: the guest got $r, the host sent $payload_size,$payload_md5"
    say "R: $during host chunks of 16 KiB written during the live-update call"
    [ "$during" -gt 0 ] || fail "R: the host wrote nothing while the update ran: the test did not stream through it"
    has_event "$work/b.events" restored || fail "R: no vm/restored event from the successor"
    say "R: pause_us=$(event_property "$work/b.events" pause_us restored) (restored event of the successor)"
    has_event "$work/b.events" net-recreated && fail "R: the successor re-created the tap in restart mode"
    [ "$(cat "/sys/class/net/$tap/ifindex" 2>/dev/null)" = "$tap_ifindex" ] ||
        fail "R: tap $tap is not the same interface after the restart-mode update"
    sessions=$(ch-luod --socket "$work/restart.sock" list)
    [ -z "$sessions" ] || fail "R: the restart-mode agent still holds sessions: $sessions"

    # MQ on the adopted taps.
    multiqueue "MQ after the restart-mode update:" 5100

    # X: the outside peer's connection, which must live through the kexec.
    type_line "ip route add $peer_net via $host_ip"
    type_line 'rx 5004 &'
    guest_listens 5004
    say "X: peer go"
    t=$(now)
    until [ "$(ask '$(wc -c </tmp/rx5004)' XN 30)" -ge 65536 ]; do
        elapsed_over "$t" 120 && fail "X: the outside peer's stream did not reach the guest within 120 s"
        sleep 0.5
    done
    say "X: the outside peer's stream reaches the guest ($(ask '$(wc -c </tmp/rx5004)' XN 30) bytes after $(secs "$t") s)"

    # K, before the kexec: a listener for after it, and a connection that the kexec ends.
    type_line 'rx 5002 &'
    guest_listens 5002
    type_line 'hold 5003 &'
    guest_listens 5003
    (dd if="$payload" bs=65536 count=1 2>/dev/null; exec sleep 100000) | nc "$guest_ip" 5003 >"$work/k1.host" &
    t=$(now)
    until grep -q tick "$work/k1.host" 2>/dev/null; do
        elapsed_over "$t" 30 && fail "K: the held connection carries no tick from the guest"
        sleep 0.2
    done
    t=$(now)
    until [ "$(ask '$(wc -c </tmp/hold5003)' HOLDN 30)" = 65536 ]; do
        elapsed_over "$t" 30 && fail "K: the guest did not receive 64 KiB on the held connection"
        sleep 0.2
    done
    say "K: before the kexec, guest TCP sockets: $(ask '$(netstat -tan | grep -E ":500[23] " | tr -s " " | tr ":\n" ".;")' NETSTAT 30)"
    check_vmm_log "$work/b.log"
    say "X: before the kexec the guest has $(ask '$(wc -c </tmp/rx5004)' XN 30) bytes from the outside peer"
    ln -sfn luod.sock "$work/agent.sock"
    [ "$(ch-luod --socket "$work/agent.sock" ping)" = kernel ] || fail "the agent symlink does not lead to the kernel-mode agent"
    next="$(sed 's/ *net_stage=[^ ]*//' /proc/cmdline) net_stage=2 net_tap_mac=$tap_mac"
    # QEMU's NIC must stop writing received frames into this kernel's buffers before the
    # kexec: after it that memory belongs to the next kernel, or to preserved guest RAM. Unbinding
    # the driver resets the device (the outside peer's frames are dropped until stage 2).
    for nic in /sys/bus/virtio/drivers/virtio_net/virtio*; do
        [ -e "$nic" ] || continue
        echo "${nic##*/}" >/sys/bus/virtio/drivers/virtio_net/unbind || fail "cannot unbind ${nic##*/} from virtio_net"
    done
    load_next_kernel "$work/luod.sock" "$work/luod.log" "$session_kexec" "$next"
    say "K: live update across the kexec at $(now)"
    live_update_across_kexec "$work/b.sock" "$session_kexec"
fi

# Stage 2: the VM comes back on the new kernel.
ip link show "$tap" >/dev/null 2>&1 && fail "tap $tap exists before the restore"
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
sleep 0.1
say "K: restored after $(secs "$t0") s; pause_us=$(event_property "$work/c.events" pause_us restored) (spans the kexec)"
until has_event "$work/c.events" net-recreated; do
    elapsed_over "$restored" 10 && fail "K: no vm/net-recreated event within 10 s of vm/restored"
    sleep 0.05
done
recreated=$(event_property "$work/c.events" tap net-recreated)
say "K: vm/net-recreated tap=$recreated"
[ "$recreated" = "$tap" ] || fail "K: vm/net-recreated names tap '$recreated', expected $tap"
ip -4 addr show dev "$tap" | grep -q "inet $host_ip/24" || fail "K: tap $tap has no $host_ip/24 after the kexec: $(ip addr show dev "$tap" 2>&1)"
ip link show dev "$tap" | grep -q ',UP' || fail "K: tap $tap is not up after the kexec: $(ip link show dev "$tap")"
tap_queues=$(tap_queues)
new_mac=$(cat "/sys/class/net/$tap/address")
say "K: tap $tap again: $(ip -4 addr show dev "$tap" | grep -o "inet [0-9./]*"), MAC $new_mac (was $(arg net_tap_mac "")), queues $tap_queues"
[ "$tap_queues" = "rx-0 rx-1 tx-0 tx-1 " ] || fail "K: tap $tap has queues '$tap_queues', expected 2 (multiqueue)"
problems=""
[ "$new_mac" = "$(arg net_tap_mac "")" ] ||
    problems="the re-created tap has MAC $new_mac, the tap had $(arg net_tap_mac "") before the kexec; "

# The guest's own traffic first, before the host sends it anything: the held connection's next
# tick (one a second) must reach the new kernel, which has no socket for it and resets it. It
# goes to the MAC the guest's ARP entry for the host holds, the tap's before the kexec.
hold_md5=$(head -c 65536 "$payload" | md5sum | cut -c1-32)
if h=$(guest_result HOLD 5003 10 soft); then
    say "K: the connection of before the kexec was reset by the new kernel $(secs "$restored") s after vm/restored (the guest's own traffic, before any from the host), having received $h"
else
    say "K: guest's neighbour entry for the host 10 s after vm/restored: $(ask '$(ip neigh show 10.99.0.1 | tr ":" -)' NEIGH 30)"
    problems="${problems}the guest's own traffic did not reach the host within 10 s of vm/restored (no reset of the connection of before the kexec); "
fi
# Ping at once: the first answer.
t=$(now)
until ping -c 1 -W 1 "$guest_ip" >/dev/null 2>&1; do
    elapsed_over "$t" 30 && fail "K: no ping answer within 30 s of the restore"
done
say "K: first ping answer $(secs "$restored") s after vm/restored"
ping -c 3 -i 0.2 -w 30 "$guest_ip" >"$work/ping.log" 2>&1 || fail "K: ping fails after the kexec: $(cat "$work/ping.log")"
# With the host's ARP request the guest learns the tap's MAC again, so this comes now at the latest.
[ -n "${h:-}" ] || h=$(guest_result HOLD 5003 60)
[ "$h" = "65536,$hold_md5" ] || fail "K: the held connection received $h, the host sent 64 KiB ($hold_md5)"

# X: forwarding on again; the outside peer's connection of before the kexec must carry on.
x_before=$(ask '$(wc -c </tmp/rx5004)' XN 30)
echo 1 >/proc/sys/net/ipv4/ip_forward || fail "X: cannot turn on IPv4 forwarding"
t=$(now)
until [ "$(ask '$(wc -c </tmp/rx5004)' XN 30)" -gt "$x_before" ]; do
    elapsed_over "$t" 120 && fail "X: the outside peer's connection carried nothing within 120 s of forwarding ($x_before bytes)"
    sleep 0.5
done
say "X: the outside peer's connection of before the kexec carries on: more than $x_before bytes $(secs "$t") s after forwarding came back ($(secs "$restored") s after vm/restored)"
sleep 2
say "X: peer stop"
r=$(guest_result RX 5004 120)
say "X: the guest received $r from the outside peer over one connection"

# A NEW host connection to the guest's listener of before the kexec, at full speed.
k_t=$(now)
# Bounded: nc's -w does not cover a write the guest stops taking.
timeout 120 nc -w 10 "$guest_ip" 5002 <"$payload" >/dev/null ||
    fail "K: the new connection to the guest's port 5002 failed or stalled (guest: $(guest_result RX 5002 1 soft || echo no result); tap: $(ip -s link show dev "$tap" | tr -s ' \n' ' '))"
k_s=$(secs "$k_t")
r=$(guest_result RX 5002 120)
say "K: new host->guest connection: the guest received $r of $payload_size,$payload_md5 in $k_s s ($(mbps "$payload_size" "$k_s") MB/s)"
[ "$r" = "$payload_size,$payload_md5" ] || fail "K: the guest got $r on its listener of before the kexec, the host sent $payload_size,$payload_md5"

sockets=$(ask '$(netstat -tn | grep -cE ":500[23] .*ESTABLISHED")' NETSTAT 30)
[ "$sockets" = 0 ] || fail "K: the guest still has $sockets established connections on 5002/5003"

# A NEW guest->host connection: the guest's ARP entry and route to the host work again.
host_listen 6003 "$work/k3"
k_t=$(now)
type_line 'tx 6003 3 &'
r=$(guest_result TX 6003 120)
wait_gone "$listener" 30 "K: the host listener"
k_s=$(secs "$k_t")
got="$(wc -c <"$work/k3"),$(md5 "$work/k3")"
say "K: new guest->host connection: the host received $got, the guest sent $r, in $k_s s ($(mbps "${got%%,*}" "$k_s") MB/s, counting the console round trip)"
[ "$got" = "$r" ] || fail "K: the host got $got from the guest, which sent $r"

# MQ on the re-created taps.
multiqueue "MQ after the kexec:" 5200

say "K: counters: $(ch-remote --api-socket "$work/c.sock" counters 2>&1 | tr -d ' \n')"
check_vmm_log "$work/c.log"
grep -F '<WARN>' "$work/c.log" | sed 's/^/NET-E2E restored VMM warned: /'
sessions=$(ch-luod --socket "$work/luod.sock" list)
[ -z "$sessions" ] || fail "the agent still holds sessions after the restore: $sessions"
[ -z "$problems" ] || fail "K: $problems"
echo "NET-E2E-PASS"
reboot -f
