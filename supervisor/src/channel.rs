//! The supervisor's end of one worker's control socket: non-blocking reads
//! split into lines ([`LineBuf`]) and parsed as
//! [`tether_protocol::control::WorkerMessage`]s, and best-effort writes of
//! `status` lines.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;

use tether_protocol::control::{ClusterStatus, SupervisorMessage, WorkerMessage};

/// A worker line longer than this is garbage: the buffer is dropped.
const MAX_LINE: usize = 4096;

/// Bytes received but not yet split into complete lines.
#[derive(Debug, Default)]
pub struct LineBuf {
    pending: Vec<u8>,
}

impl LineBuf {
    /// Appends `bytes` and returns every complete line (without its
    /// newline). An over-long partial line is discarded.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(nl) = self.pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.pending.drain(..=nl).collect();
            lines.push(String::from_utf8_lossy(&line[..nl]).into_owned());
        }
        if self.pending.len() > MAX_LINE {
            self.pending.clear();
        }
        lines
    }
}

/// What one read from a control socket produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Received {
    pub messages: Vec<WorkerMessage>,
    /// Lines that were not a known message (logged, otherwise ignored).
    pub unknown: Vec<String>,
    /// The worker closed its end (it is exiting).
    pub eof: bool,
}

/// The supervisor's end of a worker's control socketpair.
#[derive(Debug)]
pub struct Channel {
    stream: UnixStream,
    buf: LineBuf,
}

impl Channel {
    /// Wraps the supervisor's end, making it non-blocking.
    pub fn new(stream: UnixStream) -> io::Result<Channel> {
        stream.set_nonblocking(true)?;
        Ok(Channel {
            stream,
            buf: LineBuf::default(),
        })
    }

    /// Reads everything available now.
    pub fn receive(&mut self) -> Received {
        let mut out = Received::default();
        let mut chunk = [0u8; 1024];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    out.eof = true;
                    break;
                }
                Ok(n) => {
                    for line in self.buf.push(&chunk[..n]) {
                        match WorkerMessage::parse(&line) {
                            Some(m) => out.messages.push(m),
                            None if line.trim().is_empty() => {}
                            None => out.unknown.push(line),
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ECONNRESET and the like: the worker is gone.
                Err(_) => {
                    out.eof = true;
                    break;
                }
            }
        }
        out
    }

    /// Sends a `status` line. Best effort: a worker that does not read its
    /// socket (full buffer) or has gone misses it, and the next change
    /// sends a fresh one.
    pub fn send_status(&mut self, status: ClusterStatus) -> io::Result<()> {
        self.send(SupervisorMessage::Status(status))
    }

    /// Writes one line to the worker.
    pub fn send(&mut self, message: SupervisorMessage) -> io::Result<()> {
        self.stream.write_all(message.encode().as_bytes())
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_across_reads() {
        let mut b = LineBuf::default();
        assert!(b.push(b"rea").is_empty());
        assert_eq!(b.push(b"dy\nhb\nh"), vec!["ready", "hb"]);
        assert_eq!(b.push(b"b\n"), vec!["hb"]);
        assert!(b.push(&[b'x'; MAX_LINE + 1]).is_empty());
        // The garbage was dropped, so the next line parses cleanly.
        assert_eq!(b.push(b"draining\n"), vec!["draining"]);
    }

    #[test]
    fn a_channel_parses_messages_and_sees_eof() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut ch = Channel::new(ours).unwrap();
        assert_eq!(ch.receive(), Received::default());
        theirs.write_all(b"ready\nhb\nwhat\nhb").unwrap();
        let r = ch.receive();
        assert_eq!(
            r.messages,
            vec![WorkerMessage::Ready, WorkerMessage::Heartbeat]
        );
        assert_eq!(r.unknown, vec!["what"]);
        assert!(!r.eof);
        ch.send_status(ClusterStatus {
            configured: 2,
            alive: 1,
            restarts: 5,
        })
        .unwrap();
        let mut got = [0u8; 32];
        let n = theirs.read(&mut got).unwrap();
        assert_eq!(&got[..n], b"status 2 1 5\n");
        theirs.write_all(b"\ndraining\n").unwrap();
        drop(theirs);
        let r = ch.receive();
        assert_eq!(
            r.messages,
            vec![WorkerMessage::Heartbeat, WorkerMessage::Draining]
        );
        assert!(r.eof);
    }
}
