//! Restart-only attachments: fds of any kind (sockets, eventfds) a VMM leaves with the agent
//! beside its session, for its successor. They never reach a kernel; dropping them closes the
//! agent's copies.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;

use super::protocol::{ErrorKind, MAX_ATTACHMENTS, WireError};
use crate::session::Token;

/// The fds attached to one session, by token.
#[derive(Debug, Default)]
pub(super) struct Attachments {
    fds: BTreeMap<Token, OwnedFd>,
}

impl Attachments {
    /// Keeps `fd` under `token`: a token is used once, and a session holds at most
    /// [`MAX_ATTACHMENTS`].
    pub(super) fn attach(&mut self, token: Token, fd: OwnedFd) -> Result<(), WireError> {
        if self.fds.contains_key(&token) {
            return Err(WireError::new(
                ErrorKind::TokenExists,
                format!("Attachment token {token:#x} is used already in this session"),
            ));
        }
        if self.fds.len() >= MAX_ATTACHMENTS {
            return Err(WireError::new(
                ErrorKind::Busy,
                format!("The session holds the most attachments allowed ({MAX_ATTACHMENTS})"),
            ));
        }
        self.fds.insert(token, fd);
        Ok(())
    }

    /// A new descriptor of the file attached under `token`; the agent keeps its own.
    pub(super) fn copy(&self, token: Token) -> Result<OwnedFd, WireError> {
        let fd = self.fds.get(&token).ok_or_else(|| {
            WireError::new(
                ErrorKind::NoSuchToken,
                format!("No fd attached under token {token:#x}"),
            )
        })?;
        fd.try_clone().map_err(|e| {
            WireError::new(
                ErrorKind::Os,
                format!("Cannot duplicate the attachment of token {token:#x}: {e}"),
            )
        })
    }

    /// New descriptors of every attachment, by token (for the fd store and an upgrade).
    pub(super) fn export(&self) -> std::io::Result<Vec<(Token, OwnedFd)>> {
        self.fds
            .iter()
            .map(|(token, fd)| Ok((*token, fd.try_clone()?)))
            .collect()
    }

    /// Attachments taken back from an earlier agent.
    pub(super) fn from_fds(fds: BTreeMap<Token, OwnedFd>) -> Self {
        Self { fds }
    }

