//! `--tls-dir` / `--tls-pin` / `--insecure` on every command that opens
//! migration connections, `freehint tls init`, which makes a test CA and
//! certificates (or, `--pinned`, a host's self-signed certificate), and
//! `freehint tls fingerprint`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use freehint_engine::tls::{
    make_host_certificate, make_test_set, CertificateFingerprint, TlsConfig, HOST_CERT_FILE,
    HOST_FILES, TEST_SET_FILES,
};
use freehint_types::ErrorChain;

/// How migration connections are secured. One of the two is required:
/// plain TCP is never a default.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// TLS 1.3 with mutual x509 authentication on every migration
    /// connection. DIR holds ca-cert.pem, and server-cert.pem +
    /// server-key.pem to receive, client-cert.pem + client-key.pem to send
    /// (the layout of QEMU's tls-creds-x509). `freehint tls init DIR`
    /// makes a test set.
    #[arg(long, value_name = "DIR", conflicts_with = "insecure")]
    pub tls_dir: Option<PathBuf>,
    /// Sending with --tls-dir: the name the destination's certificate
    /// must hold (default: the IP address connected to).
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_peer_name: Option<String>,
    /// Receiving with --tls-dir: accept only a source whose certificate
    /// names NAME; repeat for several (default: any certificate from the
    /// CA; a test set's source certificate names freehint-source).
    #[arg(long, value_name = "NAME", requires = "tls_dir")]
    pub tls_source_name: Vec<String>,
    /// The pinned mode, with no CA: DIR holds this host's self-signed
    /// host-cert.pem + host-key.pem (`freehint tls init DIR --pinned`),
    /// and a peer is accepted, either way, only if its certificate has
    /// this SHA-256 fingerprint (as `freehint tls fingerprint` prints it
    /// on the peer). Repeat for several peers.
    #[arg(
        long,
        value_name = "SHA256",
        requires = "tls_dir",
        conflicts_with_all = ["tls_peer_name", "tls_source_name"]
    )]
    pub tls_pin: Vec<CertificateFingerprint>,
    /// Plain TCP: no encryption and no authentication. Anyone who can
    /// reach the destination's port can write guest RAM, and anyone on the
    /// path can read it. Only for a trusted, isolated network.
    #[arg(long)]
    pub insecure: bool,
}

/// Which end of a migration the settings are for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Connects (a source).
    Send,
    /// Accepts (a destination).
    Receive,
    /// Both (a daemon that may do either).
    Either,
}

impl TlsArgs {
    /// The TLS settings, `None` for `--insecure` (with a warning), or an
    /// error if neither was chosen or DIR cannot serve `role`.
    pub fn resolve(&self, role: Role) -> Result<Option<Arc<TlsConfig>>> {
        let Some(dir) = &self.tls_dir else {
            if !self.insecure {
                bail!(
                    "migration connections need --tls-dir DIR (TLS with mutual authentication; `freehint tls init DIR` makes a test set) or --insecure (plain TCP, for a trusted network)"
                );
            }
            tracing::warn!(
                "--insecure: migration connections are neither encrypted nor authenticated"
            );
            return Ok(None);
        };
        let loaded = if !self.tls_pin.is_empty() {
            TlsConfig::pinned(dir, &self.tls_pin)
        } else if self.tls_source_name.is_empty() {
            TlsConfig::from_dir(dir)
        } else {
            TlsConfig::from_dir_accepting_only(dir, &self.tls_source_name)
        };
        let mut tls = loaded.map_err(|e| anyhow::anyhow!(ErrorChain(&e).to_string()))?;
        if let Some(name) = &self.tls_peer_name {
            tls = tls
                .with_peer_name(name)
                .map_err(|e| anyhow::anyhow!(e.to_string()))?;
        }
        let check = |sending| {
            tls.check_role(sending)
                .map_err(|e| anyhow::anyhow!(e.to_string()))
        };
        match role {
            Role::Send => check(true)?,
            Role::Receive => check(false)?,
            Role::Either => {
                if !tls.can_send() && !tls.can_receive() {
                    check(true)?;
                }
            }
        }
        if tls.pins().is_empty() {
            tracing::info!(
                "migration connections: TLS 1.3 with mutual authentication, certificates from {}",
                dir.display()
            );
        } else {
            tracing::info!(
                "migration connections: TLS 1.3 with mutual authentication, this host's certificate from {}, {} pinned peer(s)",
                dir.display(),
                tls.pins().len()
            );
        }
        Ok(Some(Arc::new(tls)))
    }

    /// The same choice as arguments for another freehint command.
    #[cfg(feature = "bench")]
    pub fn to_args(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(d) = &self.tls_dir {
            v.push("--tls-dir".to_string());
            v.push(d.display().to_string());
        }
        if let Some(n) = &self.tls_peer_name {
            v.push("--tls-peer-name".to_string());
            v.push(n.clone());
        }
        for n in &self.tls_source_name {
            v.push("--tls-source-name".to_string());
            v.push(n.clone());
        }
        for pin in &self.tls_pin {
            v.push("--tls-pin".to_string());
            v.push(pin.to_string());
        }
        if self.insecure {
            v.push("--insecure".to_string());
        }
        v
    }
}

