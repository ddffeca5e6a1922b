//! The attribution channel: a Unix datagram socket the bundled Python plugins write JSON
//! messages to. SO_PASSCRED makes the kernel attach each sender's real pid, so a message's
//! claim "I am the worker for host X, task Y" is tied to a process the probes saw.
use std::{
    io::IoSliceMut,
    os::fd::{AsFd as _, AsRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result};
use nix::sys::socket::{
    AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, bind, recvmsg, setsockopt,
    socket, sockopt,
};

use super::messages::{self, Received};

/// Largest datagram read (the plugins clip their messages to 60 KiB); a longer one is cut short
/// by the kernel and fails to decode.
const MAX_DATAGRAM: usize = 64 * 1024;
/// Socket receive buffer: bursts of worker/item messages must not be dropped while we are busy.
const RCVBUF: usize = 16 * 1024 * 1024;

/// A bound, non-blocking receiving socket.
pub struct Channel {
    fd: OwnedFd,
    buf: Vec<u8>,
    /// Datagrams that were not messages of the protocol (see [`messages::decode`]).
    pub malformed: u64,
}

impl AsRawFd for Channel {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl Channel {
    /// Binds `path`, which must lie in a private directory (the session's 0700 one, made as
    /// the traced user, who must be able to send to it).
    pub fn bind(path: &Path) -> Result<Self> {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Datagram,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )
        .context("creating the attribution socket")?;
        setsockopt(&fd, sockopt::PassCred, &true).context("SO_PASSCRED")?;
        if setsockopt(&fd, sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = setsockopt(&fd, sockopt::RcvBuf, &RCVBUF);
        }
        bind(fd.as_raw_fd(), &UnixAddr::new(path)?).with_context(|| format!("binding {}", path.display()))?;
        Ok(Self { fd, buf: vec![0; MAX_DATAGRAM], malformed: 0 })
    }

    /// Receives every datagram waiting now.
    pub fn drain(&mut self, out: &mut Vec<Received>) -> Result<()> {
        loop {
            let mut cmsg = nix::cmsg_space!(libc::ucred);
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            let (len, pid) = match recvmsg::<()>(
                self.fd.as_fd().as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(msg) => {
                    let pid = msg.cmsgs().ok().and_then(|mut c| {
                        c.find_map(|m| match m {
                            ControlMessageOwned::ScmCredentials(cred) => Some(cred.pid() as u32),
                            _ => None,
                        })
                    });
                    (msg.bytes, pid)
                }
                Err(nix::errno::Errno::EAGAIN) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e).context("receiving from the attribution socket"),
            };
            // A sender's own `type` or `sender_pid` field is not part of a message: ignored.
            match messages::decode(&self.buf[..len]) {
                Ok(message) => out.push(Received { sender_pid: pid.unwrap_or(0), message }),
                Err(e) => {
                    self.malformed += 1;
                    log::debug!(
                        "malformed attribution datagram: {}",
                        crate::report::labels::printable(&e.to_string())
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receives_json_with_the_kernel_vouched_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let mut ch = Channel::bind(&path).unwrap();
        let tx = std::os::unix::net::UnixDatagram::unbound().unwrap();
        tx.send_to(br#"{"v":1,"ev":"playbook_end","ts":5,"pid":1,"type":"spoof","sender_pid":1}"#, &path)
            .unwrap();
        tx.send_to(b"not json", &path).unwrap();
        tx.send_to(br#"{"v":1,"ev":"task_start","ts":5,"pid":1}"#, &path).unwrap();
        let mut out = Vec::new();
        ch.drain(&mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].sender_pid, std::process::id());
        assert_eq!(out[0].message.event, messages::PluginEvent::PlaybookEnd {});
        let line = serde_json::to_value(&out[0]).unwrap();
        assert!(line.get("type").is_none() && line["sender_pid"] == std::process::id());
        assert_eq!(ch.malformed, 2);
    }
}
