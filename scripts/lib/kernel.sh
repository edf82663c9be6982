# shellcheck shell=bash
# Getting Debian's linux-source package and building small kernels from it, with a cache.
# Needs lib/common.sh sourced first.

# The Debian source package the test kernels are built from by default; another (e.g. the next
# version, for a kexec from one kernel version to the next) with CHV_KERNEL_SOURCE_PKG or
# build-test-kernel --source.
KERNEL_DEFAULT_SOURCE_PKG=linux-source-7.2
KERNEL_SOURCE_PKG="${CHV_KERNEL_SOURCE_PKG:-$KERNEL_DEFAULT_SOURCE_PKG}"
# Bump when the build recipe below changes in a way that changes the output.
KERNEL_RECIPE_VERSION=1

# Packages a kernel build needs.
kernel_build_prereqs() {
    ensure_packages build-essential flex bison bc libelf-dev libssl-dev cpio xz-utils kmod
}

# Write deb822 apt sources for suites sid and experimental (where the next kernel version is
# packaged first; apt takes from it only what sid lacks), copied from the machine's Debian
# stanza, to $1. The mirror comes from the machine's own configuration; nothing here names one.
write_sid_source() {
    write_suite_source "$1" sid
    local stanza
    stanza="$(sed 's/^Suites:.*/Suites: experimental/' "$1")"
    printf '\n%s\n' "$stanza" >>"$1"
}

# Write a deb822 apt source for suite $2, copied from the machine's Debian stanza, to $1.
write_suite_source() {
    local suite="$2"
    local out="$1" deb822=/etc/apt/sources.list.d/debian.sources stanza=""
    if [ -r "$deb822" ]; then
        # First stanza with a plain release suite (not -security or -updates).
        stanza="$(awk 'BEGIN { RS = ""; FS = "\n" }
            {
                for (i = 1; i <= NF; i++) {
                    if ($i ~ /^Suites:/) {
                        n = split(substr($i, 8), s, " ")
                        for (j = 1; j <= n; j++) if (s[j] !~ /-/) { print; exit }
                    }
                }
            }' "$deb822")"
    fi
    if [ -n "$stanza" ]; then
        printf '%s\n' "$stanza" |
            grep -v '^#' |
            sed -e "s/^Suites:.*/Suites: $suite/" -e 's/^Components:.*/Components: main/' >"$out"
        return 0
    fi
    # Fallback: a one-line "deb URI SUITE ..." entry in sources.list.
    local line
    line="$(grep -hE '^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?[a-z]+://' /etc/apt/sources.list 2>/dev/null |
        grep -v -- '-security' | head -n1 || true)"
    [ -n "$line" ] || die "no Debian apt source found in $deb822 or /etc/apt/sources.list"
    local uri
    uri="$(printf '%s\n' "$line" | sed -E 's/^deb[[:space:]]+(\[[^]]*\][[:space:]]+)?//' | awk '{ print $1 }')"
    printf 'Types: deb\nURIs: %s\nSuites: %s\nComponents: main\n' "$uri" "$suite" >"$out"
    if [ -r /usr/share/keyrings/debian-archive-keyring.gpg ]; then
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' >>"$out"
    fi
}

# Run apt-get/apt-cache against a private sid list directory ($1), leaving the system's apt
# state untouched. Usage: private_apt DIR apt-get ARGS...
private_apt() {
    local dir="$1"
    shift
    local opts=(
        -o "Dir::Etc::SourceList=/dev/null"
        -o "Dir::Etc::SourceParts=$dir/sources.list.d"
        -o "Dir::State::Lists=$dir/lists"
        -o "Dir::Cache=$dir/cache"
        -o "Dir::Cache::archives=$dir/cache/archives"
        # Only the package index is needed, not the AppStream metadata.
        -o "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false"
        -o "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false"
    )
    # The private directories live under our cache, which apt's sandbox user may not reach.
    [ "$(id -u)" -eq 0 ] && opts+=(-o "APT::Sandbox::User=root")
    "$1" "${opts[@]}" "${@:2}"
}

# Refresh the private sid + experimental package lists; print their directory.
refresh_private_apt() {
    local apt_dir
    apt_dir="$(cache_dir)/linux-source/apt"
    mkdir -p "$apt_dir/sources.list.d" "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
    write_sid_source "$apt_dir/sources.list.d/sid.sources"
    log "refreshing the private sid and experimental package lists (system apt state is not touched)"
    private_apt "$apt_dir" apt-get -q update >&2 || die "apt-get update for suites sid and experimental failed"
    printf '%s\n' "$apt_dir"
}

