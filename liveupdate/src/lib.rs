//! Live update: LUO sessions, the live-update state machine and the participant trait.
//!
//! This crate is filled in by the restart-mode live-update work; for now it only reserves its
//! place in the workspace layout described in `DESIGN.md`.
