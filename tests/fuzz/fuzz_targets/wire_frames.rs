//! A migration peer's byte stream, frame after frame, as a receiver reads
//! it: header, then the payload (for a page batch, its head; the page data
//! after it is skipped). Decoding must never panic, and a message that
//! decodes must encode to bytes that decode to the same message.
#![no_main]

use freehint_wire::PageBatchHead;
use freehint_wire::{Frame, FrameHeader, Kind, BATCH_PREFIX_BYTES, HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

/// Two regions: 4 KiB pages and 2 MiB pages, as a guest with a hugetlbfs
/// region has.
fn region_pages(region: usize) -> Option<(u64, u64)> {
    match region {
        0 => Some((4096, 1 << 18)),
        1 => Some((2 << 20, 512)),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while rest.len() >= HEADER_BYTES {
        let header: &[u8; HEADER_BYTES] = rest[..HEADER_BYTES].try_into().unwrap();
        rest = &rest[HEADER_BYTES..];
        let Ok(header) = FrameHeader::decode(header) else {
            return;
        };
        // The receiver reads the whole payload of a message, and of a
        // batch first its prefix, then the head its prefix announces.
        let payload_len = if header.kind == Kind::PageBatch {
            let Some(prefix) = rest.get(..BATCH_PREFIX_BYTES) else {
                return;
            };
            let prefix: &[u8; BATCH_PREFIX_BYTES] = prefix.try_into().unwrap();
            match PageBatchHead::head_bytes_from_prefix(prefix, header.payload_bytes) {
                Ok(n) => n,
                Err(_) => return,
            }
        } else {
            header.payload_bytes as usize
        };
        let Some(payload) = rest.get(..payload_len) else {
            return;
        };
        rest = &rest[payload_len..];
        match Frame::decode(&header, payload, region_pages) {
            Ok(Frame::Message(m)) => {
                let mut out = Vec::new();
                m.encode(&mut out);
                let again = FrameHeader::decode(out[..HEADER_BYTES].try_into().unwrap())
                    .expect("a header we encoded decodes");
                match Frame::decode(&again, &out[HEADER_BYTES..], region_pages) {
                    Ok(Frame::Message(m2)) => assert_eq!(m, m2, "a message survives a round trip"),
                    other => panic!("{m:?} re-encoded decodes as {other:?}"),
                }
            }
            Ok(Frame::PageBatch(head)) => {
                // The page data follows; its length is the head's word.
                let page_bytes = region_pages(head.region()).expect("checked").0;
                let data_bytes = head.data_bytes(page_bytes) as usize;
                if data_bytes > rest.len() {
                    return;
                }
                rest = &rest[data_bytes..];
            }
            Err(_) => return,
        }
    }
});