    /// The tokens in use, in order.
    pub(super) fn tokens(&self) -> Vec<Token> {
        self.fds.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    use super::*;
    use crate::agent::protocol::{Request, Response};
    use crate::agent::state::tests::{
        FakeKexec, OTHER, OWNER, create, error_kind, handover, kernel_state, name, ok,
        restart_state, retrieve,
    };

    fn socket() -> OwnedFd {
        OwnedFd::from(UnixStream::pair().unwrap().0)
    }

    #[test]
    fn copy_is_a_new_descriptor_of_the_same_socket() {
        let (mine, theirs) = UnixStream::pair().unwrap();
        let mut attachments = Attachments::default();
        attachments.attach(5, OwnedFd::from(theirs)).unwrap();

        let copy = UnixStream::from(attachments.copy(5).unwrap());
        std::io::Write::write_all(&mut &copy, b"x").unwrap();
        let mut byte = [0u8];
        std::io::Read::read_exact(&mut &mine, &mut byte).unwrap();

        assert_eq!(&byte, b"x");
        assert_ne!(copy.as_raw_fd(), attachments.fds[&5].as_raw_fd());
        assert_eq!(attachments.tokens(), [5]);
    }

    #[test]
    fn a_token_is_used_once() {
        let mut attachments = Attachments::default();
        attachments.attach(1, socket()).unwrap();

        let again = attachments.attach(1, socket()).unwrap_err();

        assert_eq!(again.kind, ErrorKind::TokenExists);
    }

    #[test]
    fn unknown_token_is_no_such_token() {
        let attachments = Attachments::default();

        let error = attachments.copy(9).unwrap_err();

        assert_eq!(error.kind, ErrorKind::NoSuchToken);
    }

    #[test]
    fn attachments_beyond_the_limit_are_refused() {
        let mut attachments = Attachments::default();
        for token in 0..MAX_ATTACHMENTS as Token {
            attachments.attach(token, socket()).unwrap();
        }

        let error = attachments
            .attach(MAX_ATTACHMENTS as Token, socket())
            .unwrap_err();

        assert_eq!(error.kind, ErrorKind::Busy);
        assert_eq!(attachments.tokens().len(), MAX_ATTACHMENTS);
    }

    // Attachments through the agent's request handling.

    fn attach(name: &str, token: Token) -> Request {
        Request::Attach {
            name: name.to_string(),
            token,
        }
    }

    fn retrieve_attachment(name: &str, token: Token) -> Request {
        Request::RetrieveAttachment {
            name: name.to_string(),
            token,
        }
    }

    /// One end of a socket pair: the other end is returned too, to see it stay open.
    fn socket_pair() -> (OwnedFd, std::os::unix::net::UnixStream) {
        let (theirs, mine) = std::os::unix::net::UnixStream::pair().unwrap();
        (OwnedFd::from(theirs), mine)
    }

    /// Whether the other end of `stream` is closed, waiting up to a second: a process another
    /// test forks at that moment holds a copy of every fd until it runs its program.
    fn peer_closed(stream: &std::os::unix::net::UnixStream) -> bool {
        stream.set_nonblocking(true).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        let mut byte = [0u8];
        loop {
            match std::io::Read::read(&mut &*stream, &mut byte) {
                Ok(0) => return true,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                _ => return false,
            }
        }
    }

    #[test]
    fn attachment_moves_with_the_session_to_the_successor() {
        let (mut state, _) = restart_state();
        let (fd, peer) = socket_pair();
        ok(&mut state, create("vm"), OWNER, None);
        ok(&mut state, attach("vm", 3), OWNER, Some(fd));
        ok(&mut state, handover("vm"), OWNER, None);
        let handed_over = state.list()[0].attachments.clone();
        ok(&mut state, retrieve("vm"), OWNER, None);

        let (response, first) = state.handle(retrieve_attachment("vm", 3), OWNER, None);
        let (_, second) = state.handle(retrieve_attachment("vm", 3), OWNER, None);
        let other = error_kind(&mut state, retrieve_attachment("vm", 3), OTHER, None);
        let missing = error_kind(&mut state, retrieve_attachment("vm", 4), OWNER, None);

        assert_eq!(handed_over, [3]);
        assert_eq!(response, Response::Ok);
        assert!(first.is_some() && second.is_some());
        assert_eq!(state.list()[0].attachments, [3]);
        assert_eq!(other, ErrorKind::PermissionDenied);
        assert_eq!(missing, ErrorKind::NoSuchToken);
        drop((first, second));
        assert!(!peer_closed(&peer), "the agent closed its copy too early");
    }

    #[test]
    fn finish_closes_the_attachments() {
        let (mut state, _) = restart_state();
        let (fd, peer) = socket_pair();
        ok(&mut state, create("vm"), OWNER, None);
        ok(&mut state, attach("vm", 1), OWNER, Some(fd));
        ok(&mut state, handover("vm"), OWNER, None);
        ok(&mut state, retrieve("vm"), OWNER, None);

        ok(
            &mut state,
            Request::Finish { name: name("vm") },
            OWNER,
            None,
        );

        assert!(peer_closed(&peer));
    }

    #[test]
    fn cancel_closes_the_attachments() {
        let (mut state, _) = restart_state();
        let (fd, peer) = socket_pair();
        ok(&mut state, create("vm"), OWNER, None);
        ok(&mut state, attach("vm", 1), OWNER, Some(fd));

        ok(
            &mut state,
            Request::Cancel { name: name("vm") },
            OWNER,
            None,
        );

        assert!(peer_closed(&peer));
    }

    #[test]
    fn attach_is_for_the_owner_of_an_outgoing_session_and_needs_an_fd() {
        let (mut state, _) = restart_state();
        ok(&mut state, create("vm"), OWNER, None);

        let other = error_kind(&mut state, attach("vm", 1), OTHER, Some(socket_pair().0));
        let no_session = error_kind(&mut state, attach("nope", 1), OWNER, Some(socket_pair().0));
        let no_fd = error_kind(&mut state, attach("vm", 1), OWNER, None);
        ok(&mut state, attach("vm", 1), OWNER, Some(socket_pair().0));
        let twice = error_kind(&mut state, attach("vm", 1), OWNER, Some(socket_pair().0));

        assert_eq!(other, ErrorKind::PermissionDenied);
        assert_eq!(no_session, ErrorKind::NoSuchSession);
        assert_eq!(no_fd, ErrorKind::BadRequest);
        assert_eq!(twice, ErrorKind::TokenExists);
    }

    #[test]
    fn attach_in_kernel_mode_is_refused_as_restart_only() {
        let fake = FakeKexec::default();
        let mut state = kernel_state(&fake);
        ok(&mut state, create("vm"), OWNER, None);

        let (response, _) = state.handle(attach("vm", 1), OWNER, Some(socket_pair().0));

        let Response::Error(error) = response else {
            panic!("attach succeeded in kernel mode: {response:?}");
        };
        assert_eq!(error.kind, ErrorKind::NotSupported);
        assert!(
            error.message.contains("only in restart mode"),
            "{}",
            error.message
        );
        assert!(state.list()[0].attachments.is_empty());
    }
}
