//! Migration parameters from flags and a TOML config file (`--config`),
//! and `freehint config show`.
//!
//! One typed [`MigrationParams`] comes out: the defaults, then the file's
//! keys, then the flags, validated as a whole. Every value remembers where
//! it came from, so an error names the flag or the file that set it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use freehint_engine::{MigrationMode, MigrationParams};
use toml::Spanned;

use crate::OnOff;

pub const CONFIG_EXAMPLE: &str = "\
A config file holds any of the migration parameters as TOML keys; flags
override it, and it overrides the defaults. Unknown keys are errors.

  # migrate.toml
  bulk_channels = 2
  downtime_target_ms = 200   # ms
  batch_bytes = 524288       # bytes
  peer_timeout_s = 60        # s
  hints = true

Examples:
  freehint config show                                     # the defaults
  freehint config show --config migrate.toml --downtime-target-ms 100
  freehint config show --format toml > migrate.toml        # a file with every key
  freehint migrate --control a.ctl --to desthost:4444 --config migrate.toml";

/// Migration parameters shared by every command that sends. Each one not
/// given comes from `--config FILE`, or else from the defaults.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Migration parameters (flags override --config FILE)")]
pub struct ParamArgs {
    /// Read migration parameters from this TOML file (keys as printed by
    /// `freehint config show --format toml`); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Number of TCP connections carrying page data.
    #[arg(long, value_name = "N")]
    pub bulk_channels: Option<u8>,
    /// Most bytes of page data per batch.
    #[arg(long, value_name = "BYTES")]
    pub batch_bytes: Option<u64>,
    /// Switch over once the rest is estimated to take this long, in ms.
    #[arg(long, value_name = "MS")]
    pub downtime_target_ms: Option<u64>,
    /// Switch over after this many rounds at most.
    #[arg(long, value_name = "N")]
    pub max_rounds: Option<u32>,
    /// Do at least this many rounds before switching over.
    #[arg(long, value_name = "N")]
    pub min_rounds: Option<u32>,
    /// Seconds either side waits for the other at any step; the
    /// destination adopts this value, so both give up after the same time.
    #[arg(long, value_name = "S")]
    pub peer_timeout_s: Option<u64>,
    /// With hints on, wait at most this many ms for the guest's first
    /// free-page report before sending (balloon guests). The wait ends
    /// sooner when the report is done or its hints slow down; later hints
    /// still apply. Default 0: send at once, hints apply while the first
    /// round runs (never slower than without hints; a wait can save bytes
    /// on a link much faster than the guest reports).
    #[arg(long, value_name = "MS")]
    pub hint_wait_ms: Option<u64>,
    /// precopy: rounds, then a short stop with everything sent. postcopy:
    /// the guest resumes on the destination at once and its RAM follows
    /// (pages it touches first). hybrid: precopy, switching to postcopy if
    /// the rounds stop converging (the default; with a destination that
    /// cannot run the guest while its RAM arrives, it stays precopy).
    /// `freehint bench sim` defaults to precopy.
    #[arg(long, value_enum, value_name = "MODE")]
    pub mode: Option<ModeArg>,
    /// After the link breaks in postcopy, reconnect for this many seconds
    /// (with backoff), then wait for `freehint migrate --resume`. The source
    /// never gives the guest up on its own in postcopy.
    #[arg(long, value_name = "S")]
    pub postcopy_recovery_s: Option<u64>,
}

/// `--mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Precopy only.
    Precopy,
    /// Postcopy at once.
    Postcopy,
    /// Precopy, then postcopy if it does not converge.
    Hybrid,
}

impl From<ModeArg> for MigrationMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Precopy => MigrationMode::Precopy,
            ModeArg::Postcopy => MigrationMode::Postcopy,
            ModeArg::Hybrid => MigrationMode::Hybrid,
        }
    }
}

/// Where a parameter's value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The built-in default.
    Default,
    /// The config file.
    File(PathBuf),
    /// A command-line flag.
    Flag(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::Default => f.write_str("default"),
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Flag(flag) => f.write_str(flag),
        }
    }
}

/// The effective parameters and where each came from.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The validated parameters.
    pub params: MigrationParams,
    /// `(key, source)` for every key of [`MigrationParams`].
    pub sources: Vec<(String, Source)>,
}

impl Resolved {
    /// Where `key` came from.
    pub fn source(&self, key: &str) -> &Source {
        self.sources
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&Source::Default, |(_, s)| s)
    }
}

