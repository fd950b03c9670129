//! The balloon backend driven by a real vhost-user frontend (rust-vmm
//! `vhost::vhost_user::Frontend`) over a real Unix socket, with guest memory
//! in a shared memfd and a test driver that fills split virtqueues the way
//! Linux 6.x `virtio_balloon` does.

include!("support/harness.rs");

use freehint_balloon::{BalloonError, BalloonState, BALLOON_STATE_VERSION, FENCED_HINT_CMD_ID};

/// A hostile guest hinting many tiny disjoint ranges in one batch: the
/// device keeps at most one range per 8 MiB of guest memory plus 1024 for
/// the batch, hands on those, and refuses and counts the rest.
#[test]
fn a_batch_of_many_tiny_disjoint_hints_is_bounded_and_the_rest_counted() {
    let mut h = Harness::start(ALL_BALLOON);
    let fp = 3;
    h.config_change(|b| b.start_round(CmdId(7)));
    h.send_cmd_id(fp, 7);
    h.kick_and_wait(fp, 1);
    let limit = RAM_BYTES / (8 * MIB) + 1024;
    // Every other 4 KiB page of the first 10 MiB: 1250 separate ranges,
    // in chains of 250 (the queue has 256 descriptors).
    let (chains, per_chain) = (5u64, 250u64);
    for c in 0..chains {
        let bufs: Vec<(u64, u32, bool)> = (0..per_chain)
            .map(|k| ((c * per_chain + k) * 8192, 4096, true))
            .collect();
        let mem = h.mem.clone();
        h.vq(fp).add(&mem, &bufs);
        h.kick_and_wait(fp, 1);
    }
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 1);
    let hints = h.sink.hints();
    assert_eq!(hints.len() as u64, limit);
    assert!(hints
        .iter()
        .all(|&(id, r)| id == CmdId(7) && r.len_bytes == 4096));
    assert_eq!(
        h.handle.rejected(RejectReason::BatchRangesFull),
        chains * per_chain - limit
    );
    // Contiguous hints merge: a new batch of 4 MiB blocks side by side is
    // handed on whole, however many blocks.
    h.config_change(|b| b.start_round(CmdId(8)));
    h.send_cmd_id(fp, 8);
    for i in 0..12 {
        h.send_hint(fp, 12 * MIB + i * HINT_BLOCK / 4, (HINT_BLOCK / 4) as u32);
    }
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 14);
    assert_eq!(h.sink.hints().len() as u64, limit + 12);
}

#[test]
fn hint_round_reaches_sink_with_cmd_id_and_done_is_sent() {
    let mut h = Harness::start(ALL_BALLOON);
    // Full features: inflate 0, deflate 1, stats 2, free_page 3, reporting 4.
    let fp = 3;
    h.fill(0, 12 * MIB, 0x5a);

    h.config_change(|b| b.start_round(CmdId(7)));
    assert_eq!(h.config()[2], 7, "free_page_hint_cmd_id");

    h.send_cmd_id(fp, 7);
    for i in 0..3 {
        h.send_hint(fp, i * HINT_BLOCK, HINT_BLOCK as u32);
    }
    h.send_cmd_id(fp, 0); // STOP
    let used = h.kick_and_wait(fp, 5);
    assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
    let want: Vec<(CmdId, GpaRange)> = (0..3)
        .map(|i| (CmdId(7), GpaRange::new(i * HINT_BLOCK, HINT_BLOCK)))
        .collect();
    assert_eq!(h.sink.hints(), want);
    // Hinted blocks are neither read nor discarded.
    assert!(is_data(&h.file, 0, 12 * MIB));

    // A batch tagged with an older cmd_id still reaches the sink, with its
    // own id (the engine drops it as stale).
    h.send_cmd_id(fp, 6);
    h.send_hint(fp, 12 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 3);
    assert_eq!(
        h.sink.hints().last(),
        Some(&(CmdId(6), GpaRange::new(12 * MIB, HINT_BLOCK)))
    );

    // After STOP, a hint with no batch open is dropped and counted.
    h.send_hint(fp, 16 * MIB, HINT_BLOCK as u32);
    h.kick_and_wait(fp, 1);
    assert_eq!(h.sink.hints().len(), 4);
    assert_eq!(h.handle.rejected(RejectReason::HintWithoutCmdId), 1);

    h.config_change(|b| b.stop_round());
    assert_eq!(h.config()[2], 0);
    h.config_change(|b| b.finish());
    assert_eq!(h.config()[2], 1, "DONE in config");

    let st = h.handle.status();
    assert_eq!(st.counters.hint_ranges, 4);
    assert_eq!(st.counters.hint_bytes, 4 * HINT_BLOCK);
    assert_eq!(st.counters.hint_batches, 2);
    assert_eq!(st.counters.config_changes_sent, 3);
    assert!(st.backend_channel);
    // Not a round id.
    assert!(h.handle.start_round(CmdId::DONE).is_err());
}