/// `freehint tls …`.
#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Make a test CA and certificates in DIR, for trying --tls-dir: a CA,
    /// a destination certificate (server-*) naming localhost, 127.0.0.1,
    /// ::1 and every --name, and a source certificate (client-*). With
    /// --pinned, instead, this host's self-signed certificate for the
    /// pinned mode (--tls-pin), and its fingerprint. Keys are written
    /// 0600. For production, use your own CA or the pinned mode.
    #[command(after_help = TLS_INIT_EXAMPLE)]
    Init(TlsInitArgs),
    /// Print the SHA-256 fingerprint of DIR's host-cert.pem (or of a PEM
    /// certificate file), the value a peer gives to --tls-pin.
    Fingerprint {
        /// A TLS directory of the pinned mode, or a certificate file.
        path: PathBuf,
    },
}

/// Examples for `freehint tls init --help`.
pub const TLS_INIT_EXAMPLE: &str = "\
Example: both hosts share one directory (copy it; keep the keys private)
  freehint tls init /etc/freehint/tls --name dst.example.org --name 192.0.2.7
  freehint vm ... --incoming 0.0.0.0:4444 --tls-dir /etc/freehint/tls    (destination)
  freehint vm ... --tls-dir /etc/freehint/tls                            (source)

Example: the pinned mode, no CA; each host keeps its own key
  hostA$ freehint tls init /etc/freehint/tls --pinned      (prints A's fingerprint)
  hostB$ freehint tls init /etc/freehint/tls --pinned      (prints B's fingerprint)
  hostB$ freehint vm ... --incoming 0.0.0.0:4444 --tls-dir /etc/freehint/tls --tls-pin <A's>
  hostA$ freehint vm ... --tls-dir /etc/freehint/tls --tls-pin <B's>";

/// `freehint tls init`.
#[derive(Args, Debug)]
pub struct TlsInitArgs {
    /// The directory to write (made if missing).
    pub dir: PathBuf,
    /// Another name (DNS name or IP address) the destination certificate
    /// holds; repeat for several.
    #[arg(long = "name", value_name = "NAME")]
    pub names: Vec<String>,
    /// Make this host's self-signed certificate for the pinned mode
    /// (host-cert.pem, host-key.pem) instead of a CA set, and print its
    /// fingerprint for the peers' --tls-pin.
    #[arg(long, conflicts_with = "names")]
    pub pinned: bool,
    /// Replace certificates already in DIR.
    #[arg(long)]
    pub force: bool,
}

/// Runs `freehint tls …`.
pub fn run(cmd: TlsCommand) -> Result<()> {
    match cmd {
        TlsCommand::Init(a) if a.pinned => {
            refuse_to_overwrite(&a.dir, &HOST_FILES, a.force)?;
            let fingerprint = make_host_certificate(&a.dir)
                .map_err(|e| anyhow::anyhow!(ErrorChain(&e).to_string()))?;
            println!(
                "wrote this host's certificate for the pinned mode to {}; its fingerprint, for the peers' --tls-pin:",
                a.dir.display()
            );
            println!("{fingerprint}");
            Ok(())
        }
        TlsCommand::Fingerprint { path } => {
            let file = if path.is_dir() {
                path.join(HOST_CERT_FILE)
            } else {
                path
            };
            let fingerprint = CertificateFingerprint::of_file(&file)
                .map_err(|e| anyhow::anyhow!(ErrorChain(&e).to_string()))?;
            println!("{fingerprint}");
            Ok(())
        }
        TlsCommand::Init(a) => {
            init(&a.dir, &a.names, a.force)?;
            println!(
                "wrote a test CA and certificates to {} (destination names: localhost, 127.0.0.1, ::1{})",
                a.dir.display(),
                a.names.iter().map(|n| format!(", {n}")).collect::<String>()
            );
            Ok(())
        }
    }
}

/// Writes a CA, a destination pair and a source pair into `dir`, unless
/// one of their files is there already (`force`: replaces them).
pub fn init(dir: &Path, names: &[String], force: bool) -> Result<()> {
    refuse_to_overwrite(dir, &TEST_SET_FILES, force)?;
    make_test_set(dir, names).map_err(|e| anyhow::anyhow!(ErrorChain(&e).to_string()))
}

/// An error if one of `files` is in `dir` already, unless `force`.
fn refuse_to_overwrite(dir: &Path, files: &[&str], force: bool) -> Result<()> {
    if !force {
        if let Some(f) = files.iter().find(|f| dir.join(f).exists()) {
            bail!(
                "{} exists already; use --force to replace the certificates in {}",
                dir.join(f).display(),
                dir.display()
            );
        }
    }
    Ok(())
}
