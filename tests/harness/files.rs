//! Files for replication tests: incompressible data, trees compared byte
//! for byte, and snapshots checked against their manifests.

use std::path::Path;
use std::time::Duration;

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
