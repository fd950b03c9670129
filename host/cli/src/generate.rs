//! `freehint completions` and `freehint man`: shell completions and man
//! pages generated from the command line definition, so they never
//! disagree with `--help`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use clap_complete::Shell;

pub const COMPLETIONS_EXAMPLE: &str = "\
Examples:
  freehint completions bash > /usr/share/bash-completion/completions/freehint
  freehint completions zsh > /usr/local/share/zsh/site-functions/_freehint
  freehint completions fish > ~/.config/fish/completions/freehint.fish
  source <(freehint completions bash)          # this shell only

`make install` installs the bash, zsh and fish completions.";

pub const MAN_EXAMPLE: &str = "\
Examples:
  freehint man | man -l -                      # read it now
  freehint man --out-dir /usr/local/share/man/man1

With --out-dir it writes freehint.1 and one page per command
(freehint-migrate.1, freehint-status.1, ...); `make install` does that.";

/// Arguments of `freehint completions`.
#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell.
    #[arg(value_enum)]
    shell: Shell,
}

/// Arguments of `freehint man`.
#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write freehint.1 and a page per command into this directory
    /// (created if missing) instead of printing freehint.1.
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

/// `freehint completions SHELL`: the script on stdout.
pub fn completions(a: CompletionsArgs) -> Result<()> {
    let mut cmd = crate::cli_command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(a.shell, &mut cmd, "freehint", &mut out);
    Ok(())
}

/// `freehint man`.
pub fn man(a: ManArgs) -> Result<()> {
    let cmd = crate::cli_command();
    match a.out_dir {
        None => {
            let mut out = std::io::stdout().lock();
            clap_mangen::Man::new(cmd)
                .render(&mut out)
                .context("writing the man page")?;
        }
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(cmd, &dir)
                .with_context(|| format!("writing the man pages to {}", dir.display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_know_every_command_and_the_new_flags() {
        let mut cmd = crate::cli_command();
        let mut out = Vec::new();
        clap_complete::generate(Shell::Bash, &mut cmd, "freehint", &mut out);
        let script = String::from_utf8(out).unwrap();
        for word in [
            "migrate",
            "status",
            "qemu-args",
            "completions",
            "--json-progress",
            "--config",
            "--mem-mib",
        ] {
            assert!(script.contains(word), "{word} missing");
        }
    }

    #[test]
    fn man_pages_are_written_for_every_command() {
        let dir = tempfile::tempdir().unwrap();
        man(ManArgs {
            out_dir: Some(dir.path().join("man1")),
        })
        .unwrap();
        let main = std::fs::read_to_string(dir.path().join("man1/freehint.1")).unwrap();
        assert!(
            main.starts_with(".ie") || main.contains(".TH freehint 1"),
            "{main}"
        );
        assert!(main.contains("qemu\\-args"), "{main}");
        let migrate = std::fs::read_to_string(dir.path().join("man1/freehint-migrate.1")).unwrap();
        // The flags' defaults from MigrationParams are in the page too.
        assert!(migrate.contains("downtime\\-target\\-ms"), "{migrate}");
        assert!(migrate.contains("[default: 300]"), "{migrate}");
        assert!(dir.path().join("man1/freehint-config-show.1").exists());
    }
}