# The newest linux-source-7.N package the suites offer, by package name. Like the source trees,
# the answer is cached: the newest package already fetched is taken unless CHV_REFRESH_SOURCE=1.
newest_kernel_source_pkg() {
    local apt_dir newest
    if [ -z "${CHV_REFRESH_SOURCE:-}" ]; then
        newest="$(find "$(cache_dir)/linux-source" -maxdepth 1 -name 'current-linux-source-7.*' \
            -printf '%f\n' 2>/dev/null | sed 's/^current-//' | sort -V | tail -n1)"
        if [ -n "$newest" ]; then
            printf '%s\n' "$newest"
            return 0
        fi
    fi
    apt_dir="$(refresh_private_apt)"
    newest="$(private_apt "$apt_dir" apt-cache search --names-only '^linux-source-7\.[0-9]+$' 2>/dev/null |
        awk '{ print $1 }' | sort -V | tail -n1)"
    [ -n "$newest" ] || die "no linux-source-7.N package in suites sid and experimental"
    printf '%s\n' "$newest"
}

# Download the linux-source .deb into DIR ($1) and print "VERSION PATH".
download_kernel_source() {
    local out="$1" apt_dir
    apt_dir="$(refresh_private_apt)"
    local version
    version="$(private_apt "$apt_dir" apt-cache show --no-all-versions "$KERNEL_SOURCE_PKG" 2>/dev/null |
        awk '/^Version:/ { print $2; exit }')"
    [ -n "$version" ] || die "package $KERNEL_SOURCE_PKG not found in suites sid and experimental"
    (cd "$out" && private_apt "$apt_dir" apt-get -q download "$KERNEL_SOURCE_PKG=$version" >&2) ||
        die "downloading $KERNEL_SOURCE_PKG $version failed"
    local debs=("$out/${KERNEL_SOURCE_PKG}"_*.deb) deb
    deb="${debs[0]}"
    [ -r "$deb" ] || die "apt-get download left no .deb in $out"
    printf '%s %s\n' "$version" "$deb"
}

# The file naming the cached source version of KERNEL_SOURCE_PKG ("current" for the default
# package, as before there were others).
current_source_file() {
    local name=current
    [ "$KERNEL_SOURCE_PKG" = "$KERNEL_DEFAULT_SOURCE_PKG" ] || name="current-$KERNEL_SOURCE_PKG"
    printf '%s\n' "$(cache_dir)/linux-source/$name"
}

# Print the path of an unpacked, pristine kernel source tree, fetching it if needed, and set
# KERNEL_SOURCE_VERSION. The newest cached tree is reused unless CHV_REFRESH_SOURCE=1.
# CHV_KERNEL_DEB=/path/to/linux-source-*.deb uses a local package instead of apt.
kernel_source_tree() {
    local base current
    base="$(cache_dir)/linux-source"
    current="$(current_source_file)"
    mkdir -p "$base"
    exec {src_lock}>"$base/lock"
    flock "$src_lock"
    local version="" deb=""
    if [ -z "${CHV_REFRESH_SOURCE:-}" ] && [ -z "${CHV_KERNEL_DEB:-}" ] && [ -r "$current" ]; then
        version="$(cat "$current")"
        if [ ! -e "$base/$version/tree/.unpacked" ]; then
            version=""
        fi
    fi
    if [ -z "$version" ]; then
        kernel_build_prereqs
        local dl="$base/download"
        rm -rf "$dl"
        mkdir -p "$dl"
        if [ -n "${CHV_KERNEL_DEB:-}" ]; then
            [ -r "$CHV_KERNEL_DEB" ] || die "CHV_KERNEL_DEB=$CHV_KERNEL_DEB is not readable"
            deb="$CHV_KERNEL_DEB"
            version="$(dpkg-deb -f "$deb" Version)"
        else
            read -r version deb < <(download_kernel_source "$dl")
            [ -n "$version" ] || exit 1
        fi
        if [ ! -e "$base/$version/tree/.unpacked" ]; then
            log "unpacking $KERNEL_SOURCE_PKG $version"
            local tmp="$base/$version/tmp"
            rm -rf "$tmp" "$base/$version/tree"
            mkdir -p "$tmp"
            dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" --wildcards './usr/src/linux-source-*.tar.*' ||
                die "no source tarball inside $deb"
            local tarballs=("$tmp"/usr/src/linux-source-*.tar.*) tarball
            tarball="${tarballs[0]}"
            tar -xf "$tarball" -C "$tmp" || die "unpacking $tarball failed"
            local top
            top="$(find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'linux-source-*' | head -n1)"
            [ -n "$top" ] || die "unexpected layout in $tarball"
            mv "$top" "$base/$version/tree"
            rm -rf "$tmp"
            touch "$base/$version/tree/.unpacked"
        fi
        rm -rf "$dl"
        printf '%s\n' "$version" >"$current"
    fi
    flock -u "$src_lock"
    exec {src_lock}>&-
    KERNEL_SOURCE_VERSION="$version"
    KERNEL_SOURCE_TREE="$base/$version/tree"
}

