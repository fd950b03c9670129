//! The vhost-user message header, and message bodies read with vhost's
//! types.
//!
//! vhost 0.18 defines this header (`VhostUserMsgHeader`), but only for its
//! own `vhost_user` module: the type is `pub(super)`. [`Header`] is the same
//! 12 bytes (request, flags, size; native byte order, like every vhost-user
//! number), generic over the request type like vhost's: `Header<FrontendReq>`
//! on the frontend's socket, `Header<BackendReq>` on the backend request
//! channel. Its flags are vhost's [`VhostUserHeaderFlag`]. Bodies are vhost's
//! `ByteValued` message structs (`VhostUserU64`, `VhostUserVringState`, ...),
//! read with [`read_body`].

use std::marker::PhantomData;

use vhost::vhost_user::message::{BackendReq, FrontendReq, VhostUserHeaderFlag};
use vm_memory::ByteValued;

/// A vhost-user request type: vhost's [`FrontendReq`] or [`BackendReq`].
pub(crate) trait Request:
    Copy + std::fmt::Debug + Into<u32> + TryFrom<u32> + Send + Sync + 'static
{
}

impl Request for FrontendReq {}
impl Request for BackendReq {}

/// The protocol version, in the flag bits [`VhostUserHeaderFlag::VERSION`]
/// (vhost-user has only version 1; vhost names the mask, not the value).
pub(crate) const VERSION_1: u32 = 0x1;

/// Size of a [`Header`] on the wire.
pub(crate) const HEADER_LEN: usize = 12;

/// The header of a vhost-user message carrying requests of type `R`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header<R: Request> {
    request: u32,
    flags: u32,
    size: u32,
    _request: PhantomData<R>,
}

const _: () = assert!(std::mem::size_of::<Header<FrontendReq>>() == HEADER_LEN);
const _: () = assert!(std::mem::size_of::<Header<BackendReq>>() == HEADER_LEN);

// SAFETY: three u32s and a zero-sized marker: `repr(C)` lays them out with
// no padding (asserted above: 12 bytes), and every bit pattern is a valid
// value of each field (the request type is only a marker; an unknown code
// is read with `request()`, which returns `None`).
unsafe impl<R: Request> ByteValued for Header<R> {}

impl<R: Request> Header<R> {
    /// A request header (version 1) with `flags` (`NEED_REPLY` or none;
    /// other bits are dropped) for a body of `size` bytes.
    pub(crate) fn new(request: R, flags: VhostUserHeaderFlag, size: u32) -> Self {
        Header {
            request: request.into(),
            flags: VERSION_1 | (flags.bits() & VhostUserHeaderFlag::ALL_FLAGS.bits()),
            size,
            _request: PhantomData,
        }
    }

    /// The header in `bytes`, as sent (any code, any flags).
    pub(crate) fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Self {
        let mut h = Header {
            request: 0,
            flags: 0,
            size: 0,
            _request: PhantomData,
        };
        // Both are HEADER_LEN bytes (asserted above).
        h.as_mut_slice().copy_from_slice(bytes);
        h
    }

    /// The header of the reply to the request of `self`, for a body of
    /// `size` bytes. The request code is copied as it is, known or not.
    pub(crate) fn reply(&self, size: u32) -> Self {
        Header {
            request: self.request,
            flags: VERSION_1 | VhostUserHeaderFlag::REPLY.bits(),
            size,
            _request: PhantomData,
        }
    }

    /// The request, `None` if the code is not one vhost knows.
    pub(crate) fn code(&self) -> Option<R> {
        R::try_from(self.request).ok()
    }

    /// The request code as sent.
    pub(crate) fn raw_code(&self) -> u32 {
        self.request
    }

    /// The flag bits as sent (reserved bits kept).
    pub(crate) fn flags(&self) -> VhostUserHeaderFlag {
        VhostUserHeaderFlag::from_bits_retain(self.flags)
    }

    /// Whether the sender asks for a reply ([`VhostUserHeaderFlag::NEED_REPLY`]).
    pub(crate) fn needs_reply(&self) -> bool {
        self.flags().contains(VhostUserHeaderFlag::NEED_REPLY)
    }

