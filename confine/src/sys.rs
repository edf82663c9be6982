//! The libc calls of this crate: glibc's `mallopt`, to keep malloc from opening files.
#![allow(unsafe_code)]

/// Sets one of glibc's malloc parameters; false if glibc refused it.
fn mallopt(parameter: libc::c_int, value: libc::c_int) -> bool {
    // SAFETY: mallopt takes two integers and touches only malloc's own parameters, under
    // malloc's own lock.
    unsafe { libc::mallopt(parameter, value) == 1 }
}

/// Sets glibc's limit on malloc arenas (`M_ARENA_MAX`).
///
/// Without it, glibc works its default limit out the first time a process needs more than 8
/// arenas, by reading `/sys/devices/system/cpu/online`: an `openat` from whichever thread
/// happens to allocate then.
pub fn set_malloc_arena_max(arenas: libc::c_int) -> bool {
    mallopt(libc::M_ARENA_MAX, arenas)
}

/// Sets glibc's malloc trim threshold (`M_TRIM_THRESHOLD`).
///
/// The first time glibc gives memory at the top of a thread's arena back to the kernel, it
/// reads `/proc/sys/vm/overcommit_memory`: an `openat` from a filtered thread. A thread arena's
/// heap is at most 64 MiB, so with this threshold that never happens (the memory is kept for
/// reuse; a heap that empties entirely is still unmapped).
pub fn set_malloc_trim_threshold(bytes: libc::c_int) -> bool {
    mallopt(libc::M_TRIM_THRESHOLD, bytes)
}