# Check that every option a fragment sets survived in .config; print the missing ones.
missing_config_options() {
    local config="$1"
    shift
    local frag line name
    for frag in "$@"; do
        while IFS= read -r line; do
            case "$line" in
            CONFIG_*=*)
                grep -qxF -- "$line" "$config" || printf '  %s (have: %s)\n' "$line" \
                    "$(grep -E "^(# )?${line%%=*}[= ]" "$config" || echo unset)"
                ;;
            "# CONFIG_"*" is not set")
                name="${line#\# }"
                name="${name%% *}"
                if grep -q "^$name=" "$config"; then
                    printf '  %s (have: %s)\n' "$line" "$(grep "^$name=" "$config")"
                fi
                ;;
            esac
        done <"$frag"
    done
}

# Build a bzImage from the cached source: tinyconfig + fragments, olddefconfig, check, build.
# Usage: kernel_build NAME FRAGMENT... ; sets KERNEL_IMAGE to the cached bzImage.
kernel_build() {
    local name="$1"
    shift
    local frag
    for frag in "$@"; do
        [ -r "$frag" ] || die "config fragment $frag not found"
    done
    local hash key out
    hash="$({
        printf 'recipe %s\npkg %s\n' "$KERNEL_RECIPE_VERSION" "$KERNEL_SOURCE_PKG"
        for frag in "$@"; do
            printf '== %s\n' "${frag##*/}"
            cat "$frag"
        done
    } | sha256_stdin)"
    # A cached image for the last known source version needs no source tree at all.
    local known=""
    if [ -z "${CHV_REFRESH_SOURCE:-}" ] && [ -z "${CHV_KERNEL_DEB:-}" ]; then
        known="$(cat "$(current_source_file)" 2>/dev/null || true)"
    fi
    if [ -n "$known" ] && [ -e "$(cache_dir)/$name/$known-${hash:0:16}/bzImage" ]; then
        KERNEL_IMAGE="$(cache_dir)/$name/$known-${hash:0:16}/bzImage"
        log "cached: $KERNEL_IMAGE"
        return 0
    fi
    kernel_source_tree
    key="$KERNEL_SOURCE_VERSION-${hash:0:16}"
    out="$(cache_dir)/$name/$key"
    KERNEL_IMAGE="$out/bzImage"
    if [ -e "$KERNEL_IMAGE" ]; then
        log "cached: $KERNEL_IMAGE"
        return 0
    fi
    kernel_build_prereqs
    local build
    build="$(cache_dir)/build/$name-$key"
    mkdir -p "$build"
    exec {build_lock}>"$build.lock"
    flock "$build_lock"
    if [ -e "$KERNEL_IMAGE" ]; then
        log "cached (built meanwhile): $KERNEL_IMAGE"
        return 0
    fi
    local mk=(make -C "$KERNEL_SOURCE_TREE" O="$build" ARCH=x86_64) logf="$build/build.log"
    local start
    start="$(now_s)"
    log "configuring $name ($KERNEL_SOURCE_PKG $KERNEL_SOURCE_VERSION, config $key); log: $logf"
    "${mk[@]}" tinyconfig >"$logf" 2>&1 || { tail -n 30 "$logf" >&2; die "make tinyconfig failed"; }
    cat "$@" >>"$build/.config"
    "${mk[@]}" olddefconfig >>"$logf" 2>&1 || { tail -n 30 "$logf" >&2; die "make olddefconfig failed"; }
    local missing
    missing="$(missing_config_options "$build/.config" "$@")"
    [ -z "$missing" ] || die "options from the fragments did not survive olddefconfig:
$missing"
    log "building $name bzImage with ${CHV_MAKE_JOBS:-2} jobs at nice 19 (minutes; a cold test kernel took ~10 min on 2 cores)"
    nice -n 19 "${mk[@]}" -j"${CHV_MAKE_JOBS:-2}" bzImage >>"$logf" 2>&1 ||
        { tail -n 40 "$logf" >&2; die "kernel build failed (full log: $logf)"; }
    mkdir -p "$out.tmp"
    cp "$build/arch/x86/boot/bzImage" "$out.tmp/bzImage"
    cp "$build/.config" "$out.tmp/config"
    rm -rf "$out"
    mv "$out.tmp" "$out"
    log "built $name in $(elapsed_since "$start") s"
    flock -u "$build_lock"
    exec {build_lock}>&-
    [ -n "${CHV_KEEP_BUILD:-}" ] || rm -rf "$build" "$build.lock"
}
