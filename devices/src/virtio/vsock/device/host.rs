//! The device's host side: new connections on its socket, their `CONNECT <port>` lines, and
//! readiness of the connected sockets.

use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};

use super::{
    CONNECT_LINE_TIMEOUT, Connection, MAX_CONNECT_LINE, MAX_PENDING_CONNECTS, Op, PendingConnect,
    Phase, TOKEN_KICK, TOKEN_LISTENER, TOKEN_TIMER, Vsock,
};

impl Vsock {
    /// Takes new host connections, `CONNECT` lines, and socket readiness.
    pub(super) fn poll_host(&mut self) {
        let _ = self.kick.read();
        let mut events = vec![EpollEvent::default(); 64];
        let count = match self.epoll.wait(0, &mut events) {
            Ok(count) => count,
            Err(e) => {
                log::warn!("vsock: epoll failed: {e}");
                return;
            }
        };
        for event in &events[..count] {
            match event.data() {
                TOKEN_LISTENER => self.accept_all(),
                TOKEN_KICK => {}
                TOKEN_TIMER => {
                    // Readable means it expired: take the expiry count so it stops being so.
                    let _ = self.timer.wait();
                }
                token if self.pending.contains_key(&token) => self.read_connect_line(token),
                token => {
                    let Some(&key) = self.tokens.get(&token) else {
                        continue;
                    };
                    let set = event.event_set();
                    if set.contains(EventSet::OUT) {
                        self.flush(key);
                    }
                    if set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                        self.readable.insert(key);
                    }
                }
            }
        }
        self.expire_pending();
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if let Err(e) = stream.set_nonblocking(true) {
                        log::warn!("vsock: host connection refused: {e}");
                        continue;
                    }
                    if self.pending.len() >= MAX_PENDING_CONNECTS
                        && let Some(oldest) = self.pending.keys().next().copied()
                    {
                        self.close_pending(oldest);
                    }
                    match self.watch(stream.as_raw_fd(), EventSet::IN) {
                        Ok(token) => {
                            self.pending.insert(
                                token,
                                PendingConnect {
                                    stream,
                                    line: Vec::new(),
                                    since: Instant::now(),
                                },
                            );
                        }
                        Err(e) => log::warn!("vsock: cannot watch a host connection: {e}"),
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("vsock: accept failed: {e}");
                    return;
                }
            }
        }
    }

    fn close_pending(&mut self, token: u64) {
        if let Some(pending) = self.pending.remove(&token) {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                pending.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            self.counters.refused_connects += 1;
        }
    }

    /// Drops host connections whose line is overdue, and keeps the timer ticking while any
    /// wait.
    fn expire_pending(&mut self) {
        let stale: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.since.elapsed() > CONNECT_LINE_TIMEOUT)
            .map(|(token, _)| *token)
            .collect();
        for token in stale {
            self.close_pending(token);
        }
        let tick = (!self.pending.is_empty()).then_some(Duration::from_secs(1));
        let armed = match tick {
            Some(period) => self.timer.reset(period, Some(period)),
            None => self.timer.clear(),
        };
        if let Err(e) = armed {
            log::warn!("vsock: cannot set the connect-line timer: {e}");
        }
    }

    /// Reads a host process's `CONNECT <port>\n` one byte at a time (what follows the line is
    /// stream data, not ours to take), then asks the guest.
    fn read_connect_line(&mut self, token: u64) {
        let Some(pending) = self.pending.get_mut(&token) else {
            return;
        };
        let mut byte = [0u8; 1];
        let done = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(()),
                Ok(_) if pending.line.len() >= MAX_CONNECT_LINE => break Err(()),
                Ok(_) => pending.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let port = done.ok().and_then(|()| parse_connect_line(&pending.line));
        let Some(port) = port else {
            self.close_pending(token);
            return;
        };
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            pending.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let local = self.free_local_port();
        let state = Connection::fresh_state(local, port, Phase::Connecting);
        match Connection::new(pending.stream, state) {
            Ok(mut conn) => {
                let request = conn.header(self.params.cid, Op::Request, 0, 0);
                if let Err(e) = self.add_connection(conn) {
                    log::warn!("vsock: cannot watch a host connection: {e}");
                    return;
                }
                self.queue_control(request);
            }
            Err(e) => log::warn!("vsock: host connection refused: {e}"),
        }
    }
}

/// The port of a `CONNECT <port>` line (without its newline), if it is one.
pub(super) fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.strip_prefix("CONNECT ")?.trim_end_matches('\r');
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_line_parser_takes_only_connect_and_a_port() {
        assert_eq!(parse_connect_line(b"CONNECT 1234"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT 1234\r"), Some(1234));
        assert_eq!(parse_connect_line(b"CONNECT -1"), None);
        assert_eq!(parse_connect_line(b"CONNECT "), None);
        assert_eq!(parse_connect_line(b"connect 1"), None);
        assert_eq!(parse_connect_line(b"CONNECT 4294967296"), None);
    }
}