/// The keys of [`MigrationParams`], in the order it serializes them.
fn keys() -> Vec<String> {
    match serde_json::to_value(MigrationParams::default()) {
        Ok(serde_json::Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// Reads a config file: a TOML table of [`MigrationParams`] keys. Returns
/// the parameters (defaults for keys it leaves out) and the keys it sets.
/// An error names the file, the line and the key.
pub fn load_config(path: &Path) -> Result<(MigrationParams, Vec<String>)> {
    let name = path.display();
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("config file {name}: cannot read it"))?;
    let line_of = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
    let entries: BTreeMap<Spanned<String>, Spanned<toml::Value>> =
        toml::from_str(&text).map_err(|e| match e.span() {
            Some(s) => anyhow!(
                "config file {name} line {}: {}",
                line_of(s.start),
                e.message().trim()
            ),
            None => anyhow!("config file {name}: {}", e.message().trim()),
        })?;
    let mut entries: Vec<_> = entries.into_iter().collect();
    entries.sort_by_key(|(k, _)| k.span().start);
    let known = keys();
    let mut table = toml::Table::new();
    for (key, value) in entries {
        let line = line_of(key.span().start);
        let key = key.into_inner();
        if !known.contains(&key) {
            bail!(
                "config file {name} line {line}: unknown key `{key}` (the keys are {})",
                known.join(", ")
            );
        }
        // Each key alone, so that a type error names its key.
        let value = value.into_inner();
        let alone = toml::Value::Table([(key.clone(), value.clone())].into_iter().collect());
        if let Err(e) = alone.try_into::<MigrationParams>() {
            bail!(
                "config file {name} line {line}: {key}: {}",
                e.message().trim()
            );
        }
        table.insert(key, value);
    }
    let keys = table.keys().cloned().collect();
    let params = toml::Value::Table(table)
        .try_into::<MigrationParams>()
        .map_err(|e| anyhow!("config file {name}: {}", e.message().trim()))?;
    Ok((params, keys))
}

impl ParamArgs {
    /// The effective parameters: the defaults, then `--config`, then the
    /// flags (`hints`: the command's `--hints`, if it has one), validated.
    pub fn resolve(&self, hints: Option<OnOff>) -> Result<Resolved> {
        let mut sources: Vec<(String, Source)> =
            keys().into_iter().map(|k| (k, Source::Default)).collect();
        let mut set = |key: &str, source: Source| {
            if let Some(s) = sources.iter_mut().find(|(k, _)| k == key) {
                s.1 = source;
            }
        };
        let mut p = MigrationParams::default();
        if let Some(path) = &self.config {
            let (from_file, keys) = load_config(path)?;
            p = from_file;
            for k in keys {
                set(&k, Source::File(path.clone()));
            }
        }
        macro_rules! flag {
            ($field:ident) => {
                if let Some(v) = self.$field {
                    p.$field = v;
                    set(
                        stringify!($field),
                        Source::Flag(format!("--{}", stringify!($field).replace('_', "-"))),
                    );
                }
            };
        }
        flag!(bulk_channels);
        flag!(batch_bytes);
        flag!(downtime_target_ms);
        flag!(max_rounds);
        flag!(min_rounds);
        flag!(peer_timeout_s);
        flag!(hint_wait_ms);
        flag!(postcopy_recovery_s);
        if let Some(m) = self.mode {
            p.mode = m.into();
            set("mode", Source::Flag("--mode".into()));
        }
        if let Some(h) = hints {
            p.hints = h == OnOff::On;
            set("hints", Source::Flag("--hints".into()));
        }
        let resolved = Resolved { params: p, sources };
        if let Err(e) = resolved.params.validate() {
            let from = match resolved.source(e.field) {
                Source::Default => "the default".to_string(),
                Source::File(path) => format!("set in {}", path.display()),
                Source::Flag(flag) => format!("set by {flag}"),
            };
            bail!("invalid migration parameter {e} ({from})");
        }
        Ok(resolved)
    }

    /// The effective parameters for a sender without free-page hints
    /// (`freehint send`): `hints` is off, and a config file that turns it
    /// on is refused rather than ignored.
    pub fn resolve_without_hints(&self) -> Result<MigrationParams> {
        let mut r = self.resolve(None)?;
        if let (Source::File(path), true) = (r.source("hints"), r.params.hints) {
            bail!(
                "config file {}: hints = true, but this command has no free-page hints (it migrates a plain process); set hints = false or leave it out",
                path.display()
            );
        }
        r.params.hints = false;
        Ok(r.params)
    }
}

/// `freehint config …`.
#[derive(clap::Subcommand, Debug)]
pub enum ConfigCommand {
    /// Print the effective migration parameters with their units and where
    /// each came from (default, the config file, or a flag).
    #[command(after_help = CONFIG_EXAMPLE)]
    Show(ShowArgs),
}

/// How `config show` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ShowFormat {
    /// An aligned table: key, value, unit, source.
    Text,
    /// A config file with every key.
    Toml,
    /// One JSON object.
    Json,
}

/// Arguments of `config show`.
#[derive(Args, Debug)]
pub struct ShowArgs {
    /// Free-page hints on or off (as `freehint migrate --hints`).
    #[arg(long, value_enum)]
    hints: Option<OnOff>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ShowFormat::Text)]
    format: ShowFormat,
    #[command(flatten)]
    params: ParamArgs,
}

