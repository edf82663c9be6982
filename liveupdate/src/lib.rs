//! Live update: LUO sessions, the live-update state machine and the participant trait.
//!
//! A *session* is LUO's unit of handover: a name and a set of files, each under a 64-bit token.
//! The kernel provides sessions on `/dev/liveupdate` and carries them across a kexec; in restart
//! mode (only the VMM binary is replaced) a userspace holder provides the same semantics. Both
//! sit behind the traits in [`session`].

pub mod agent;
pub mod emulated;
pub mod fault;
pub mod inherited;
pub mod kernel;
pub mod machine;
pub mod participant;
pub mod session;
pub mod state;
pub mod sys;
