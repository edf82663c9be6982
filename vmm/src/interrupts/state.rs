//! The saved form of the routing table, and the GSI arithmetic on it.

use devices::interrupt::MsiMessage;
use serde::{Deserialize, Serialize};

use super::error::InterruptError;
use super::routing::{GSI_LIMIT, MSI_GSI_START};

/// The MSI vectors of one group: consecutive GSIs from `first_gsi`, one route per vector
/// (`None`: disconnected).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsiGroupState {
    /// GSI of vector 0.
    pub first_gsi: u32,
    /// The route of each vector.
    pub routes: Vec<Option<MsiMessage>>,
}

/// The interrupt routing state: every MSI group in the order it was handed out. Legacy lines
/// have fixed routes and need no state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterruptState {
    /// The MSI groups.
    pub msi_groups: Vec<MsiGroupState>,
}

impl liveupdate::state::Versioned for InterruptState {
    const VERSION: u16 = 1;
}

/// The first GSI after every existing group, if `count` more fit below KVM's limit.
pub(super) fn next_free_gsi(groups: &[MsiGroupState], count: usize) -> Result<u32, InterruptError> {
    let first = groups
        .iter()
        .map(group_end)
        .max()
        .unwrap_or(u64::from(MSI_GSI_START))
        .max(u64::from(MSI_GSI_START));
    let end = first + u64::try_from(count).unwrap_or(u64::MAX);
    if end > u64::from(GSI_LIMIT) {
        return Err(InterruptError::OutOfGsis { count });
    }
    u32::try_from(first).map_err(|_| InterruptError::OutOfGsis { count })
}

fn group_end(group: &MsiGroupState) -> u64 {
    u64::from(group.first_gsi) + u64::try_from(group.routes.len()).unwrap_or(u64::MAX)
}

/// Groups must lie in the MSI GSI range, below KVM's limit, without overlapping.
pub(super) fn validate(state: &InterruptState) -> Result<(), InterruptError> {
    let mut ranges: Vec<(u64, u64)> = state
        .msi_groups
        .iter()
        .map(|g| (u64::from(g.first_gsi), group_end(g)))
        .collect();
    ranges.sort_unstable();
    for (start, end) in &ranges {
        if *start < u64::from(MSI_GSI_START) || *end > u64::from(GSI_LIMIT) {
            return Err(InterruptError::InvalidState {
                reason: "MSI group outside the MSI GSI range",
            });
        }
    }
    if ranges.windows(2).any(|w| w[0].1 > w[1].0) {
        return Err(InterruptError::InvalidState {
            reason: "MSI groups overlap",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(first_gsi: u32, count: usize) -> MsiGroupState {
        MsiGroupState {
            first_gsi,
            routes: vec![None; count],
        }
    }

    #[test]
    fn first_group_starts_at_msi_gsi_start() {
        assert_eq!(next_free_gsi(&[], 4).unwrap(), MSI_GSI_START);
    }

    #[test]
    fn next_group_starts_after_the_highest_one() {
        let groups = [group(40, 2), group(24, 3)];

        assert_eq!(next_free_gsi(&groups, 1).unwrap(), 42);
    }

    #[test]
    fn group_past_kvm_limit_is_refused() {
        let groups = [group(GSI_LIMIT - 5, 4)];

        let result = next_free_gsi(&groups, 2);

        assert!(matches!(
            result,
            Err(InterruptError::OutOfGsis { count: 2 })
        ));
    }
}
