//! `freehint qemu-args`: the QEMU command-line fragment that attaches a
//! guest to freehint, as tests/demo starts QEMU, so that nobody has to
//! assemble it from the docs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;

pub const QEMU_ARGS_EXAMPLE: &str = "\
Examples:
  freehint qemu-args --ram /dev/shm/a.ram --mem-mib 2048 --vhost-socket /run/fh/a.vhost \\
      --qmp /run/fh/a.qmp
  freehint qemu-args --ram /dev/hugepages/b.ram --mem-mib 2048 --vhost-socket /run/fh/b.vhost \\
      --qmp /run/fh/b.qmp --incoming                   # the destination
  freehint qemu-args ... --format json | jq -r '.args[]'

prints, ready to paste (append your own options: -machine q35, -smp, disks,
network...; the QEMU must be the patched build of tests/qemu, docs/QEMU.md):

  LD_PRELOAD=/usr/local/lib/freehint/libfreehint_preload.so \\
  qemu-system-x86_64 \\
      -object memory-backend-file,id=mem0,size=2048M,mem-path=/dev/shm/a.ram,share=on \\
      -machine memory-backend=mem0 \\
      -m 2048M \\
      -chardev socket,id=fh0,path=/run/fh/a.vhost \\
      -device vhost-user-device-pci,chardev=fh0,virtio-id=5,num_vqs=5,config_size=16 \\
      -qmp unix:/run/fh/a.qmp,server=on,wait=off

With --agent-socket PATH it adds the virtio-serial port of freehint's guest
agent (virtio-serial-pci, and a virtserialport named org.freehint.agent.0
that QEMU serves on PATH; give the daemon the same --agent-socket).

Guest RAM must be a file on tmpfs (/dev/shm) or hugetlbfs (a mount such as
/dev/hugepages; --mem-mib a multiple of its page size), shared with the
daemon: both are checked when the directory exists on this host. Start
`freehint vm` first: QEMU connects to its vhost-user socket.";

/// How `qemu-args` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// A shell command line: the LD_PRELOAD line, the QEMU binary, then
    /// one option and its value per line, with backslashes.
    Shell,
    /// `{"env":{"LD_PRELOAD":…},"args":[…]}`, the exact argv values.
    Json,
}

/// Arguments of `freehint qemu-args`.
#[derive(Args, Debug)]
pub struct QemuArgsArgs {
    /// The guest RAM file QEMU maps shared (on tmpfs or hugetlbfs; QEMU
    /// creates it if missing).
    #[arg(long, value_name = "PATH")]
    ram: PathBuf,
    /// Guest RAM size in MiB (the memory backend's size and -m).
    #[arg(long, value_name = "MIB", value_parser = clap::value_parser!(u64).range(1..))]
    mem_mib: u64,
    /// The daemon's vhost-user socket (`freehint vm --vhost-socket`).
    #[arg(long, value_name = "PATH")]
    vhost_socket: PathBuf,
    /// QEMU's QMP socket (`freehint vm --qmp`): adds -qmp.
    #[arg(long, value_name = "PATH")]
    qmp: Option<PathBuf>,
    /// The socket of the guest agent's virtio-serial port (`freehint vm
    /// --agent-socket`): adds virtio-serial-pci and the port
    /// org.freehint.agent.0, QEMU serving it on PATH.
    #[arg(long, value_name = "PATH")]
    agent_socket: Option<PathBuf>,
    /// For the destination QEMU: adds -incoming defer.
    #[arg(long)]
    incoming: bool,
    /// The preload library [default: libfreehint_preload.so next to this
    /// binary, or in ../lib/freehint/ as `make install` puts it].
    #[arg(long, value_name = "PATH")]
    preload: Option<PathBuf>,
    /// The QEMU binary on the shell command line.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Shell)]
    format: Format,
}

/// The fragment: environment and arguments.
#[derive(Debug, PartialEq, Eq, Serialize)]
pub struct Fragment {
    /// `LD_PRELOAD`.
    pub env: std::collections::BTreeMap<&'static str, String>,
    /// QEMU's arguments, exact argv values.
    pub args: Vec<String>,
}

