//! Which release's state format a live update writes. By default this build's; on request
//! (`vm.live-update {"state_format": "0.1.0"}`) the format an earlier release reads, so a VM
//! updated into this build can go back to that release's VMM (docs/state-versions.md).
//!
//! Writing an older format means writing each state type at the version that release reads.
//! A type is only written older when that loses nothing: `pci/root` at version 1 has no
//! placement, so it is written only when every device sits where that release's build order
//! puts it (checked before the VM pauses, [`Placement::check_build_order`]).

use liveupdate::state::Versioned;
use thiserror::Error;

use crate::device_manager::{PciRootState, PciRootStateV1};

/// The versions a release reads, for each type this build writes newer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateFormat {
    /// The release (crate version).
    pub release: &'static str,
    /// The version of `pci/root` (`PciRootState`) it reads.
    pub pci_root: u16,
}

/// The earlier releases whose format this build can write, oldest first. A type whose version
/// is bumped gets a field here, with the version each release reads, and a way to write it.
const EARLIER: &[StateFormat] = &[StateFormat {
    release: "0.1.0",
    pci_root: PciRootStateV1::VERSION,
}];

/// A `state_format` this build cannot write.
#[derive(Debug, Error, PartialEq, Eq)]
#[error(
    "state_format {asked:?} is not a release whose state this build can write (it writes: {known})"
)]
pub struct UnknownFormat {
    /// What was asked for.
    pub asked: String,
    /// The releases it can write, comma-separated.
    pub known: String,
}

impl StateFormat {
    /// This build's own format.
    pub fn current() -> Self {
        Self {
            release: env!("CARGO_PKG_VERSION"),
            pci_root: PciRootState::VERSION,
        }
    }

    /// The format `release` reads: this build's own, or an earlier release's.
    pub fn of_release(release: &str) -> Result<Self, UnknownFormat> {
        let current = Self::current();
        std::iter::once(current)
            .chain(EARLIER.iter().copied())
            .find(|format| format.release == release)
            .ok_or_else(|| UnknownFormat {
                asked: release.to_string(),
                known: EARLIER
                    .iter()
                    .chain(std::iter::once(&current))
                    .map(|format| format.release)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// `release` if given, else this build's format.
    pub fn requested(release: Option<&str>) -> Result<Self, UnknownFormat> {
        release.map_or_else(|| Ok(Self::current()), Self::of_release)
    }

    /// Whether the PCI root's state is written without placement (version 1).
    pub fn without_placement(&self) -> bool {
        self.pci_root < PciRootState::VERSION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_build_writes_its_own_format_by_default() {
        let format = StateFormat::requested(None).unwrap();

        assert_eq!(format, StateFormat::current());
        assert_eq!(format.release, env!("CARGO_PKG_VERSION"));
        assert!(!format.without_placement());
    }

    #[test]
    fn release_0_1_0_reads_the_pci_root_without_placement() {
        let format = StateFormat::of_release("0.1.0").unwrap();

        assert_eq!(format.pci_root, 1);
        assert!(format.without_placement());
    }

    #[test]
    fn an_unknown_release_is_refused_with_the_ones_it_can_write() {
        let error = StateFormat::of_release("0.0.9").unwrap_err();

        assert_eq!(error.asked, "0.0.9");
        assert_eq!(
            error.to_string(),
            format!(
                "state_format \"0.0.9\" is not a release whose state this build can write (it \
                 writes: 0.1.0, {})",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    /// Every earlier release listed in `RELEASES` (the cross-build test goes back to the last
    /// one) can be written: a release added there without a format here fails.
    #[test]
    fn every_listed_release_has_a_format_this_build_writes() {
        let releases = include_str!("../../RELEASES");

        let listed: Vec<&str> = releases
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| line.split_whitespace().next())
            .collect();

        assert!(!listed.is_empty(), "RELEASES lists no release");
        for release in listed {
            assert!(
                StateFormat::of_release(release).is_ok(),
                "release {release} of RELEASES has no state format in vmm/src/state_format.rs"
            );
        }
    }
}
