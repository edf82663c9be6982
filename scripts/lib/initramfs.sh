# shellcheck shell=bash
# Assembling gzip'd newc initramfs images around a static busybox. Reusable for nested
# (two-level) images: pack the inner one, then add it to the outer staging dir as a file.
# Needs lib/common.sh sourced first.

# Print the path of a cached static busybox, taken from Debian's busybox-static package
# (downloaded with the system's own apt sources, without installing it).
busybox_static() {
    local base
    base="$(cache_dir)/busybox"
    if [ -x "$base/current/busybox" ]; then
        printf '%s\n' "$base/current/busybox"
        return 0
    fi
    need_cmd apt-get apt
    mkdir -p "$base"
    local dl="$base/download"
    rm -rf "$dl"
    mkdir -p "$dl"
    log "downloading busybox-static"
    local opts=()
    # The cache may sit where apt's sandbox user cannot write.
    [ "$(id -u)" -eq 0 ] && opts=(-o "APT::Sandbox::User=root")
    if ! (cd "$dl" && apt-get -q "${opts[@]}" download busybox-static >&2); then
        as_root apt-get update >&2 || die "apt-get update failed"
        (cd "$dl" && apt-get -q "${opts[@]}" download busybox-static >&2) ||
            die "could not download the Debian package busybox-static"
    fi
    local debs=("$dl"/busybox-static_*.deb) deb version
    deb="${debs[0]}"
    [ -r "$deb" ] || die "apt-get download left no busybox-static .deb"
    # Epoch colons would make awkward path names.
    version="$(dpkg-deb -f "$deb" Version | tr ':' '_')"
    rm -rf "${base:?}/$version"
    mkdir -p "$base/$version/root"
    dpkg-deb -x "$deb" "$base/$version/root"
    [ -x "$base/$version/root/bin/busybox" ] || die "no /bin/busybox in $deb"
    mv "$base/$version/root/bin/busybox" "$base/$version/busybox"
    rm -rf "$base/$version/root" "$dl"
    ln -sfn "$version" "$base/current"
    printf '%s\n' "$base/current/busybox"
}

# Version string of the cached busybox (for cache keys).
busybox_version() {
    readlink "$(cache_dir)/busybox/current"
}

# Lay out a root file system in STAGE ($1) with busybox and links for all its applets.
initramfs_stage_busybox() {
    local stage="$1" bb applet
    bb="$(busybox_static)"
    mkdir -p "$stage"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,mnt}
    chmod 1777 "$stage/tmp"
    cp "$bb" "$stage/bin/busybox"
    chmod 755 "$stage/bin/busybox"
    # --list-full gives each applet's conventional directory (bin/sh, sbin/reboot, ...).
    while IFS= read -r applet; do
        if [ -z "$applet" ] || [ -e "$stage/$applet" ]; then
            continue
        fi
        mkdir -p "$stage/$(dirname "$applet")"
        ln -s /bin/busybox "$stage/$applet"
    done < <("$bb" --list-full)
}

# Copy HOST ($2) to GUEST path ($3) inside STAGE ($1). For a dynamically linked ELF, also copy
# the libraries ldd lists and the program interpreter, at the same paths.
initramfs_add_file() {
    local stage="$1" host="$2" guest="$3"
    [ -e "$host" ] || die "--add: $host does not exist"
    case "$guest" in /*) ;; *) die "--add: guest path '$guest' must be absolute" ;; esac
    mkdir -p "$stage$(dirname "$guest")"
    if [ -d "$host" ]; then
        mkdir -p "$stage$guest"
        cp -a "$host/." "$stage$guest/"
        return 0
    fi
    rm -f "$stage$guest"
    if initramfs_has_debug_info "$host"; then
        # Without the DWARF (the symbols stay, so backtraces keep their names): a release build
        # of ours is 5-20x smaller, which the packing here and the unpacking under TCG feel.
        need_cmd objcopy binutils
        objcopy --strip-debug "$host" "$stage$guest"
        chmod --reference="$host" "$stage$guest"
    else
        cp -L "$host" "$stage$guest"
    fi
    initramfs_add_libs "$stage" "$host"
}

# Whether file $1 is an ELF file.
initramfs_is_elf() {
    [ "$(head -c 4 "$1" | od -An -c | tr -d ' ')" = '177ELF' ]
}

# Whether HOST ($1) is an ELF file with DWARF debug sections.
initramfs_has_debug_info() {
    initramfs_is_elf "$1" || return 1
    need_cmd readelf binutils
    readelf -S -W "$1" 2>/dev/null | grep -q '\.debug_info'
}

# Copy the shared libraries (and loader) of ELF HOST ($2) into STAGE ($1), if it has any.
initramfs_add_libs() {
    local stage="$1" host="$2" lib
    initramfs_is_elf "$host" || return 0
    need_cmd ldd libc-bin
    local deps
    deps="$(ldd "$host" 2>/dev/null || true)"
    case "$deps" in *"not a dynamic executable"* | *"statically linked"* | "") return 0 ;; esac
    if printf '%s\n' "$deps" | grep -q 'not found'; then
        die "libraries of $host are missing on this host: $(printf '%s\n' "$deps" | grep 'not found' | tr -s ' \t' ' ')"
    fi
    # Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
    # "/lib64/ld-linux-x86-64.so.2 (0x...)"; keep each absolute path.
    for lib in $(printf '%s\n' "$deps" | grep -oE '/[^ ]+ \(0x' | cut -d' ' -f1); do
        [ -e "$stage$lib" ] && continue
        mkdir -p "$stage$(dirname "$lib")"
        cp -L "$lib" "$stage$lib"
    done
}

# Print a newc cpio header plus padded name. Args: NAME MODE(octal) NLINK RDEVMAJOR RDEVMINOR INO.
cpio_newc_header() {
    local name="$1" mode=$((8#$2)) nlink="$3" major="$4" minor="$5" ino="$6"
    local namesize=$((${#name} + 1))
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$mode" 0 0 "$nlink" 0 0 0 0 "$major" "$minor" "$namesize" 0
    printf '%s\0' "$name"
    head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# Pack STAGE ($1) into a gzip'd newc cpio at OUT ($2), owned by root, with a /dev/console
# node: the kernel opens it for init before init runs, and a node needs no root to add
# this way. Reproducible: sorted names, zero owner, fixed file times are not forced.
initramfs_pack() {
    local stage="$1" out="$2"
    need_cmd cpio cpio
    need_cmd gzip gzip
    mkdir -p "$(dirname "$out")"
    {
        (cd "$stage" && find . -mindepth 1 -print0 | LC_ALL=C sort -z |
            cpio --null -o -H newc --owner=0:0 --quiet)
        # A second archive, concatenated: the kernel unpacks them in turn.
        cpio_newc_header dev/console 020600 1 5 1 900001
        cpio_newc_header 'TRAILER!!!' 0 1 0 0 0
    } | gzip -6 -n >"$out.tmp"
    mv "$out.tmp" "$out"
}