/// A path as a value inside a QEMU option list, where a comma is written
/// twice.
fn qemu_value(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

/// The name of the guest agent's virtio-serial port.
pub const AGENT_PORT_NAME: &str = "org.freehint.agent.0";

/// QEMU's options for the guest agent's virtio-serial port, served on the
/// socket `path`.
pub fn agent_port_args(path: &Path) -> Vec<String> {
    vec![
        "-device".into(),
        "virtio-serial-pci,id=fhserial".into(),
        "-chardev".into(),
        format!(
            "socket,id=fhagent,path={},server=on,wait=off",
            qemu_value(path)
        ),
        "-device".into(),
        format!("virtserialport,bus=fhserial.0,chardev=fhagent,name={AGENT_PORT_NAME}"),
    ]
}

/// The arguments for `a`, with the preload library at `preload`.
pub fn fragment(a: &QemuArgsArgs, preload: &Path) -> Fragment {
    let mib = a.mem_mib;
    let mut args = vec![
        "-object".to_string(),
        format!(
            "memory-backend-file,id=mem0,size={mib}M,mem-path={},share=on",
            qemu_value(&a.ram)
        ),
        "-machine".into(),
        "memory-backend=mem0".into(),
        "-m".into(),
        format!("{mib}M"),
        "-chardev".into(),
        format!("socket,id=fh0,path={}", qemu_value(&a.vhost_socket)),
        "-device".into(),
        "vhost-user-device-pci,chardev=fh0,virtio-id=5,num_vqs=5,config_size=16".into(),
    ];
    if let Some(agent) = &a.agent_socket {
        args.extend(agent_port_args(agent));
    }
    if let Some(qmp) = &a.qmp {
        args.push("-qmp".into());
        args.push(format!("unix:{},server=on,wait=off", qemu_value(qmp)));
    }
    if a.incoming {
        args.extend(["-incoming".into(), "defer".into()]);
    }
    Fragment {
        env: [("LD_PRELOAD", preload.display().to_string())].into(),
        args,
    }
}

/// The fragment as a shell command line.
pub fn shell(f: &Fragment, qemu: &str) -> String {
    // shell_words quotes `=` and `,` too, which the shell takes literally
    // in an argument: QEMU's option lists stay readable without quotes.
    let q = |s: &str| -> String {
        let plain = |c: char| c.is_ascii_alphanumeric() || "_@%+=:,./-".contains(c);
        if !s.is_empty() && s.chars().all(plain) {
            s.to_string()
        } else {
            shell_words::quote(s).into_owned()
        }
    };
    let mut lines: Vec<String> = f.env.iter().map(|(k, v)| format!("{k}={}", q(v))).collect();
    lines.push(q(qemu));
    let mut it = f.args.iter().peekable();
    while let Some(opt) = it.next() {
        let mut line = format!("    {}", q(opt));
        if let Some(v) = it.next_if(|v| !v.starts_with('-')) {
            line.push(' ');
            line.push_str(&q(v));
        }
        lines.push(line);
    }
    lines.join(" \\\n") + "\n"
}

/// The preload library: next to this binary (a cargo build), or in
/// `../lib/freehint/` (an installed one).
fn default_preload() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the freehint binary")?;
    let dir = exe
        .parent()
        .context("the freehint binary has no directory")?;
    let candidates = [
        dir.join("libfreehint_preload.so"),
        dir.join("../lib/freehint/libfreehint_preload.so"),
    ];
    for c in &candidates {
        if c.exists() {
            return Ok(c.canonicalize().unwrap_or_else(|_| c.clone()));
        }
    }
    bail!(
        "libfreehint_preload.so is neither in {} nor in {}; build it (cargo build -p freehint-preload), install it (make install), or pass --preload PATH",
        dir.display(),
        dir.join("../lib/freehint").display()
    )
}

const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The file system type and block size of `dir`, or `None` if it does not
/// exist here.
fn fs_of(dir: &Path) -> Result<Option<(i64, u64)>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .with_context(|| format!("{} contains a NUL byte", dir.display()))?;
    // SAFETY: statfs is plain data that the call fills in; `c` is a valid
    // NUL-terminated path that outlives the call.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: see above; both pointers are valid for the call.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::NotFound {
            return Ok(None);
        }
        return Err(e).with_context(|| format!("statfs {}", dir.display()));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between libcs
    Ok(Some((st.f_type as i64, st.f_bsize as u64)))
}

/// Refuses what QEMU or freehint could not use: a directory as the RAM
/// file, a file system other than tmpfs and hugetlbfs, a size that is not
/// a whole number of huge pages.
fn check_ram(ram: &Path, mem_mib: u64) -> Result<()> {
    if ram.is_dir() {
        bail!(
            "--ram {} is a directory; give a file path in it (QEMU would create a hidden file the daemon cannot find)",
            ram.display()
        );
    }
    let dir = match ram.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    check_fs(dir, fs_of(dir)?, mem_mib)
}

/// [`check_ram`] for `dir`, whose file system is `fs` (type, block size).
fn check_fs(dir: &Path, fs: Option<(i64, u64)>, mem_mib: u64) -> Result<()> {
    match fs {
        None => crate::progress::eprint_line(format!(
            "freehint: note: {} does not exist on this host; its file system is not checked",
            dir.display()
        )),
        Some((HUGETLBFS_MAGIC, page_bytes)) => {
            // Huge page sizes are powers of two.
            if (mem_mib << 20) & (page_bytes - 1) != 0 {
                bail!(
                    "--mem-mib {mem_mib} is not a whole number of the {} MiB huge pages of {}",
                    page_bytes >> 20,
                    dir.display()
                );
            }
        }
        Some((TMPFS_MAGIC, _)) => {}
        Some(_) => bail!(
            "{} is neither tmpfs nor hugetlbfs: guest RAM for freehint must be a shared file there (e.g. /dev/shm/NAME.ram or a hugetlbfs mount)",
            dir.display()
        ),
    }
    Ok(())
}

/// `path` made absolute: QEMU, the daemon and this command may each run
/// in another directory.
fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("the absolute path of {}", path.display()))
}

