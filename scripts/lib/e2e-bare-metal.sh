# shellcheck shell=bash
# scripts/e2e-kexec --bare-metal: the same two stages (guest/kexec/stage.sh) on this very host.
# Stage 1 runs now: the probe guest under our VMM, ch-luod in kernel mode, a live update and a
# kexec of the whole machine into KERNEL. After the kexec a systemd unit (installed here, run
# only when the kernel command line says e2e_stage=2) runs stage 2, which restores the guest
# and writes its verdict to $BARE_METAL_DIR/stage2.log; `scripts/e2e-kexec --bare-metal
# --result` prints it, exits 0 only on a pass, and removes the unit.

BARE_METAL_DIR=/var/lib/chv-e2e-kexec
BARE_METAL_UNIT=chv-e2e-kexec-stage2.service
BARE_METAL_CONFIRM=--yes-kexec-this-host

# Refuses unless the caller confirmed that this host may be kexec'd.
bare_metal_confirmed() {
    [ "$1" = yes ] && return 0
    cat >&2 <<MSG
e2e-kexec: --bare-metal kexecs THIS machine into a new kernel: every process on it stops, and
only the probe guest under our VMM is carried across. Run it on a test host only, and confirm
with $BARE_METAL_CONFIRM. README.md ("Bare-metal host") lists what the host needs.
MSG
    exit 2
}

# Checks what the host needs before anything is changed on it.
bare_metal_prereqs() {
    local kernel="$1" initrd="$2"
    [ -c /dev/liveupdate ] || die "/dev/liveupdate is missing: boot a kernel built with CONFIG_LIVEUPDATE, CONFIG_KEXEC_HANDOVER and CONFIG_LIVEUPDATE_MEMFD, with liveupdate=on on its command line (README.md, \"Bare-metal host\")"
    [ "$(id -u)" = 0 ] || die "--bare-metal needs root (it opens /dev/liveupdate and kexecs)"
    [ -w /dev/kvm ] || die "/dev/kvm is missing or not writable: load kvm_intel or kvm_amd"
    command -v systemctl >/dev/null ||
        die "stage 2 is started after the kexec by a systemd unit; this host has no systemctl"
    [ -r "$kernel" ] || die "kernel image $kernel not found (pass --kernel IMAGE)"
    [ -r "$initrd" ] || die "initrd $initrd not found (pass --initrd FILE)"
}

# Stage 1 on this host; on success the machine kexecs and this never returns.
bare_metal_run() {
    local bins="$1" probe="$2" kernel="$3" initrd="$4" knobs="$5" stage="$6"
    rm -rf "$BARE_METAL_DIR" /run/chv-e2e-kexec
    mkdir -p "$BARE_METAL_DIR"/{bin,guest,kexec}
    cp "$bins"/cloud-hypervisor "$bins"/ch-remote "$bins"/ch-luod "$BARE_METAL_DIR/bin/"
    cp "$probe" "$BARE_METAL_DIR/guest/probe-guest.elf"
    cp "$kernel" "$BARE_METAL_DIR/kexec/bzImage"
    cp "$initrd" "$BARE_METAL_DIR/kexec/initrd.cpio.gz"
    cp "$stage" "$BARE_METAL_DIR/stage.sh"
    cat >"/etc/systemd/system/$BARE_METAL_UNIT" <<UNIT
[Unit]
Description=e2e-kexec stage 2: restore the probe guest after the kexec
ConditionKernelCommandLine=e2e_stage=2
After=local-fs.target

[Service]
Type=oneshot
Environment=E2E_BASE=$BARE_METAL_DIR E2E_BARE_METAL=1 E2E_WORK=/run/chv-e2e-kexec
ExecStart=/bin/sh $BARE_METAL_DIR/stage.sh
StandardOutput=append:$BARE_METAL_DIR/stage2.log
StandardError=append:$BARE_METAL_DIR/stage2.log

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable "$BARE_METAL_UNIT"
    log "stage 1 on this host; the machine kexecs into $kernel when the guest is frozen"
    log "after the reboot run: scripts/e2e-kexec --bare-metal --result"
    E2E_BASE="$BARE_METAL_DIR" E2E_BARE_METAL=1 E2E_WORK=/run/chv-e2e-kexec E2E_ARGS="$knobs" \
        sh "$BARE_METAL_DIR/stage.sh" 2>&1 | tee "$BARE_METAL_DIR/stage1.log"
    die "stage 1 ended without a kexec (log: $BARE_METAL_DIR/stage1.log)"
}

# After the kexec: stage 2's verdict.
bare_metal_result() {
    local log="$BARE_METAL_DIR/stage2.log"
    [ -r "$log" ] || die "no $log: stage 2 has not run (was the host kexec'd by stage 1? see $BARE_METAL_DIR/stage1.log and: systemctl status $BARE_METAL_UNIT)"
    cat "$log"
    if systemctl is-enabled --quiet "$BARE_METAL_UNIT" 2>/dev/null; then
        systemctl disable --quiet "$BARE_METAL_UNIT" || true
    fi
    rm -f "/etc/systemd/system/$BARE_METAL_UNIT"
    systemctl daemon-reload || true
    grep -q E2E-KEXEC-PASS "$log" || die "stage 2 did not pass (log: $log)"
    echo "E2E-KEXEC: bare metal: pass (log: $log)"
}
