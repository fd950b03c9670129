//! The backend request channel: requests from the device to the frontend.
//!
//! With `SET_BACKEND_REQ_FD` the frontend hands the backend one end of a
//! socket on which the backend sends requests ([`BackendReq`]) and the
//! frontend answers them. This device sends one request,
//! `CONFIG_CHANGE_MSG`, after it changed its config space (a new
//! `free_page_hint_cmd_id`, a new balloon target), so that the frontend
//! tells the guest.
//!
//! # Why not vhost's `Backend`
//!
//! vhost 0.18 has a sender for this channel, `vhost::vhost_user::Backend`,
//! which vhost-user-backend 0.24 hands to
//! `VhostUserBackend::set_backend_req_fd`. It cannot send this request: it
//! implements `VhostUserFrontendReqHandler` only for the shared-object and
//! shmem requests, so its `handle_config_change` is the trait's default
//! (`ENOSYS`), and its socket and message writer are private. The proxy
//! therefore keeps a duplicate of the channel's socket
//! ([`BackendReqChannel`]), and this module writes the message itself, in
//! vhost's vocabulary: [`BackendReq`], [`VhostUserHeaderFlag`], and
//! [`VhostUserU64`] for the frontend's reply. Like vhost's `Backend`, it
//! asks for a reply (`NEED_REPLY`) only when the frontend negotiated
//! `VHOST_USER_PROTOCOL_F_REPLY_ACK`: without it the flag means nothing and
//! no reply would come.
//!
//! # Held changes
//!
//! QEMU 10.0's vhost-user device dereferences its (then NULL) virtio device
//! when a config change arrives while the device is stopped (VM paused,
//! between `GET_VRING_BASE` and the next start), so a change made then is
//! held and sent when the device starts again ([`Channel`]).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use vhost::vhost_user::message::{BackendReq, VhostUserHeaderFlag, VhostUserU64, MAX_MSG_SIZE};
use vm_memory::ByteValued;

use crate::message::{read_body, Header, HEADER_LEN};

/// How long a sender waits for the frontend's reply.
pub(crate) const REPLY_TIMEOUT: Duration = Duration::from_secs(1);

/// Why a request to the frontend failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendReqError {
    /// The frontend has not set up the channel (`SET_BACKEND_REQ_FD`).
    #[error("no backend request channel (SET_BACKEND_REQ_FD not received)")]
    NoChannel,
    /// The request could not be written.
    #[error("cannot send {request:?} to the frontend")]
    Send {
        /// The request.
        request: BackendReq,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// No reply came (in time), or it could not be read.
    #[error("no reply from the frontend to {request:?}")]
    NoReply {
        /// The request.
        request: BackendReq,
        /// The socket error (a timeout is `WouldBlock`/`TimedOut`).
        #[source]
        source: std::io::Error,
    },
    /// What came back is not the reply to the request.
    #[error(
        "the frontend's answer to {request:?} is not its reply \
         (request {reply_code}, flags {reply_flags:#x}, size {reply_size})"
    )]
    NotAReply {
        /// The request.
        request: BackendReq,
        /// The request code of the answer.
        reply_code: u32,
        /// The flags of the answer.
        reply_flags: u32,
        /// The body size of the answer.
        reply_size: u32,
    },
    /// The frontend replied with a failure.
    #[error("the frontend failed {request:?} (status {status})")]
    Failed {
        /// The request.
        request: BackendReq,
        /// The non-zero status it replied.
        status: u64,
    },
}

/// Whether a sender waits for the frontend to have handled its request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// Ask for a reply (`NEED_REPLY`) and wait up to [`REPLY_TIMEOUT`] for
    /// it, so that the frontend has handled the request before the caller
    /// goes on (before it stops the VM, say). Without `REPLY_ACK`
    /// negotiated there is no reply to wait for: the request is only sent.
    ForReply,
    /// Send and go on. The only choice on the proxy thread: the frontend
    /// may be waiting for it.
    No,
}

/// The backend's end of the backend request channel.
#[derive(Debug)]
pub(crate) struct BackendReqChannel {
    stream: UnixStream,
    /// `VHOST_USER_PROTOCOL_F_REPLY_ACK` is negotiated: the frontend
    /// answers requests sent with `NEED_REPLY`.
    reply_ack: bool,
}

impl BackendReqChannel {
    /// The channel on `stream` (a duplicate of the `SET_BACKEND_REQ_FD`
    /// descriptor), `reply_ack` if the frontend negotiated `REPLY_ACK`.
    pub(crate) fn new(stream: UnixStream, reply_ack: bool) -> Self {
        BackendReqChannel { stream, reply_ack }
    }

