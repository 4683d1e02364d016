//! Files for replication tests: incompressible data, trees compared byte
//! for byte, and snapshots checked against their manifests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::run_ok;

/// Incompressible bytes (xorshift), the same for the same seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

pub fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write");
}

/// Writes a file as a backup tool would have an hour ago: the source
/// trusts its chunk cache only for files not modified in the last seconds.
pub fn write_old(path: &Path, bytes: &[u8]) {
    write(path, bytes);
    let file = std::fs::File::options().write(true).open(path).expect("open");
    file.set_modified(std::time::SystemTime::now() - Duration::from_secs(3600))
        .expect("mtime");
}

/// Every regular file under `dir`, relative, sorted, with its content.
pub fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            let meta = std::fs::symlink_metadata(&path).expect("meta");
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(dir).expect("rel").to_string_lossy().into_owned();
                out.push((rel, std::fs::read(&path).expect("read")));
            }
        }
    }
    out.sort();
    out
}

/// Every published snapshot of a replication job holds exactly the files
/// and contents its manifest names: none is half a copy.
pub fn assert_snapshots_whole(job_dir: &Path) {
    for entry in std::fs::read_dir(job_dir.join("snapshots")).expect("snapshots") {
        let dir = entry.expect("entry").path();
        let name = dir.file_name().expect("name").to_string_lossy().into_owned();
        let manifest = std::fs::read_to_string(job_dir.join("manifests").join(format!("{name}.ndjson")))
            .unwrap_or_else(|e| panic!("snapshot {name} has no manifest: {e}"));
        let mut expected: Vec<(String, String)> = manifest
            .lines()
            .skip(1)
            .map(|line| {
                let entry: dicops_proto::ManifestEntry = serde_json::from_str(line).expect("entry");
                (entry.path, entry.blake3)
            })
            .collect();
        expected.sort();
        let actual: Vec<(String, String)> = tree(&dir)
            .into_iter()
            .map(|(path, bytes)| (path, blake3::hash(&bytes).to_hex().to_string()))
            .collect();
        assert_eq!(actual, expected, "snapshot {name} is not whole");
    }
}

/// A small disk mounted on a folder, unmounted on drop: a tmpfs of a given
/// size, or an ext4 image on a loop device (which the agent lists among the
/// host's filesystems, as it would a real disk). Needs root.
pub struct SmallDisk(PathBuf);

impl SmallDisk {
    pub fn mount(dir: &Path, size: &str) -> SmallDisk {
        run_ok(
            Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
                .arg(dir),
            "this test mounts a small tmpfs as the destination disk and needs root (CAP_SYS_ADMIN)",
        );
        SmallDisk(dir.to_path_buf())
    }

    /// An ext4 filesystem of `mib` MiB (no blocks reserved for root), in an
    /// image file beside `dir`, loop-mounted on it.
    pub fn mount_ext4(dir: &Path, mib: u64) -> SmallDisk {
        let image = dir.with_extension("img");
        let run = |program: &str, args: &[&str]| {
            run_ok(
                Command::new(program).args(args),
                "this test needs root and e2fsprogs for a loop-mounted disk",
            );
        };
        let image_str = image.to_str().expect("utf8");
        run("truncate", &["-s", &format!("{mib}M"), image_str]);
        run("mkfs.ext4", &["-q", "-F", "-m", "0", image_str]);
        run("mount", &["-o", "loop", image_str, dir.to_str().expect("utf8")]);
        SmallDisk(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        // -d frees a loop device too.
        let _ = Command::new("umount").arg("-l").arg("-d").arg(&self.0).status();
        let _ = std::fs::remove_file(self.0.with_extension("img"));
    }
}
