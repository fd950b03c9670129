//! What a guest agent (hostile or broken) writes on its virtio-serial
//! port, in arbitrary pieces, decoded as the host does: take every whole
//! message, and after an error resynchronise and go on. It must never
//! panic, never hold more than the bytes it was given, and a message that
//! decodes must survive a round trip.
#![no_main]

use freehint_agent_protocol::Decoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The first byte sets the size of the pieces the stream arrives in.
    let Some((&piece, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece).max(1);
    let mut decoder = Decoder::default();
    let mut given = 0usize;
    for chunk in stream.chunks(piece) {
        decoder.push(chunk);
        given += chunk.len();
        while let Some(m) = decoder.next_message() {
            match m {
                Ok(m) => {
                    let mut out = Vec::new();
                    m.encode(&mut out);
                    let mut again = Decoder::default();
                    again.push(&out);
                    assert_eq!(again.next_message(), Some(Ok(m)), "round trip");
                    assert_eq!(again.pending_bytes(), 0);
                }
                // What the daemon does: skip to the next possible frame.
                Err(_) => {
                    decoder.resync();
                }
            }
        }
        assert!(decoder.pending_bytes() <= given);
    }
});
