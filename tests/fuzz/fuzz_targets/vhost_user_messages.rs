//! A vhost-user frontend's messages as the balloon's proxy reads them from
//! QEMU's socket: framing (header, size bound), each request's body read
//! with vhost's own types, and the checks against the session (features
//! offered, ring indices, queue sizes, order). It must never panic
//! (`freehint_balloon::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    freehint_balloon::fuzzing::vhost_user_messages(data);
});