#[test]
fn a_cmd_id_buffer_rewritten_for_a_newer_round_is_fenced() {
    let mut h = Harness::start(ALL_BALLOON);
    let fp = 3;
    let mem = h.mem.clone();
    h.config_change(|b| b.start_round(CmdId(7)));
    // The driver answers round 7 from its one cmd_id buffer; the device
    // has not got to the chains yet.
    let cmd_buf = h.small(&7u32.to_le_bytes());
    h.vq(fp).add(&mem, &[(cmd_buf, 4, false)]);
    h.send_hint(fp, 0, HINT_BLOCK as u32);
    h.send_hint(fp, HINT_BLOCK, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    // The host starts round 8; the driver rewrites the same buffer in place
    // and queues it again, with the blocks it finds now.
    h.config_change(|b| b.start_round(CmdId(8)));
    mem.write_obj(8u32, GuestAddress(cmd_buf)).unwrap();
    h.vq(fp).add(&mem, &[(cmd_buf, 4, false)]);
    h.send_hint(fp, 8 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 7);
    // Round 7's blocks read "8" but were queued before 8 existed: never
    // tagged 8. Round 8's own blocks are.
    assert_eq!(
        h.sink.hints(),
        vec![
            (FENCED_HINT_CMD_ID, GpaRange::new(0, HINT_BLOCK)),
            (FENCED_HINT_CMD_ID, GpaRange::new(HINT_BLOCK, HINT_BLOCK)),
            (CmdId(8), GpaRange::new(8 * MIB, HINT_BLOCK)),
        ]
    );
    assert_ne!(FENCED_HINT_CMD_ID, CmdId(8));
    assert!(!FENCED_HINT_CMD_ID.is_round());
    let st = h.handle.status();
    assert_eq!(st.counters.hint_batches, 2);
    assert_eq!(st.counters.hint_batches_fenced, 1);
    assert_eq!(h.handle.round_reported(CmdId(8)), Some(true));

    // A normal round afterwards is tagged with its id.
    h.config_change(|b| b.start_round(CmdId(9)));
    mem.write_obj(9u32, GuestAddress(cmd_buf)).unwrap();
    h.vq(fp).add(&mem, &[(cmd_buf, 4, false)]);
    h.send_hint(fp, 16 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 3);
    assert_eq!(
        h.sink.hints().last(),
        Some(&(CmdId(9), GpaRange::new(16 * MIB, HINT_BLOCK)))
    );
    assert_eq!(h.handle.status().counters.hint_batches_fenced, 1);
    assert_eq!(h.handle.round_reported(CmdId(9)), Some(true));
}

#[test]
fn reported_ranges_become_holes_in_the_ram_file() {
    let mut h = Harness::start(ALL_BALLOON);
    let rep = 4;
    h.fill(16 * MIB, 8 * MIB, 0xa5);
    assert!(is_data(&h.file, 16 * MIB, 8 * MIB));
    // Linux reports up to 32 blocks of pageblock order per chain.
    let mem = h.mem.clone();
    h.vq(rep).add(
        &mem,
        &[
            (16 * MIB, (2 * MIB) as u32, true),
            (20 * MIB, (2 * MIB) as u32, true),
        ],
    );
    let used = h.kick_and_wait(rep, 1);
    assert_eq!(used[0].1, 0);
    assert_eq!(
        h.sink.reported(),
        vec![
            GpaRange::new(16 * MIB, 2 * MIB),
            GpaRange::new(20 * MIB, 2 * MIB)
        ]
    );
    assert!(is_hole(&h.file, 16 * MIB, 2 * MIB));
    assert!(is_hole(&h.file, 20 * MIB, 2 * MIB));
    assert!(
        is_data(&h.file, 18 * MIB, 2 * MIB),
        "unreported memory kept"
    );
    assert!(
        is_data(&h.file, 22 * MIB, 2 * MIB),
        "unreported memory kept"
    );
    let mut buf = vec![1u8; 4096];
    h.mem.read_slice(&mut buf, GuestAddress(17 * MIB)).unwrap();
    assert!(
        buf.iter().all(|&b| b == 0),
        "discarded memory reads as zero"
    );
    let st = h.handle.status();
    assert_eq!(st.counters.reported_ranges, 2);
    assert_eq!(st.counters.reported_bytes, 4 * MIB);
}

#[test]
fn poison_value_keeps_reported_pages() {
    let mut h = Harness::start(ALL_BALLOON);
    // The guest writes poison_val at probe.
    h.fe.set_config(
        12,
        VhostUserConfigFlags::WRITABLE,
        &0xaaaa_aaaau32.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(h.config()[3], 0xaaaa_aaaa);
    h.fill(16 * MIB, 2 * MIB, 0xaa);
    let mem = h.mem.clone();
    h.vq(4).add(&mem, &[(16 * MIB, (2 * MIB) as u32, true)]);
    h.kick_and_wait(4, 1);
    assert!(is_data(&h.file, 16 * MIB, 2 * MIB));
    assert!(h.sink.reported().is_empty());
    assert_eq!(h.handle.status().counters.reported_skipped_poison, 1);
}

#[test]
fn poison_value_written_at_probe_before_set_features_is_kept() {
    // Linux writes poison_val in probe, before DRIVER_OK; QEMU forwards it
    // at once and sends SET_FEATURES only when it starts the device.
    let mut h = Harness::connect(5);
    h.fe.set_config(
        12,
        VhostUserConfigFlags::WRITABLE,
        &0xaaaa_aaaau32.to_le_bytes(),
    )
    .unwrap();
    assert_eq!(h.config()[3], 0xaaaa_aaaa);
    h.start_device(ALL_BALLOON);
    assert_eq!(h.config()[3], 0xaaaa_aaaa, "start keeps poison_val");
    h.fill(16 * MIB, 2 * MIB, 0xaa);
    let mem = h.mem.clone();
    h.vq(4).add(&mem, &[(16 * MIB, (2 * MIB) as u32, true)]);
    h.kick_and_wait(4, 1);
    assert!(
        is_data(&h.file, 16 * MIB, 2 * MIB),
        "a poisoned page was discarded to zero"
    );
    assert!(h.sink.reported().is_empty());
    let st = h.handle.status();
    assert_eq!(st.counters.reported_skipped_poison, 1);
    assert!(st.rejected.is_empty(), "{:?}", st.rejected);
}

fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut b = Vec::new();
    for (tag, val) in entries {
        b.extend_from_slice(&tag.to_le_bytes());
        b.extend_from_slice(&val.to_le_bytes());
    }
    b
}

#[test]
fn stats_arrive_and_are_requested_again() {
    let mut h = Harness::start(ALL_BALLOON);
    let sq = 2;
    // Linux fills all its tags; a few suffice here.
    let first = stats_bytes(&[(4, 1000 * MIB), (5, 4096 * MIB), (6, 1500 * MIB), (2, 17)]);
    let gpa = h.small(&first);
    let mem = h.mem.clone();
    h.vq(sq).add(&mem, &[(gpa, first.len() as u32, false)]);
    h.vq(sq).kick();
    h.wait_for("stats", |h| h.status().guest_stats.updates == 1);
    let s = h.handle.status().guest_stats;
    assert_eq!(s.free_bytes, Some(1000 * MIB));
    assert_eq!(s.total_bytes, Some(4096 * MIB));
    assert_eq!(s.available_bytes, Some(1500 * MIB));
    assert_eq!(s.major_faults, Some(17));
    // The device holds the buffer until it wants new stats.
    h.vq(sq).assert_no_more_used(&mem);
    assert!(h.handle.request_stats().unwrap());
    assert!(!h.handle.request_stats().unwrap(), "nothing held any more");
    h.vq(sq).wait_used(&mem, 1);
    // The driver refills the same buffer and queues it again.
    let second = stats_bytes(&[(4, 900 * MIB), (5, 4096 * MIB), (6, 1400 * MIB), (2, 18)]);
    h.mem.write_slice(&second, GuestAddress(gpa)).unwrap();
    h.vq(sq).add(&mem, &[(gpa, second.len() as u32, false)]);
    h.vq(sq).kick();
    h.wait_for("second stats", |h| h.status().guest_stats.updates == 2);
    let s = h.handle.status().guest_stats;
    assert_eq!(s.free_bytes, Some(900 * MIB));
    assert_eq!(s.major_faults, Some(18));
    let json = serde_json::to_string(&h.handle.status()).unwrap();
    assert!(json.contains("\"free_bytes\":943718400"), "{json}");
}

fn pfn_array(first_pfn: u32, n: u32) -> Vec<u8> {
    (first_pfn..first_pfn + n)
        .flat_map(|p| p.to_le_bytes())
        .collect()
}

#[test]
fn device_state_travels_to_a_second_backend_and_stats_keep_coming() {
    // The source: poison set at probe, a target, two inflated pages, a
    // round published, and the guest's stats buffer held by the device.
    let mut src = Harness::start(ALL_BALLOON);
    let mem = src.mem.clone();
    src.fe
        .set_config(12, VhostUserConfigFlags::WRITABLE, &0x55u32.to_le_bytes())
        .unwrap();
    src.config_change(|b| b.set_target_pages(2));
    let arr = pfn_array(1000, 2);
    let gpa = src.small(&arr);
    src.vq(0).add(&mem, &[(gpa, arr.len() as u32, false)]);
    src.kick_and_wait(0, 1);
    src.guest_write_actual(2);
    src.config_change(|b| b.start_round(CmdId(5)));
    let sq = 2;
    let stats = stats_bytes(&[(4, 77 * MIB), (5, 512 * MIB)]);
    let stats_gpa = src.small(&stats);
    let head = src
        .vq(sq)
        .add(&mem, &[(stats_gpa, stats.len() as u32, false)]);
    src.vq(sq).kick();
    src.wait_for("stats", |h| h.status().guest_stats.updates == 1);

    // QEMU stops the source; the daemon exports.
    for i in 0..5 {
        src.fe.get_vring_base(i).unwrap();
    }
    let state = src.handle.export_state();
    assert_eq!(state.version, BALLOON_STATE_VERSION);
    assert_eq!(state.held_stats_head, Some(head));
    assert_eq!(
        (
            state.num_pages_4k,
            state.actual_pages_4k,
            state.poison_val,
            state.free_page_hint_cmd_id
        ),
        (2, 2, 0x55, 5)
    );
    assert_eq!(state.inflated_pfns_4k, vec![1000, 1001]);
    assert_eq!(state.guest_stats.free_bytes, Some(77 * MIB));
    assert_eq!(state.cmd_id_fences.len(), 1);
    let json = serde_json::to_string(&state).unwrap();
    let state: BalloonState = serde_json::from_str(&json).unwrap();
    assert_eq!(state, src.handle.export_state());

    // The destination: QEMU is connected and loaded its device state; the
    // guest's memory (the stats chain in the avail ring) came over.
    let mut dst = Harness::connect(5);
    let mut bad = state.clone();
    bad.version = BALLOON_STATE_VERSION + 1;
    let err = dst.handle.import_state(&bad).unwrap_err();
    assert!(
        matches!(err, BalloonError::StateVersion { found, .. } if found == bad.version),
        "{err}"
    );
    assert!(err.to_string().contains("version"), "{err}");
    let mut bad = state.clone();
    bad.held_stats_head = Some(u16::MAX);
    assert!(matches!(
        dst.handle.import_state(&bad),
        Err(BalloonError::InvalidState(_))
    ));
    assert_eq!(
        dst.config(),
        [0, 0, 0, 0],
        "a refused state applies nothing"
    );
    dst.handle.import_state(&state).unwrap();

    // QEMU starts the device at the source's positions (stats: 1).
    let dmem = dst.mem.clone();
    dst.set_mem_table();
    let acked = ALL_BALLOON | bit(features::VERSION_1) | bit(features::PROTOCOL_FEATURES);
    dst.fe.set_features(acked).unwrap();
    let dst_stats_gpa = dst.small(&stats);
    let mut stats_vq = Some(Vq::new(sq));
    for i in 0..5 {
        if i == sq {
            let mut vq = stats_vq.take().unwrap();
            let h = vq.add(&dmem, &[(dst_stats_gpa, stats.len() as u32, false)]);
            assert_eq!(h, head);
            dst.setup_vq(vq, 1);
        } else {
            dst.setup_queue(i);
        }
    }
    assert_eq!(dst.config(), [2, 2, 5, 0x55]);
    let st = dst.handle.status();
    assert_eq!(st.balloon_pages, 2);
    assert_eq!(st.guest_stats.free_bytes, Some(77 * MIB));
    // Nothing the start did returned the buffer, or lost it.
    dst.vq(sq).assert_no_more_used(&dmem);
    assert!(dst.handle.request_stats().unwrap());
    assert_eq!(dst.vq(sq).wait_used(&dmem, 1), vec![(u32::from(head), 0)]);
    // The guest refills its buffer and queues it again: stats go on.
    let fresh = stats_bytes(&[(4, 66 * MIB)]);
    dst.mem
        .write_slice(&fresh, GuestAddress(dst_stats_gpa))
        .unwrap();
    dst.vq(sq)
        .add(&dmem, &[(dst_stats_gpa, fresh.len() as u32, false)]);
    dst.vq(sq).kick();
    dst.wait_for("stats after migration", |h| {
        h.status().guest_stats.free_bytes == Some(66 * MIB)
    });
    assert!(
        dst.handle.status().rejected.is_empty(),
        "{:?}",
        dst.handle.status().rejected
    );
}

#[test]
fn inflate_and_deflate_follow_the_target() {
    let mut h = Harness::start(ALL_BALLOON);
    h.config_change(|b| b.set_target_pages(512));
    assert_eq!(h.config()[0], 512);

    // The driver inflates in arrays of at most 256 PFNs, waiting for each.
    let base_pfn = (32 * MIB / 4096) as u32;
    h.fill(32 * MIB, 2 * MIB, 0x77);
    for k in 0..2 {
        let arr = pfn_array(base_pfn + k * 256, 256);
        let gpa = h.small(&arr);
        let mem = h.mem.clone();
        h.vq(0).add(&mem, &[(gpa, arr.len() as u32, false)]);
        h.kick_and_wait(0, 1);
    }
    h.guest_write_actual(512);
    let st = h.handle.status();
    assert_eq!(st.balloon_pages, 512);
    assert_eq!(st.config.actual, 512);
    assert_eq!(h.config()[1], 512);
    assert!(
        is_hole(&h.file, 32 * MIB, 2 * MIB),
        "inflated pages discarded"
    );

    h.config_change(|b| b.set_target_pages(256));
    assert_eq!(h.config()[0], 256);
    let arr = pfn_array(base_pfn + 256, 256);
    let gpa = h.small(&arr);
    let mem = h.mem.clone();
    h.vq(1).add(&mem, &[(gpa, arr.len() as u32, false)]);
    h.kick_and_wait(1, 1);
    h.guest_write_actual(256);
    let st = h.handle.status();
    assert_eq!(st.balloon_pages, 256);
    assert_eq!(st.config.actual, 256);
    assert_eq!(st.counters.inflated_pfns, 512);
    assert_eq!(st.counters.deflated_pfns, 256);
    assert_eq!(st.counters.deflated_unknown_pfns, 0);
}

#[test]
fn queue_indices_are_compacted_for_every_feature_combination() {
    let s = bit(features::STATS_VQ);
    let f = bit(features::FREE_PAGE_HINT);
    let r = bit(features::REPORTING);
    // (features, stats index, free-page index, reporting index), written
    // out by hand from the Linux driver's find_vqs.
    type Row = (u64, Option<usize>, Option<usize>, Option<usize>);
    let table: [Row; 8] = [
        (0, None, None, None),
        (s, Some(2), None, None),
        (f, None, Some(2), None),
        (r, None, None, Some(2)),
        (s | f, Some(2), Some(3), None),
        (s | r, Some(2), None, Some(3)),
        (f | r, None, Some(2), Some(3)),
        (s | f | r, Some(2), Some(3), Some(4)),
    ];
    for (feat, sq, fq, rq) in table {
        let mut h = Harness::start(feat | bit(features::PAGE_POISON));
        let nq = 2 + [sq, fq, rq].iter().filter(|x| x.is_some()).count();
        assert_eq!(h.vqs.len(), nq);
        // Inflate is always 0.
        let arr = pfn_array(100, 1);
        let gpa = h.small(&arr);
        let mem = h.mem.clone();
        h.vq(0).add(&mem, &[(gpa, 4, false)]);
        h.kick_and_wait(0, 1);
        assert_eq!(
            h.handle.status().counters.inflated_pfns,
            1,
            "features {feat:#x}"
        );
        if let Some(q) = fq {
            h.send_cmd_id(q, 9);
            h.send_hint(q, 0, HINT_BLOCK as u32);
            h.send_cmd_id(q, 0);
            h.kick_and_wait(q, 3);
            assert_eq!(
                h.sink.hints(),
                vec![(CmdId(9), GpaRange::new(0, HINT_BLOCK))],
                "features {feat:#x}"
            );
        }
        if let Some(q) = rq {
            h.fill(8 * MIB, 2 * MIB, 1);
            let mem = h.mem.clone();
            h.vq(q).add(&mem, &[(8 * MIB, (2 * MIB) as u32, true)]);
            h.kick_and_wait(q, 1);
            assert_eq!(
                h.sink.reported(),
                vec![GpaRange::new(8 * MIB, 2 * MIB)],
                "features {feat:#x}"
            );
            assert!(is_hole(&h.file, 8 * MIB, 2 * MIB));
        }
        if let Some(q) = sq {
            let b = stats_bytes(&[(4, 42)]);
            let gpa = h.small(&b);
            let mem = h.mem.clone();
            h.vq(q).add(&mem, &[(gpa, b.len() as u32, false)]);
            h.vq(q).kick();
            h.wait_for("stats", |h| h.status().guest_stats.free_bytes == Some(42));
        }
        // Nothing else reached the sink from a wrongly mapped queue.
        assert_eq!(
            h.sink.hints().len(),
            usize::from(fq.is_some()),
            "features {feat:#x}"
        );
        assert_eq!(
            h.sink.reported().len(),
            usize::from(rq.is_some()),
            "features {feat:#x}"
        );
        assert!(
            h.handle.status().rejected.is_empty(),
            "{:?}",
            h.handle.status().rejected
        );
    }
}

#[test]
fn bad_input_is_rejected_counted_and_other_queues_keep_working() {
    let mut h = Harness::connect(16);
    let count = |h: &Harness, r| h.handle.rejected(r);

    // --- messages out of order, from the frontend
    // set_config before features is allowed (the driver writes config
    // before DRIVER_OK); it is applied.
    h.fe.set_config(4, VhostUserConfigFlags::WRITABLE, &5u32.to_le_bytes())
        .unwrap();
    let acked = ALL_BALLOON;
    h.fe.set_features(acked).unwrap();
    assert_eq!(h.config()[1], 5, "early actual write applied");
    // Ring addresses before the memory table: NACKed, counted.
    let early = Vq::new(0);
    let cfg = VringConfigData {
        queue_max_size: QSIZE,
        queue_size: QSIZE,
        flags: 0,
        desc_table_addr: h.host_base + early.desc,
        used_ring_addr: h.host_base + early.used,
        avail_ring_addr: h.host_base + early.avail,
        log_addr: None,
    };
    assert!(h.fe.set_vring_addr(0, &cfg).is_err());
    assert_eq!(count(&h, RejectReason::VringAddrBeforeMemTable), 1);
    // A queue kicked before the memory table.
    h.fe.set_vring_num(0, QSIZE).unwrap();
    h.fe.set_vring_kick(0, &early.kick).unwrap();
    h.fe.set_vring_enable(0, true).unwrap();
    early.kick();
    h.wait_for("kick before memory table", |h| {
        h.rejected(RejectReason::QueueNotReady) >= 1
    });
    // Bad vring messages.
    assert!(h.fe.set_vring_num(1, 0).is_err());
    assert!(h.fe.set_vring_num(1, 3).is_err());
    assert_eq!(count(&h, RejectReason::BadQueueSize), 2);
    let stray = EventFd::new(0).unwrap();
    assert!(h.fe.set_vring_kick(9, &stray).is_err());
    assert_eq!(count(&h, RejectReason::VringIndexOutOfRange), 1);
    // Config write outside the 16 bytes.
    h.fe.set_config(14, VhostUserConfigFlags::WRITABLE, &[1, 2, 3, 4])
        .unwrap();
    assert_eq!(count(&h, RejectReason::ConfigWriteOutOfRange), 1);

    // --- now set up properly; the same connection still works.
    h.set_mem_table();
    for i in 0..5 {
        h.setup_queue(i);
    }
    let (fp, rep) = (3, 4);

    // --- bad input from the guest on the free-page queue
    h.send_cmd_id(fp, 11);
    h.send_hint(fp, 0, HINT_BLOCK as u32); // good
    h.send_hint(fp, RAM_BYTES - MIB / 2, MIB as u32); // crosses the end of RAM
    h.send_hint(fp, 1 << 40, HINT_BLOCK as u32); // far outside
    h.send_hint(fp, 4 * MIB, 0); // zero length
    h.send_hint(fp, 2 * MIB, HINT_BLOCK as u32); // overlaps the first
    let mem = h.mem.clone();
    h.vq(fp).add_loop(&mem, 40 * MIB); // never ends
    let eight = h.small(&[11, 0, 0, 0, 0, 0, 0, 0]);
    h.vq(fp).add(&mem, &[(eight, 8, false)]); // cmd_id buffer of 8 bytes
    h.send_hint(fp, 8 * MIB, HINT_BLOCK as u32); // good, still batch 11
    h.send_cmd_id(fp, 0);
    let used = h.kick_and_wait(fp, 10);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        h.sink.hints(),
        vec![
            (CmdId(11), GpaRange::new(0, HINT_BLOCK)),
            (CmdId(11), GpaRange::new(8 * MIB, HINT_BLOCK)),
        ]
    );
    assert_eq!(count(&h, RejectReason::DescOutsideMemory), 2);
    assert_eq!(count(&h, RejectReason::ZeroLength), 1);
    assert_eq!(count(&h, RejectReason::OverlappingRange), 1);
    assert_eq!(count(&h, RejectReason::ChainTooLong), 1);
    assert_eq!(count(&h, RejectReason::CmdIdBufferSize), 1);

    // --- bad reports are not applied; good ones in the same chain are.
    h.fill(24 * MIB, 4 * MIB, 3);
    let mem = h.mem.clone();
    h.vq(rep).add(
        &mem,
        &[
            (24 * MIB, (2 * MIB) as u32, true),
            (RAM_BYTES, (2 * MIB) as u32, true), // outside
            (25 * MIB, (2 * MIB) as u32, true),  // overlaps
            (26 * MIB, 0, true),                 // empty
        ],
    );
    h.kick_and_wait(rep, 1);
    assert_eq!(h.sink.reported(), vec![GpaRange::new(24 * MIB, 2 * MIB)]);
    assert!(is_hole(&h.file, 24 * MIB, 2 * MIB));
    assert!(
        is_data(&h.file, 26 * MIB, 2 * MIB),
        "overlapping report not applied"
    );
    assert_eq!(count(&h, RejectReason::DescOutsideMemory), 3);
    assert_eq!(count(&h, RejectReason::OverlappingRange), 2);
    assert_eq!(count(&h, RejectReason::ZeroLength), 2);

    // --- a PFN outside memory on the inflate queue is not discarded.
    let arr: Vec<u8> = [0x10_0000u32, 4096]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    h.fill(4096 * 4096, 4096, 9);
    let gpa = h.small(&arr);
    let mem = h.mem.clone();
    h.vq(0).add(&mem, &[(gpa, 8, false)]);
    h.kick_and_wait(0, 1);
    assert_eq!(count(&h, RejectReason::DescOutsideMemory), 4);
    assert_eq!(h.handle.status().balloon_pages, 1);

    // --- the free-page queue keeps working after all that.
    h.send_cmd_id(fp, 12);
    h.send_hint(fp, 40 * MIB, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.kick_and_wait(fp, 3);
    assert_eq!(
        h.sink.hints().last(),
        Some(&(CmdId(12), GpaRange::new(40 * MIB, HINT_BLOCK)))
    );
    let st = h.handle.status();
    assert_eq!(st.rejected.get("chain_too_long"), Some(&1));
    assert!(st.memory_table);
}

#[test]
fn get_vring_base_waits_for_the_hints_in_flight_and_nothing_moves_after() {
    let mut h = Harness::start(ALL_BALLOON);
    let fp = 3;
    let sink = h.sink.clone();
    let held = sink.hold();
    // One batch of many small blocks: more chains than one pass.
    const BLOCK: u64 = 64 * 1024;
    let blocks: u16 = 200;
    h.send_cmd_id(fp, 7);
    for i in 0..u64::from(blocks) {
        h.send_hint(fp, i * BLOCK, BLOCK as u32);
    }
    h.send_cmd_id(fp, 0);
    let total = blocks + 2;
    h.vq(fp).kick();
    let base = h.get_vring_base_while_worker_busy(fp, held);

    let mem = h.mem.clone();
    let used = h.vq(fp).used_idx(&mem);
    assert!(
        base > 0 && base < total,
        "base {base}: the worker stopped popping"
    );
    assert_eq!(used, base, "every chain popped is returned, no other");
    assert_eq!(h.handle.status().counters.buffers_used, u64::from(base));
    // The popped chains were the cmd_id and base - 1 blocks, all delivered.
    let want: Vec<(CmdId, GpaRange)> = (0..u64::from(base) - 1)
        .map(|i| (CmdId(7), GpaRange::new(i * BLOCK, BLOCK)))
        .collect();
    assert_eq!(h.sink.hints(), want);
    // Nothing moves any more: the rest waits in the avail ring.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(h.vq(fp).used_idx(&mem), used);
    assert_eq!(h.sink.hints().len(), want.len());
    h.vq(fp).kick();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        h.vq(fp).used_idx(&mem),
        used,
        "a stopped ring was processed"
    );
}

