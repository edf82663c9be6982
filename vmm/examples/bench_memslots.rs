//! Times KVM's registration of guest RAM (`GuestRam::register`, the `memslots` step of a VM's
//! build and of a restore) on a fresh VM per run, three runs per size:
//!
//!     bench_memslots [MIB...]        (default: 64 1024 4096 16384)
//!
//! Prints one line per run (`memslots size_mib=N run=R ms=T`) and says which MMU KVM runs. The
//! RAM is a memfd never touched, so any size fits. With the shadow MMU KVM allocates a reverse
//! map for every 4 KiB page of a slot as it is registered, and the time grows with RAM; with the
//! TDP MMU (EPT/NPT) it allocates none until a nested guest needs them. `scripts/bench-memslots`
//! runs this on the host and in the QEMU test bed.

use std::process::ExitCode;
use std::time::Instant;

use kvm_ioctls::Kvm;
use vmm::memory::GuestRam;

const RUNS: usize = 3;

fn main() -> ExitCode {
    let sizes: Result<Vec<u64>, _> = std::env::args().skip(1).map(|a| a.parse::<u64>()).collect();
    let sizes = match sizes {
        Ok(sizes) if sizes.is_empty() => vec![64, 1024, 4096, 16384],
        Ok(sizes) => sizes,
        Err(e) => {
            eprintln!("bench_memslots: sizes are MiB as whole numbers: {e}");
            return ExitCode::from(2);
        }
    };
    let tdp_mmu = std::fs::read_to_string("/sys/module/kvm/parameters/tdp_mmu")
        .map_or_else(|_| "unknown".to_string(), |s| s.trim().to_string());
    println!("memslots kvm tdp_mmu={tdp_mmu}");
    let kvm = match Kvm::new() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("bench_memslots: /dev/kvm: {e}");
            return ExitCode::FAILURE;
        }
    };
    for mib in sizes {
        for run in 0..RUNS {
            match time_registration(&kvm, mib << 20) {
                Ok(ms) => println!("memslots size_mib={mib} run={run} ms={ms:.3}"),
                Err(e) => {
                    eprintln!("bench_memslots: {mib} MiB: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}

/// Milliseconds to register `size` bytes of fresh guest RAM with a fresh KVM VM.
fn time_registration(kvm: &Kvm, size: u64) -> Result<f64, String> {
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let ram = GuestRam::new(size).map_err(|e| e.to_string())?;
    let start = Instant::now();
    ram.register(&vm).map_err(|e| e.to_string())?;
    Ok(start.elapsed().as_secs_f64() * 1e3)
}