/// The unit of a parameter, from its name (every name carries its unit).
fn unit(key: &str) -> Option<&'static str> {
    Some(match key {
        k if k.ends_with("_bytes") => "bytes",
        k if k.ends_with("_ms") => "ms",
        k if k.ends_with("_s") => "s",
        k if k.ends_with("_rounds") => "rounds",
        k if k.ends_with("_channels") => "connections",
        "hints" => "on/off",
        "mode" => "precopy/postcopy/hybrid",
        _ => return None,
    })
}

/// One line per parameter: key, value, unit, source, aligned.
pub fn table(r: &Resolved) -> Result<String> {
    let serde_json::Value::Object(values) = serde_json::to_value(&r.params)? else {
        bail!("migration parameters do not serialize as an object");
    };
    let rows: Vec<[String; 4]> = values
        .iter()
        .map(|(k, v)| {
            let value = match v {
                serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                other => other.to_string(),
            };
            [
                k.clone(),
                value,
                unit(k).unwrap_or("").to_string(),
                r.source(k).to_string(),
            ]
        })
        .collect();
    Ok(crate::table::aligned(
        &["KEY", "VALUE", "UNIT", "SOURCE"],
        &rows,
    ))
}

/// `freehint config show`.
pub fn show(a: ShowArgs) -> Result<()> {
    let r = a.params.resolve(a.hints)?;
    match a.format {
        ShowFormat::Text => print!("{}", table(&r)?),
        ShowFormat::Toml => print!("{}", toml::to_string(&r.params)?),
        ShowFormat::Json => println!("{}", serde_json::to_string_pretty(&r.params)?),
    }
    Ok(())
}