#[test]
fn get_vring_base_waits_for_the_reports_in_flight_and_no_hole_is_punched_after() {
    let mut h = Harness::start(ALL_BALLOON);
    let rep = 4;
    const CHUNK: u64 = 256 * 1024;
    let chains: u16 = 100;
    h.fill(0, u64::from(chains) * CHUNK, 0x3c);
    let sink = h.sink.clone();
    let held = sink.hold();
    let mem = h.mem.clone();
    for i in 0..u64::from(chains) {
        h.vq(rep).add(&mem, &[(i * CHUNK, CHUNK as u32, true)]);
    }
    h.vq(rep).kick();
    let base = h.get_vring_base_while_worker_busy(rep, held);

    assert!(base > 0 && base < chains, "base {base}");
    assert_eq!(h.vq(rep).used_idx(&mem), base);
    let check = |h: &Harness| {
        for i in 0..u64::from(chains) {
            if i < u64::from(base) {
                assert!(is_hole(&h.file, i * CHUNK, CHUNK), "chain {i} popped");
            } else {
                assert!(is_data(&h.file, i * CHUNK, CHUNK), "chain {i} not popped");
            }
        }
    };
    check(&h);
    assert_eq!(h.sink.reported().len(), usize::from(base));
    std::thread::sleep(Duration::from_millis(200));
    check(&h);
    assert_eq!(h.vq(rep).used_idx(&mem), base);
    assert_eq!(h.sink.reported().len(), usize::from(base));
}