/// `freehint qemu-args`.
pub fn qemu_args(mut a: QemuArgsArgs) -> Result<()> {
    a.ram = absolute(&a.ram)?;
    a.vhost_socket = absolute(&a.vhost_socket)?;
    a.qmp = a.qmp.as_deref().map(absolute).transpose()?;
    check_ram(&a.ram, a.mem_mib)?;
    let preload = match &a.preload {
        Some(p) => absolute(p)?,
        None => default_preload()?,
    };
    let f = fragment(&a, &preload);
    match a.format {
        Format::Shell => print!("{}", shell(&f, &a.qemu)),
        Format::Json => println!("{}", serde_json::to_string(&f)?),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(extra: &[&str]) -> QemuArgsArgs {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: QemuArgsArgs,
        }
        let mut argv = vec![
            "t",
            "--ram",
            "/dev/shm/a.ram",
            "--mem-mib",
            "2048",
            "--vhost-socket",
            "/run/fh/a.vhost",
        ];
        argv.extend_from_slice(extra);
        T::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn the_shell_form_is_one_option_per_line_and_runs_as_is() {
        let a = args(&["--qmp", "/run/fh/a.qmp", "--incoming"]);
        let f = fragment(&a, Path::new("/usr/lib/freehint/libfreehint_preload.so"));
        assert_eq!(
            shell(&f, &a.qemu),
            "\
LD_PRELOAD=/usr/lib/freehint/libfreehint_preload.so \\
qemu-system-x86_64 \\
    -object memory-backend-file,id=mem0,size=2048M,mem-path=/dev/shm/a.ram,share=on \\
    -machine memory-backend=mem0 \\
    -m 2048M \\
    -chardev socket,id=fh0,path=/run/fh/a.vhost \\
    -device vhost-user-device-pci,chardev=fh0,virtio-id=5,num_vqs=5,config_size=16 \\
    -qmp unix:/run/fh/a.qmp,server=on,wait=off \\
    -incoming defer
"
        );
        // The shell reads it back as the same argv.
        let words = shell_words::split(&shell(&f, "qemu")).unwrap();
        assert_eq!(words[0], format!("LD_PRELOAD={}", f.env["LD_PRELOAD"]));
        assert_eq!(&words[2..], f.args.as_slice());
    }

    #[test]
    fn the_agent_socket_adds_the_agent_port_served_by_qemu() {
        let a = args(&["--agent-socket", "/run/fh/a,1.agent"]);
        let f = fragment(&a, Path::new("/p.so"));
        let joined = f.args.join(" ");
        assert!(
            joined.contains("-device virtio-serial-pci,id=fhserial"),
            "{joined}"
        );
        assert!(
            joined
                .contains("-chardev socket,id=fhagent,path=/run/fh/a,,1.agent,server=on,wait=off"),
            "{joined}"
        );
        assert!(
            joined.contains(
                "-device virtserialport,bus=fhserial.0,chardev=fhagent,name=org.freehint.agent.0"
            ),
            "{joined}"
        );
        assert!(!fragment(&args(&[]), Path::new("/p.so"))
            .args
            .join(" ")
            .contains("virtserialport"));
    }

    #[test]
    fn odd_paths_are_quoted_for_the_shell_and_commas_doubled_for_qemu() {
        let mut a = args(&[]);
        a.ram = PathBuf::from("/dev/shm/my vm,1.ram");
        let f = fragment(&a, Path::new("/opt/free hint/libfreehint_preload.so"));
        assert!(f.args[1].contains("mem-path=/dev/shm/my vm,,1.ram,share=on"));
        let words = shell_words::split(&shell(&f, "qemu")).unwrap();
        assert_eq!(words[0], "LD_PRELOAD=/opt/free hint/libfreehint_preload.so");
        assert_eq!(&words[2..], f.args.as_slice());
    }

    #[test]
    fn ram_that_freehint_cannot_use_is_refused() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        check_ram(&dir.path().join("vm.ram"), 1024).unwrap();
        let e = check_ram(dir.path(), 1024).unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        // /proc is neither tmpfs nor hugetlbfs.
        let e = check_ram(Path::new("/proc/vm.ram"), 1024)
            .unwrap_err()
            .to_string();
        assert!(e.contains("neither tmpfs nor hugetlbfs"), "{e}");
        // A directory elsewhere cannot be checked, which is no error.
        check_ram(Path::new("/nonexistent-dir/vm.ram"), 1024).unwrap();
    }

    #[test]
    fn on_hugetlbfs_the_size_must_be_whole_huge_pages() {
        let dir = Path::new("/dev/hugepages");
        check_fs(dir, Some((HUGETLBFS_MAGIC, 2 << 20)), 1024).unwrap();
        let e = check_fs(dir, Some((HUGETLBFS_MAGIC, 1 << 30)), 1536)
            .unwrap_err()
            .to_string();
        assert!(e.contains("1024 MiB huge pages of /dev/hugepages"), "{e}");
        check_fs(dir, Some((TMPFS_MAGIC, 4096)), 1).unwrap();
    }
}
