//! Migrations over TLS 1.3 with mutual authentication: a `freehint receive`
//! process refuses every peer without a certificate from its CA (a plain
//! TCP source, a TLS source without a certificate, one with a certificate
//! of another CA), each with one log line, writes none of their bytes into
//! guest RAM, and then takes the real source's migration; and the
//! simulated VM migrates over TLS in every mode, page by page equal.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use freehint_dirty_log::UffdWpDirtyLog;
use freehint_e2e::{bench_sim, bin_dir, freehint, wait_for, SimVm};
use freehint_engine::{
    empty_bitmap, vmm_ram_ranges, MigrationMode, MigrationParams, Phase, PrecopySender, TlsConfig,
};
use freehint_hint_filter::HintFilter;
use freehint_memory::GuestRam;
use freehint_wire::{ChannelRole, Hello, Message, RegionDesc};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

const MEM_MIB: u64 = 64;
const STRANGER_BYTE: u8 = 0x5a;

fn tls_init(dir: &Path) {
    let (ok, _, err) = freehint(&["tls", "init", dir.to_str().unwrap()]);
    assert!(ok, "freehint tls init: {err}");
}

/// The hello a source sends first, for the whole of guest RAM.
fn hello_frame() -> Vec<u8> {
    let mut b = Vec::new();
    Message::Hello(Hello {
        session_id: 7,
        role: ChannelRole::Control,
        bulk_channels: 1,
        peer_timeout_s: 5,
        regions: vec![RegionDesc {
            ram_start: 0,
            size_bytes: MEM_MIB << 20,
            page_bytes: 4096,
        }],
        postcopy: false,
        postcopy_required: false,
        resume: false,
    })
    .encode(&mut b);
    b
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// A TLS client that trusts `ca_dir`'s CA and shows `client_dir`'s source
/// certificate (none if `None`); it says hello as a source would, then
/// writes a page's worth of [`STRANGER_BYTE`], as page data would come.
fn tls_stranger(addr: SocketAddr, ca_dir: &Path, client_dir: Option<&Path>) {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(&ca_dir.join("ca-cert.pem")) {
        roots.add(c).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_dir {
        None => builder.with_no_client_auth(),
        Some(d) => builder
            .with_client_auth_cert(
                certs(&d.join("client-cert.pem")),
                PrivateKeyDer::from_pem_file(d.join("client-key.pem")).unwrap(),
            )
            .unwrap(),
    };
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::IpAddress(addr.ip().into()))
            .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
    tls.sock
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    // Any of these may fail once the destination has refused us.
    let _ = tls.write_all(&hello_frame());
    let _ = tls.write_all(&[STRANGER_BYTE; 4096]);
    let _ = tls.flush();
    let mut b = [0u8; 64];
    let _ = tls.read(&mut b);
}

/// A plain TCP source: hello and page bytes in the clear.
fn plain_stranger(addr: SocketAddr) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(&hello_frame());
    let _ = s.write_all(&[STRANGER_BYTE; 4096]);
    let mut b = [0u8; 64];
    let _ = s.read(&mut b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_destination_refuses_strangers_with_a_log_line_then_takes_the_real_source() {
    let dir = tempfile::tempdir_in("/dev/shm").unwrap();
    let (ours, theirs) = (dir.path().join("ours"), dir.path().join("theirs"));
    tls_init(&ours);
    tls_init(&theirs);
    let dst_ram = dir.path().join("dst.ram");
    let log_path = dir.path().join("receive.log");
    let mut receiver = Command::new(bin_dir().join("freehint"))
        .args(["receive", "--listen", "127.0.0.1:0", "--json"])
        .args([
            "--mem-mib",
            &MEM_MIB.to_string(),
            "--accept-timeout-s",
            "60",
        ])
        .arg("--ram")
        .arg(&dst_ram)
        .arg("--tls-dir")
        .arg(&ours)
        .env("FREEHINT_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(receiver.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr: SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("receiver said {line:?}"))
        .parse()
        .unwrap();
    let untouched = std::fs::read(&dst_ram).unwrap();

    // Three strangers, one after the other.
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let refusals = || log().matches("refused a connection from").count();
    plain_stranger(addr);
    wait_for(
        "the plain source's refusal",
        Duration::from_secs(10),
        || refusals() >= 1,
    );
    tls_stranger(addr, &ours, None);
    wait_for(
        "the certificate-less source's refusal",
        Duration::from_secs(10),
        || refusals() >= 2,
    );
    tls_stranger(addr, &ours, Some(&theirs));
    wait_for(
        "the other CA's source's refusal",
        Duration::from_secs(10),
        || refusals() >= 3,
    );
    let text = log();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("refused a connection from"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    // Each line says why.
    assert!(lines[0].contains("TLS handshake failed"), "{}", lines[0]);
    assert!(
        lines[1].contains("certificate") || lines[1].contains("Certificate"),
        "{}",
        lines[1]
    );
    assert!(
        lines[2].contains("invalid peer certificate"),
        "{}",
        lines[2]
    );
    assert!(
        receiver.try_wait().unwrap().is_none(),
        "the destination gave up after refusing strangers: {text}"
    );
    assert!(
        std::fs::read(&dst_ram).unwrap() == untouched,
        "a refused peer's bytes reached guest RAM"
    );

    // The real source, with our certificates: the migration completes.
    let sim = SimVm::start(MEM_MIB, 32);
    let ram = Arc::new(GuestRam::open_file(&sim.ram_path, MEM_MIB << 20).unwrap());
    let log_dirty =
        UffdWpDirtyLog::attach_process(sim.pid, vmm_ram_ranges(sim.pid, &ram).unwrap()).unwrap();
    let filter = Arc::new(HintFilter::new(empty_bitmap(&ram)));
    let params = MigrationParams {
        peer_timeout_s: 10,
        mode: MigrationMode::Precopy,
        ..Default::default()
    };
    let tls = Arc::new(TlsConfig::from_dir(&ours).unwrap());
    let sender = PrecopySender::new(
        ram,
        filter,
        Box::new(log_dirty),
        None,
        sim.client.clone(),
        params,
    )
    .unwrap()
    .with_tls(Some(tls));
    let stats = sender.migrate(addr).await.unwrap();
    assert_eq!(stats.state, Phase::Completed, "{stats:?}");
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let received: serde_json::Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(received["state"], "completed", "{received}");
    assert!(receiver.wait().unwrap().success());
    // The source VM stopped at the handover: both RAM files must now be
    // equal, page by page.
    let (src, dst) = (
        std::fs::read(&sim.ram_path).unwrap(),
        std::fs::read(&dst_ram).unwrap(),
    );
    let differ = src
        .chunks(4096)
        .zip(dst.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differ, 0, "pages differ after a migration over TLS");
}

#[test]
fn the_simulated_vm_migrates_over_tls_in_every_mode() {
    let dir = tempfile::tempdir().unwrap();
    tls_init(dir.path());
    for mode in ["precopy", "postcopy", "hybrid"] {
        let v = bench_sim(&[
            "--mem-mib",
            "1024",
            "--used-percent",
            "20",
            "--dirty-mib-per-s",
            "64",
            "--hints",
            "on",
            "--mode",
            mode,
            "--tls-dir",
            dir.path().to_str().unwrap(),
        ])
        .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(v["transport"], "tls", "{v}");
        assert_eq!(v["state"], "completed", "{mode}: {v}");
        assert_eq!(v["mismatched_pages"], 0, "{mode}: {v}");
        assert!(v["pages_compared"].as_u64().unwrap() > 0, "{v}");
        if mode != "precopy" {
            assert_eq!(v["destination_pattern_errors"], 0, "{mode}: {v}");
        }
        if mode == "postcopy" {
            assert!(v["faults_remote"].as_u64().unwrap() > 0, "{v}");
        }
    }
}

#[test]
fn migration_commands_need_tls_or_an_explicit_insecure() {
    const RAM: &str = "/dev/shm/freehint-never-made.ram";
    // `freehint receive` with `security` (the rest is valid): it must fail.
    let refused = |security: &[&str]| {
        let mut args = vec![
            "receive",
            "--listen",
            "127.0.0.1:0",
            "--ram",
            RAM,
            "--mem-mib",
            "16",
        ];
        args.extend_from_slice(security);
        let (ok, _, err) = freehint(&args);
        assert!(!ok, "receive {security:?} started");
        err
    };
    let err = refused(&[]);
    assert!(
        err.contains("--tls-dir") && err.contains("--insecure"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    let err = refused(&["--tls-dir", dir.path().to_str().unwrap()]);
    assert!(err.contains("ca-cert.pem"), "{err}");
    assert!(!Path::new(RAM).exists());
}

#[test]
fn the_pinned_mode_migrates_with_fingerprints_and_refuses_others() {
    let ours = tempfile::tempdir().unwrap();
    let theirs = tempfile::tempdir().unwrap();
    let init = |dir: &Path| {
        let (ok, out, err) = freehint(&["tls", "init", dir.to_str().unwrap(), "--pinned"]);
        assert!(ok, "freehint tls init --pinned: {err}");
        out.lines().last().unwrap().to_string()
    };
    let our_pin = init(ours.path());
    let their_pin = init(theirs.path());
    let (ok, shown, err) = freehint(&["tls", "fingerprint", ours.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert_eq!(
        shown.trim(),
        our_pin,
        "tls fingerprint and tls init disagree"
    );
    let (ok, _, err) = freehint(&["tls", "init", ours.path().to_str().unwrap(), "--pinned"]);
    assert!(
        !ok && err.contains("--force"),
        "a host key was replaced: {err}"
    );

    // Both sides of bench sim hold our certificate and pin it: it migrates.
    let sim = |pin: &str| {
        bench_sim(&[
            "--mem-mib",
            "256",
            "--used-percent",
            "20",
            "--hints",
            "on",
            "--tls-dir",
            ours.path().to_str().unwrap(),
            "--tls-pin",
            pin,
        ])
    };
    let v = sim(&our_pin).unwrap();
    assert_eq!(v["transport"], "tls", "{v}");
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["mismatched_pages"], 0, "{v}");
    // Pinned to another host's fingerprint, the source refuses the
    // destination and says why.
    let e = sim(&their_pin).expect_err("migrated to a destination that was not pinned");
    assert!(e.contains("--tls-pin"), "{e}");
    // A fingerprint that is not one is refused before anything starts.
    let e = sim("AB:CD").expect_err("took a malformed fingerprint");
    assert!(e.contains("64 hex digits"), "{e}");
}
