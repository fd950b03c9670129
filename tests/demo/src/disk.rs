//! A virtio-blk disk for the test guest: an ext4 image of files with known
//! content, which the guest's `fh-diskcheck` reads and checks over and over
//! (guest-driver/programs/fh-diskcheck.c), so a test can see the guest's
//! disk I/O go on, intact, across a migration.
//!
//! [`make_disk_image`] writes the image; a [`DiskConfig`] in
//! [`DemoSetup::disk`](crate::DemoSetup::disk) attaches it to every QEMU of
//! a run (source and destination share the one file, as with shared storage
//! in a real migration), boots the guest image's disk variant
//! ([`DiskConfig::guest_dir`]) and puts [`DiskConfig::KERNEL_OPTION`] on the
//! guest's command line;
//! [`QemuGuest::disk_checks_ok`](crate::QemuGuest::disk_checks_ok) reads the
//! guest's `freehint-disk ok N` lines.
//!
//! The disk's `MANIFEST` has one line per file: `NAME SIZE CHECKSUM`, the
//! size in bytes and the checksum [`fnv1a64`] of the file's bytes as 16 hex
//! digits.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{io, DemoError};

/// How QEMU caches the disk image on the host (`-drive cache=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskCache {
    /// `cache=none`: the image is opened with `O_DIRECT`, past the host's
    /// page cache (needed by [`DiskAio::Native`]).
    None,
    /// `cache=writeback`: through the host's page cache.
    Writeback,
}

impl DiskCache {
    /// QEMU's name for it.
    pub fn qemu_value(self) -> &'static str {
        match self {
            DiskCache::None => "none",
            DiskCache::Writeback => "writeback",
        }
    }
}

/// How QEMU submits the disk's I/O on the host (`-drive aio=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskAio {
    /// `aio=threads`: a pool of threads doing blocking reads and writes.
    Threads,
    /// `aio=native`: Linux AIO (`io_submit`); QEMU accepts it only with
    /// [`DiskCache::None`].
    Native,
    /// `aio=io_uring`: Linux io_uring.
    IoUring,
}

impl DiskAio {
    /// QEMU's name for it.
    pub fn qemu_value(self) -> &'static str {
        match self {
            DiskAio::Threads => "threads",
            DiskAio::Native => "native",
            DiskAio::IoUring => "io_uring",
        }
    }
}

/// A disk for the guest: a raw image (from [`make_disk_image`]) on a
/// virtio-blk device, which the guest mounts read-only at `/mnt/disk` and
/// checks with `fh-diskcheck`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw ext4 image; every QEMU of the run opens this same file.
    pub image: PathBuf,
    /// The host cache mode.
    pub cache: DiskCache,
    /// The host I/O mode.
    pub aio: DiskAio,
}

impl DiskConfig {
    /// The guest kernel option that makes tests/guest/init.sh mount the disk
    /// and start `fh-diskcheck`.
    pub const KERNEL_OPTION: &'static str = "freehint.disk=1";

    /// The guest image folder a guest with a disk boots: `disk/` in the
    /// folder tests/guest/build-guest-image.sh prints, whose initramfs adds
    /// the disk's kernel modules and `fh-diskcheck` (the plain one lacks
    /// them, so that a guest without a disk has nothing more in memory).
    pub fn guest_dir(guest_dir: &Path) -> PathBuf {
        guest_dir.join("disk")
    }

    /// Adds the drive and its device to a QEMU command line:
    /// `-drive file=IMAGE,if=none,id=disk0,format=raw,cache=…,aio=…
    /// -device virtio-blk-pci,drive=disk0,id=vblk0`.
    pub fn qemu_args(&self, cmd: &mut Command) {
        cmd.arg("-drive")
            .arg(format!(
                "file={},if=none,id=disk0,format=raw,cache={},aio={}",
                // QEMU's option syntax doubles a comma inside a value.
                self.image.display().to_string().replace(',', ",,"),
                self.cache.qemu_value(),
                self.aio.qemu_value()
            ))
            .args(["-device", "virtio-blk-pci,drive=disk0,id=vblk0"]);
    }
}