/// Adds `[default: …]` to the help of every migration parameter flag of
/// `cmd` and its subcommands, from [`MigrationParams::default`] (the flags
/// have no clap default: an absent flag leaves the config file's value).
pub fn with_param_defaults(mut cmd: clap::Command) -> clap::Command {
    let Ok(serde_json::Value::Object(defaults)) = serde_json::to_value(MigrationParams::default())
    else {
        return cmd;
    };
    for (key, value) in &defaults {
        if !cmd.get_arguments().any(|a| a.get_id() == key.as_str()) {
            continue;
        }
        let shown = match value {
            serde_json::Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
            other => other.to_string(),
        };
        cmd = cmd.mut_arg(key.as_str(), |a| {
            let help = a.get_help().map(ToString::to_string).unwrap_or_default();
            let long = a.get_long_help().map(ToString::to_string);
            let a = a.help(format!("{help} [default: {shown}]"));
            match long {
                Some(l) => a.long_help(format!("{l}\n\n[default: {shown}]")),
                None => a,
            }
        });
    }
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(name, with_param_defaults);
    }
    cmd
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    fn args(config: Option<&Path>) -> ParamArgs {
        ParamArgs {
            config: config.map(Path::to_path_buf),
            ..Default::default()
        }
    }

    #[test]
    fn an_unknown_key_is_refused_naming_the_key_the_file_and_the_line() {
        let f = file("bulk_channels = 2\nbulk_chanels = 3\n");
        let e = args(Some(f.path())).resolve(None).unwrap_err().to_string();
        assert!(e.contains("bulk_chanels"), "{e}");
        assert!(e.contains(&f.path().display().to_string()), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_value_of_the_wrong_type_or_range_is_refused_naming_the_field() {
        let f = file("downtime_target_ms = \"fast\"\n");
        let e = args(Some(f.path())).resolve(None).unwrap_err().to_string();
        assert!(
            e.contains("line 1") && e.contains("downtime_target_ms"),
            "{e}"
        );

        let f = file("bulk_channels = 300\n");
        let e = args(Some(f.path())).resolve(None).unwrap_err().to_string();
        assert!(e.contains("bulk_channels"), "{e}");

        // In the type's range but invalid for a migration: validate() says
        // which field and that the file set it.
        let f = file("batch_bytes = 100\n");
        let e = args(Some(f.path())).resolve(None).unwrap_err().to_string();
        assert!(e.contains("batch_bytes"), "{e}");
        assert!(e.contains(&format!("set in {}", f.path().display())), "{e}");

        let mut a = args(None);
        a.min_rounds = Some(50);
        let e = a.resolve(None).unwrap_err().to_string();
        assert!(
            e.contains("min_rounds") && e.contains("set by --min-rounds"),
            "{e}"
        );
    }

    #[test]
    fn a_flag_beats_the_file_which_beats_the_default() {
        let f = file("downtime_target_ms = 111\nmax_rounds = 7\nhints = false\n");
        let mut a = args(Some(f.path()));
        a.downtime_target_ms = Some(222);
        let r = a.resolve(None).unwrap();
        assert_eq!(r.params.downtime_target_ms, 222);
        assert_eq!(
            r.source("downtime_target_ms"),
            &Source::Flag("--downtime-target-ms".into())
        );
        assert_eq!(r.params.max_rounds, 7);
        assert_eq!(
            r.source("max_rounds"),
            &Source::File(f.path().to_path_buf())
        );
        assert!(!r.params.hints);
        let d = MigrationParams::default();
        assert_eq!(r.params.peer_timeout_s, d.peer_timeout_s);
        assert_eq!(r.source("peer_timeout_s"), &Source::Default);

        // --hints on beats the file's hints = false.
        let r = a.resolve(Some(OnOff::On)).unwrap();
        assert!(r.params.hints);
        assert_eq!(r.source("hints"), &Source::Flag("--hints".into()));
    }

    #[test]
    fn the_flags_parse_into_the_same_fields() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            p: ParamArgs,
        }
        let t = T::try_parse_from([
            "t",
            "--bulk-channels",
            "3",
            "--batch-bytes",
            "8192",
            "--downtime-target-ms",
            "50",
            "--max-rounds",
            "9",
            "--min-rounds",
            "2",
            "--peer-timeout-s",
            "5",
            "--hint-wait-ms",
            "10",
            "--mode",
            "postcopy",
            "--postcopy-recovery-s",
            "7",
        ])
        .unwrap();
        let p = t.p.resolve(None).unwrap().params;
        assert_eq!(
            p,
            MigrationParams {
                bulk_channels: 3,
                batch_bytes: 8192,
                downtime_target_ms: 50,
                max_rounds: 9,
                min_rounds: 2,
                hints: true,
                peer_timeout_s: 5,
                hint_wait_ms: 10,
                mode: MigrationMode::Postcopy,
                postcopy_recovery_s: 7,
            }
        );
    }

    #[test]
    fn send_refuses_a_file_that_turns_hints_on() {
        let f = file("hints = true\n");
        let e = args(Some(f.path())).resolve_without_hints().unwrap_err();
        assert!(e.to_string().contains("hints = true"), "{e}");
        assert!(!args(None).resolve_without_hints().unwrap().hints);
    }

    #[test]
    fn every_parameter_has_a_unit_and_a_row_and_the_toml_reads_back() {
        for k in keys() {
            assert!(unit(&k).is_some(), "no unit for {k}");
        }
        let r = args(None).resolve(None).unwrap();
        let t = table(&r).unwrap();
        for k in keys() {
            assert!(t.lines().any(|l| l.starts_with(&k)), "{k} missing:\n{t}");
        }
        assert!(
            t.contains("downtime_target_ms") && t.contains(" ms "),
            "{t}"
        );
        let f = file(&toml::to_string(&r.params).unwrap());
        assert_eq!(load_config(f.path()).unwrap().0, r.params);
    }

    #[test]
    fn a_missing_file_is_one_clear_line() {
        let e = args(Some(Path::new("/nonexistent/x.toml")))
            .resolve(None)
            .unwrap_err();
        let line = crate::one_line(&e);
        assert!(
            line.contains("/nonexistent/x.toml") && !line.contains('\n'),
            "{line}"
        );
    }
}
