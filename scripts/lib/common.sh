# shellcheck shell=bash
# Shared helpers for the test-bed scripts. Source it; it does not set shell options itself.

# Print a message to stderr, prefixed with the calling script's name.
log() {
    printf '%s: %s\n' "${0##*/}" "$*" >&2
}

# Print an error to stderr and exit 1.
die() {
    printf '%s: error: %s\n' "${0##*/}" "$*" >&2
    exit 1
}

# The repository root (the directory holding this scripts/ folder).
repo_root() {
    local here
    here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
    printf '%s\n' "$here"
}

# The artefact cache, kept outside the work tree so it survives clean checkouts.
cache_dir() {
    local dir="${CHV_CACHE:-$HOME/.cache/chv}"
    mkdir -p "$dir"
    printf '%s\n' "$dir"
}

# Run a command as root (directly if we already are, through sudo otherwise).
as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "need root to run '$*' (install sudo or run as root)"
    fi
}

# Install the given Debian packages if any of them is missing.
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    command -v apt-get >/dev/null 2>&1 ||
        die "missing packages: ${missing[*]} (no apt-get here; install them by hand)"
    log "installing missing packages: ${missing[*]}"
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2; then
        # Package lists may be absent on a fresh machine: refresh once and retry.
        as_root apt-get update >&2 || die "apt-get update failed"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}" >&2 ||
            die "could not install: ${missing[*]}"
    fi
}

# Fail unless a command exists, naming the package that provides it.
need_cmd() {
    local cmd="$1" pkg="$2"
    command -v "$cmd" >/dev/null 2>&1 || die "'$cmd' not found: install the Debian package '$pkg'"
}

# sha256 of stdin, hex only.
sha256_stdin() {
    sha256sum | cut -c1-64
}

# Seconds since the epoch, with fractions, for timings.
now_s() {
    date +%s.%N
}

# Elapsed seconds since a now_s value, one decimal.
elapsed_since() {
    awk -v start="$1" -v end="$(date +%s.%N)" 'BEGIN { printf "%.1f", end - start }'
}

# Print a script's leading comment block (its usage text) without the "# " prefixes.
print_usage() {
    awk 'NR == 1 { next } /^# shellcheck/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1" >&2
}