    /// Records whether `REPLY_ACK` is negotiated (as vhost's
    /// `Backend::set_reply_ack_flag`).
    pub(crate) fn set_reply_ack(&mut self, reply_ack: bool) {
        self.reply_ack = reply_ack;
    }

    /// Tells the frontend that the config space changed
    /// (`CONFIG_CHANGE_MSG`).
    pub(crate) fn config_changed(&self, wait: Wait) -> Result<(), BackendReqError> {
        self.send(BackendReq::CONFIG_CHANGE_MSG, wait)
    }

    /// Sends `request` (no body) and, with [`Wait::ForReply`], waits for
    /// its reply.
    fn send(&self, request: BackendReq, wait: Wait) -> Result<(), BackendReqError> {
        let need_reply = wait == Wait::ForReply && self.reply_ack;
        if wait == Wait::ForReply && !need_reply {
            tracing::debug!(
                ?request,
                "balloon: REPLY_ACK not negotiated; not waiting for the frontend"
            );
        }
        let flags = if need_reply {
            VhostUserHeaderFlag::NEED_REPLY
        } else {
            VhostUserHeaderFlag::empty()
        };
        let header = Header::new(request, flags, 0);
        (&self.stream)
            .write_all(header.as_slice())
            .map_err(|source| BackendReqError::Send { request, source })?;
        if need_reply {
            self.wait_for_reply(request)?;
        }
        Ok(())
    }

    /// Reads the reply to `request`: a reply header for it and a
    /// `VhostUserU64` status, 0 for success.
    fn wait_for_reply(&self, request: BackendReq) -> Result<(), BackendReqError> {
        let no_reply = |source| BackendReqError::NoReply { request, source };
        self.stream
            .set_read_timeout(Some(REPLY_TIMEOUT))
            .map_err(no_reply)?;
        let mut head = [0u8; HEADER_LEN];
        (&self.stream).read_exact(&mut head).map_err(no_reply)?;
        let reply = Header::<BackendReq>::from_bytes(&head);
        // Read the body the header announces (within vhost's message size
        // limit), whatever it is, so that the next reply starts in step.
        let size = reply.size() as usize;
        let mut body = Vec::new();
        if size <= MAX_MSG_SIZE {
            body.resize(size, 0);
            (&self.stream).read_exact(&mut body).map_err(no_reply)?;
        }
        let status = read_body::<VhostUserU64>(&body)
            .filter(|_| reply.code() == Some(request) && reply.is_reply() && reply.version() == 1)
            .ok_or(BackendReqError::NotAReply {
                request,
                reply_code: reply.raw_code(),
                reply_flags: reply.flags().bits(),
                reply_size: reply.size(),
            })?
            .value;
        if status != 0 {
            return Err(BackendReqError::Failed { request, status });
        }
        Ok(())
    }
}

/// What [`Channel::config_changed`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Notified {
    /// `CONFIG_CHANGE_MSG` went out (and, if asked, was acknowledged).
    Sent,
    /// The device is stopped: the change is held until it starts.
    Held,
}

/// The backend request channel and whether the frontend runs the device.
#[derive(Debug, Default)]
pub(crate) struct Channel {
    /// The channel (`SET_BACKEND_REQ_FD`), once the frontend set it up.
    pub(crate) backend_req: Option<BackendReqChannel>,
    /// Between the first `SET_VRING_KICK` and the next `GET_VRING_BASE`.
    pub(crate) device_started: bool,
    /// A config change was made while the device was stopped.
    pub(crate) change_pending: bool,
}