    /// Whether this is a reply ([`VhostUserHeaderFlag::REPLY`]).
    pub(crate) fn is_reply(&self) -> bool {
        self.flags().contains(VhostUserHeaderFlag::REPLY)
    }

    /// The protocol version (the [`VhostUserHeaderFlag::VERSION`] bits).
    pub(crate) fn version(&self) -> u32 {
        self.flags & VhostUserHeaderFlag::VERSION.bits()
    }

    /// The size of the body that follows, in bytes.
    pub(crate) fn size(&self) -> u32 {
        self.size
    }
}

/// A message body of exactly the size of `T`, read as `T`; `None` for a
/// body of any other size.
///
/// Bodies are read by copy: a body is not aligned for vhost's `u64` message
/// types (it follows a 12-byte header), so `ByteValued::from_slice`, which
/// refuses unaligned bytes, does not apply.
pub(crate) fn read_body<T: ByteValued>(body: &[u8]) -> Option<T> {
    if body.len() != std::mem::size_of::<T>() {
        return None;
    }
    T::read_exact_from(body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vhost::vhost_user::message::{VhostUserU64, VhostUserVringState};

    #[test]
    fn header_layout_is_request_flags_size_and_unknown_codes_are_kept() {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..4].copy_from_slice(&11u32.to_ne_bytes());
        bytes[4..8].copy_from_slice(&(0x1u32 | 0x8).to_ne_bytes());
        bytes[8..12].copy_from_slice(&8u32.to_ne_bytes());
        let h = Header::<FrontendReq>::from_bytes(&bytes);
        assert_eq!(h.code(), Some(FrontendReq::GET_VRING_BASE));
        assert!(h.needs_reply());
        assert_eq!(h.size(), 8);
        let r = h.reply(8);
        assert_eq!(&r.as_slice()[0..4], &11u32.to_ne_bytes());
        assert_eq!(&r.as_slice()[4..8], &(0x1u32 | 0x4).to_ne_bytes());
        assert!(!r.needs_reply());

        bytes[0..4].copy_from_slice(&999u32.to_ne_bytes());
        bytes[4..8].copy_from_slice(&0x1_0001u32.to_ne_bytes());
        let h = Header::<FrontendReq>::from_bytes(&bytes);
        assert_eq!(h.code(), None);
        assert_eq!(h.flags().bits(), 0x1_0001);
        assert_eq!(&h.reply(0).as_slice()[0..4], &999u32.to_ne_bytes());
    }

    #[test]
    fn a_request_header_is_version_1_with_the_flags_asked() {
        let h = Header::new(
            BackendReq::CONFIG_CHANGE_MSG,
            VhostUserHeaderFlag::NEED_REPLY,
            0,
        );
        let mut want = Vec::new();
        for v in [2u32, 0x1 | 0x8, 0] {
            want.extend_from_slice(&v.to_ne_bytes());
        }
        assert_eq!(h.as_slice(), &want[..]);
        assert!(h.needs_reply() && !h.is_reply());
        assert_eq!((h.version(), h.raw_code()), (1, 2));
        let r = h.reply(8);
        assert!(r.is_reply() && !r.needs_reply());
        assert_eq!(r.code(), Some(BackendReq::CONFIG_CHANGE_MSG));
        // Only the flag bits a request may carry.
        let h = Header::new(
            BackendReq::CONFIG_CHANGE_MSG,
            VhostUserHeaderFlag::from_bits_retain(0xffff_fff0),
            0,
        );
        assert_eq!(h.flags().bits(), 0x1);
    }

    #[test]
    fn bodies_of_another_size_are_refused_and_unaligned_ones_read() {
        assert!(read_body::<VhostUserU64>(&[0u8; 7]).is_none());
        assert!(read_body::<VhostUserU64>(&[0u8; 9]).is_none());
        let mut buf = [0u8; 9];
        buf[1..].copy_from_slice(&7u64.to_ne_bytes());
        assert_eq!(read_body::<VhostUserU64>(&buf[1..]).unwrap().value, 7);
        let mut state = [0u8; 8];
        state[0..4].copy_from_slice(&3u32.to_ne_bytes());
        state[4..8].copy_from_slice(&256u32.to_ne_bytes());
        let s: VhostUserVringState = read_body(&state).unwrap();
        assert_eq!(({ s.index }, { s.num }), (3, 256));
    }
}
