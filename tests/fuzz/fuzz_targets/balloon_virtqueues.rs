//! A guest's virtqueues as the balloon device meets them on a kick: every
//! descriptor, avail entry and buffer byte chosen by the fuzzer, on any of
//! the five queues (inflate, deflate, stats, free-page hint, reporting).
//! The device must never panic, and never hand on a range outside guest
//! RAM (`freehint_balloon::fuzzing`).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    freehint_balloon::fuzzing::virtqueues(data);
});