#[test]
fn chains_queued_while_a_ring_is_stopped_wait_for_its_restart() {
    let mut h = Harness::start(ALL_BALLOON);
    let (sq, fp) = (2, 3);
    let mem = h.mem.clone();
    // The device holds the guest's stats buffer.
    let b = stats_bytes(&[(4, 42)]);
    let gpa = h.small(&b);
    h.vq(sq).add(&mem, &[(gpa, b.len() as u32, false)]);
    h.vq(sq).kick();
    h.wait_for("stats", |h| h.status().guest_stats.updates == 1);

    // QEMU stops the device (vhost_dev_stop: rings disabled, then
    // GET_VRING_BASE).
    h.fe.set_vring_enable(sq, false).unwrap();
    h.fe.set_vring_enable(fp, false).unwrap();
    assert_eq!(h.fe.get_vring_base(sq).unwrap(), 1);
    assert_eq!(h.fe.get_vring_base(fp).unwrap(), 0);
    // The stats buffer stays held while its ring is stopped.
    assert!(!h.handle.request_stats().unwrap());
    h.vq(sq).assert_no_more_used(&mem);
    // The guest queues a hint batch and kicks: nothing happens.
    h.send_cmd_id(fp, 7);
    h.send_hint(fp, 0, HINT_BLOCK as u32);
    h.send_hint(fp, HINT_BLOCK, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.vq(fp).kick();
    h.vq(fp).assert_no_more_used(&mem);
    assert!(h.sink.hints().is_empty());

    // The migration failed; QEMU starts the rings again. The queued chains
    // are processed without the guest kicking again.
    h.restart_queue(sq, 1);
    h.restart_queue(fp, 0);
    let used = h.vq(fp).wait_used(&mem, 4);
    assert!(used.iter().all(|&(_, len)| len == 0));
    assert_eq!(
        h.sink.hints(),
        vec![
            (CmdId(7), GpaRange::new(0, HINT_BLOCK)),
            (CmdId(7), GpaRange::new(HINT_BLOCK, HINT_BLOCK)),
        ]
    );
    assert!(h.handle.request_stats().unwrap());
    h.vq(sq).wait_used(&mem, 1);
}

#[test]
fn nothing_touches_guest_memory_while_paused_and_queued_chains_run_after() {
    // A postcopy destination: paused before the device even starts.
    let mut h = Harness::connect(5);
    h.handle.pause_memory_access();
    h.start_device(ALL_BALLOON);
    let (sq, fp) = (2, 3);
    let mem = h.mem.clone();
    let b = stats_bytes(&[(4, 42)]);
    let gpa = h.small(&b);
    h.vq(sq).add(&mem, &[(gpa, b.len() as u32, false)]);
    h.vq(sq).kick();
    h.send_cmd_id(fp, 9);
    h.send_hint(fp, 0, HINT_BLOCK as u32);
    h.send_cmd_id(fp, 0);
    h.vq(fp).kick();
    std::thread::sleep(Duration::from_millis(200));
    h.vq(sq).assert_no_more_used(&mem);
    h.vq(fp).assert_no_more_used(&mem);
    assert!(h.sink.hints().is_empty());
    assert_eq!(
        h.handle.status().guest_stats.updates,
        0,
        "stats read while paused"
    );
    assert!(!h.handle.request_stats().unwrap());

    // The last page arrived: the chains queued meanwhile are served
    // without the guest kicking again.
    h.handle.resume_memory_access();
    h.vq(fp).wait_used(&mem, 3);
    assert_eq!(
        h.sink.hints(),
        vec![(CmdId(9), GpaRange::new(0, HINT_BLOCK))]
    );
    h.wait_for("stats", |h| h.status().guest_stats.updates == 1);
    assert!(h.handle.request_stats().unwrap());
    h.vq(sq).wait_used(&mem, 1);
}

#[test]
fn config_changes_are_held_while_the_frontend_has_the_device_stopped() {
    // QEMU 10.0 crashes on a config change between stopping the device
    // (GET_VRING_BASE) and starting it again: the backend holds it.
    let mut h = Harness::start(ALL_BALLOON);
    h.fe.get_vring_base(0).unwrap();
    h.handle.start_round(CmdId(9)).unwrap(); // returns at once: held
    let mut pfd = libc::pollfd {
        fd: h.req.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, 200) };
    assert_eq!(n, 0, "a config change was sent to a stopped device");
    assert_eq!(h.config()[2], 9, "the config itself is updated");
    // The frontend starts the device again: the held change goes out.
    let kick = h.vqs[0].kick.try_clone().unwrap();
    h.fe.set_vring_kick(0, &kick).unwrap();
    h.expect_config_change();
    assert_eq!(h.handle.status().counters.config_changes_sent, 1);
}