/// One file on the disk, as its `MANIFEST` line gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskFile {
    /// The file's name in the image's root folder.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// [`fnv1a64`] of its bytes.
    pub checksum: u64,
}

/// FNV-1a's 64-bit offset basis: the checksum of no bytes.
pub const FNV1A64_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV1A64_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The 64-bit FNV-1a hash of `data`, continuing from `hash` (start with
/// [`FNV1A64_BASIS`]): for each byte `b`, `hash ^= b; hash *= 0x100000001b3`
/// (wrapping). The guest's `fh-diskcheck` computes the same.
pub fn fnv1a64(mut hash: u64, data: &[u8]) -> u64 {
    for &b in data {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV1A64_PRIME);
    }
    hash
}

/// splitmix64: the files' pseudo-random content.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Finds mkfs.ext4 also where a non-root `PATH` does not look.
fn mkfs_ext4() -> Result<PathBuf, DemoError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join("mkfs.ext4"))
        .find(|p| p.is_file())
        .ok_or_else(|| DemoError::Io {
            what: "making a disk image".into(),
            source: std::io::Error::other(
                "mkfs.ext4 not found: install e2fsprogs (tests/scripts/setup-host.sh does)",
            ),
        })
}

/// Writes `image`: an ext4 file system (made with `mkfs.ext4 -d`, no
/// mounting) holding `files` files of deterministic pseudo-random content
/// (`file-000.bin`, … of varied sizes, `total_bytes` in all; the same
/// arguments give the same files) and their `MANIFEST`. The image is a
/// little larger than `total_bytes`, for the file system's own blocks.
/// Returns the files as the `MANIFEST` lists them.
pub fn make_disk_image(
    image: &Path,
    files: usize,
    total_bytes: u64,
) -> Result<Vec<DiskFile>, DemoError> {
    let mkfs = mkfs_ext4()?;
    let files = files.max(1);
    let dir = tempfile::Builder::new()
        .prefix("freehint-disk")
        .tempdir()
        .map_err(io("creating a folder for the disk's files"))?;
    // Sizes: weights in [1, 2), scaled to total_bytes; the last file takes
    // what rounding left.
    let mut seed = 0x00f1_ee41_d15c_u64;
    let weights: Vec<u64> = (0..files)
        .map(|_| 1024 + splitmix64(&mut seed) % 1024)
        .collect();
    let sum: u64 = weights.iter().sum();
    let mut sizes: Vec<u64> = weights
        .iter()
        .map(|&w| (u128::from(total_bytes) * u128::from(w) / u128::from(sum)) as u64)
        .collect();
    let rest = total_bytes - sizes.iter().sum::<u64>();
    *sizes.last_mut().expect("at least one file") += rest;

    let mut manifest = String::new();
    let mut out = Vec::with_capacity(files);
    let mut chunk = vec![0u8; 1 << 20];
    for (i, &size) in sizes.iter().enumerate() {
        let name = format!("file-{i:03}.bin");
        let path = dir.path().join(&name);
        let mut f =
            std::fs::File::create(&path).map_err(io(format!("creating {}", path.display())))?;
        let mut state = (i as u64 + 1).wrapping_mul(0xd6e8_feb8_6659_fd93);
        let (mut left, mut checksum) = (size, FNV1A64_BASIS);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            for word in chunk[..n].chunks_mut(8) {
                let r = splitmix64(&mut state).to_le_bytes();
                word.copy_from_slice(&r[..word.len()]);
            }
            checksum = fnv1a64(checksum, &chunk[..n]);
            f.write_all(&chunk[..n])
                .map_err(io(format!("writing {}", path.display())))?;
            left -= n as u64;
        }
        manifest.push_str(&format!("{name} {size} {checksum:016x}\n"));
        out.push(DiskFile {
            name,
            size,
            checksum,
        });
    }
    let path = dir.path().join("MANIFEST");
    std::fs::write(&path, manifest).map_err(io(format!("writing {}", path.display())))?;

    // Room for the file system: inode tables, the journal, bitmaps.
    let mib = (total_bytes + total_bytes / 8) / (1 << 20) + 16;
    let _ = std::fs::remove_file(image);
    let result = Command::new(&mkfs)
        .args(["-q", "-F", "-b", "4096", "-L", "freehint", "-d"])
        .arg(dir.path())
        .arg(image)
        .arg(format!("{mib}M"))
        .output()
        .map_err(io(format!("running {}", mkfs.display())))?;
    if !result.status.success() {
        return Err(DemoError::Io {
            what: format!("making the disk image {}", image.display()),
            source: std::io::Error::other(format!(
                "mkfs.ext4 failed: {}",
                String::from_utf8_lossy(&result.stderr).trim()
            )),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_the_reference_values() {
        // From the FNV reference test vectors.
        assert_eq!(fnv1a64(FNV1A64_BASIS, b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a64(FNV1A64_BASIS, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a64(FNV1A64_BASIS, b"foobar"), 0x8594_4171_f739_67e8);
        // Continuing a hash is hashing the concatenation.
        assert_eq!(
            fnv1a64(fnv1a64(FNV1A64_BASIS, b"foo"), b"bar"),
            fnv1a64(FNV1A64_BASIS, b"foobar")
        );
    }

    #[test]
    fn qemu_drive_options() {
        let d = DiskConfig {
            image: "/tmp/a,b.img".into(),
            cache: DiskCache::None,
            aio: DiskAio::IoUring,
        };
        let mut cmd = Command::new("qemu");
        d.qemu_args(&mut cmd);
        let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy()).collect();
        assert_eq!(
            args,
            [
                "-drive",
                "file=/tmp/a,,b.img,if=none,id=disk0,format=raw,cache=none,aio=io_uring",
                "-device",
                "virtio-blk-pci,drive=disk0,id=vblk0"
            ]
        );
    }

    #[test]
    fn image_holds_the_files_and_their_manifest() {
        if mkfs_ext4().is_err() {
            eprintln!("SKIPPED: no mkfs.ext4 (install e2fsprogs)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        let files = make_disk_image(&img, 5, 3 << 20).unwrap();
        assert_eq!(files.len(), 5);
        assert_eq!(files.iter().map(|f| f.size).sum::<u64>(), 3 << 20);
        assert!(files.iter().all(|f| f.size > 0));
        // Deterministic.
        let again = make_disk_image(&dir.path().join("again.img"), 5, 3 << 20).unwrap();
        assert_eq!(files, again);
        // An ext4 superblock: magic 0xef53 at byte 1024 + 56.
        let head = std::fs::read(&img).unwrap();
        assert_eq!(&head[1080..1082], &[0x53, 0xef]);
        // What the guest reads back: the MANIFEST and a file (debugfs is
        // in e2fsprogs too).
        let cat = |name: &str| {
            let debugfs = mkfs_ext4().unwrap().with_file_name("debugfs");
            let out = Command::new(debugfs)
                .args(["-R", &format!("cat /{name}")])
                .arg(&img)
                .output()
                .unwrap();
            assert!(out.status.success());
            out.stdout
        };
        let manifest = String::from_utf8(cat("MANIFEST")).unwrap();
        let f = &files[3];
        assert_eq!(
            manifest.lines().nth(3).unwrap(),
            format!("{} {} {:016x}", f.name, f.size, f.checksum)
        );
        let data = cat(&f.name);
        assert_eq!(data.len() as u64, f.size);
        assert_eq!(fnv1a64(FNV1A64_BASIS, &data), f.checksum);
    }
}