impl Channel {
    /// Sends `CONFIG_CHANGE_MSG` now, or holds it while the device is
    /// stopped (see the module docs). Never wait ([`Wait::ForReply`]) on
    /// the proxy thread: the frontend may be waiting for it.
    pub(crate) fn config_changed(&mut self, wait: Wait) -> Result<Notified, BackendReqError> {
        if !self.device_started {
            self.change_pending = true;
            return Ok(Notified::Held);
        }
        let channel = self
            .backend_req
            .as_ref()
            .ok_or(BackendReqError::NoChannel)?;
        // Once written, the change is no longer pending, even if its reply
        // fails: the frontend has the message.
        let result = channel.config_changed(wait);
        if !matches!(result, Err(BackendReqError::Send { .. })) {
            self.change_pending = false;
        }
        result.map(|()| Notified::Sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn started(stream: UnixStream) -> Channel {
        Channel {
            backend_req: Some(BackendReqChannel::new(stream, true)),
            device_started: true,
            change_pending: false,
        }
    }

    /// Reads one request from the frontend's end and answers it.
    fn answer(frontend: &mut UnixStream, reply: Option<(u32, u32, &[u8])>) -> [u8; HEADER_LEN] {
        let mut req = [0u8; HEADER_LEN];
        frontend.read_exact(&mut req).unwrap();
        if let Some((code, flags, body)) = reply {
            let mut r = Vec::new();
            for v in [code, flags, body.len() as u32] {
                r.extend_from_slice(&v.to_ne_bytes());
            }
            r.extend_from_slice(body);
            frontend.write_all(&r).unwrap();
        }
        req
    }

    #[test]
    fn a_config_change_is_sent_and_its_reply_awaited() {
        let (backend, mut frontend) = UnixStream::pair().unwrap();
        let mut ch = started(backend);
        let t = std::thread::spawn(move || {
            let req = answer(&mut frontend, Some((2, 0x5, &0u64.to_ne_bytes())));
            (req, frontend)
        });
        assert_eq!(ch.config_changed(Wait::ForReply).unwrap(), Notified::Sent);
        let (req, mut frontend) = t.join().unwrap();
        let header = Header::<BackendReq>::from_bytes(&req);
        assert_eq!(header.code(), Some(BackendReq::CONFIG_CHANGE_MSG));
        assert!(header.needs_reply());
        assert_eq!((header.version(), header.size()), (1, 0));

        // Without waiting: no NEED_REPLY, nothing read back.
        assert_eq!(ch.config_changed(Wait::No).unwrap(), Notified::Sent);
        let header = Header::<BackendReq>::from_bytes(&answer(&mut frontend, None));
        assert!(!header.needs_reply());

        // Without REPLY_ACK there is no reply to wait for.
        if let Some(c) = ch.backend_req.as_mut() {
            c.set_reply_ack(false);
        }
        assert_eq!(ch.config_changed(Wait::ForReply).unwrap(), Notified::Sent);
        let header = Header::<BackendReq>::from_bytes(&answer(&mut frontend, None));
        assert!(!header.needs_reply());
    }

    #[test]
    fn failures_and_wrong_replies_are_typed_errors() {
        let (backend, mut frontend) = UnixStream::pair().unwrap();
        let mut ch = started(backend);
        let t = std::thread::spawn(move || {
            answer(&mut frontend, Some((2, 0x5, &1u64.to_ne_bytes())));
            answer(&mut frontend, Some((3, 0x5, &0u64.to_ne_bytes())));
            answer(&mut frontend, Some((2, 0x1, &0u64.to_ne_bytes())));
            answer(&mut frontend, Some((2, 0x5, &[0u8; 4])));
            answer(&mut frontend, Some((2, 0x5, &0u64.to_ne_bytes())));
            frontend
        });
        let r = ch.config_changed(Wait::ForReply);
        assert!(
            matches!(r, Err(BackendReqError::Failed { status: 1, .. })),
            "{r:?}"
        );
        let r = ch.config_changed(Wait::ForReply);
        assert!(
            matches!(r, Err(BackendReqError::NotAReply { reply_code: 3, .. })),
            "{r:?}"
        );
        let r = ch.config_changed(Wait::ForReply);
        assert!(
            matches!(
                r,
                Err(BackendReqError::NotAReply {
                    reply_flags: 0x1,
                    ..
                })
            ),
            "{r:?}"
        );
        let r = ch.config_changed(Wait::ForReply);
        assert!(
            matches!(r, Err(BackendReqError::NotAReply { reply_size: 4, .. })),
            "{r:?}"
        );
        // Still in step after all that.
        ch.config_changed(Wait::ForReply).unwrap();
        let frontend = t.join().unwrap();
        drop(frontend);
        ch.change_pending = true;
        let r = ch.config_changed(Wait::ForReply);
        assert!(matches!(r, Err(BackendReqError::Send { .. })), "{r:?}");
        assert!(
            ch.change_pending,
            "a held change that was not written stays pending"
        );
    }

    #[test]
    fn changes_are_held_while_the_device_is_stopped_and_need_a_channel() {
        let mut ch = Channel::default();
        assert_eq!(ch.config_changed(Wait::ForReply).unwrap(), Notified::Held);
        assert!(ch.change_pending);
        ch.device_started = true;
        let r = ch.config_changed(Wait::No);
        assert!(matches!(r, Err(BackendReqError::NoChannel)), "{r:?}");
        assert!(ch.change_pending);
    }
}
