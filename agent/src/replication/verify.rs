//! Verify jobs at the destination: every (or a sample of every) published
//! snapshot's files re-read and compared with its manifest, to find bit
//! rot before a restore needs the copy. A damaged file is narrowed down to
//! its damaged chunks, which the caller may fetch again from the source and
//! write back in place (the file is shared by every snapshot that links it,
//! and all of them are repaired at once).

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use dicops_proto::{ChunkRef, ManifestEntry};

use super::chunks::chunk_offsets;
use super::snapshot::read_manifest;

/// A file whose content no longer matches its manifest.
#[derive(Debug, Clone)]
pub struct Damage {
    /// `SNAPSHOT/PATH`, for the report.
    pub shown: String,
    pub file: PathBuf,
    pub blake3: String,
    /// The chunks that no longer hash to their id: (offset, chunk).
    pub chunks: Vec<(u64, ChunkRef)>,
}

#[derive(Debug, Default)]
pub struct Checked {
    pub snapshots: u64,
    pub files: u64,
    pub bytes: u64,
    pub damaged: Vec<Damage>,
}

/// Whether `path` is in the sample of this verify run: deterministic for a
/// run, different from run to run, so repeated sampled verifies cover the
/// whole snapshot over time.
fn sampled(path: &str, run_id: i64, percent: u32) -> bool {
    if percent >= 100 {
        return true;
    }
    let hash = blake3::hash(format!("{run_id}/{path}").as_bytes());
    let bytes = hash.as_bytes();
    (u32::from(bytes[0]) << 8 | u32::from(bytes[1])) % 100 < percent
}

fn hash_range(file: &mut fs::File, offset: u64, len: u32) -> std::io::Result<String> {
    file.seek(SeekFrom::Start(offset))?;
    let mut buffer = vec![0u8; len as usize];
    file.read_exact(&mut buffer)?;
    Ok(blake3::hash(&buffer).to_hex().to_string())
}

/// The chunks of a damaged file that no longer hash to their id (all of
/// them when the file cannot be read at all, or is too short).
fn damaged_chunks(path: &Path, entry: &ManifestEntry) -> Vec<(u64, ChunkRef)> {
    let Ok(mut file) = fs::File::open(path) else {
        return chunk_offsets(entry).map(|(o, c)| (o, c.clone())).collect();
    };
    chunk_offsets(entry)
        .filter(|(offset, chunk)| !matches!(hash_range(&mut file, *offset, chunk.len), Ok(h) if h == chunk.id))
        .map(|(o, c)| (o, c.clone()))
        .collect()
}

/// Re-reads the snapshots of the job folder `job_dir`. A file linked into
/// several snapshots is read once.
pub fn check(job_dir: &Path, run_id: i64, percent: u32, mut reading: impl FnMut(&str)) -> Result<Checked, String> {
    let mut checked = Checked::default();
    let snapshots = job_dir.join("snapshots");
    let mut names: Vec<String> = fs::read_dir(&snapshots)
        .map_err(|e| format!("cannot list {}: {e}", snapshots.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .collect();
    names.sort();
    // (device, inode) -> whether it matched
    let mut seen: HashMap<(u64, u64), bool> = HashMap::new();
    for name in names {
        reading(&name);
        let manifest = job_dir.join("manifests").join(format!("{name}.ndjson"));
        let (_, entries) = read_manifest(&manifest)?;
        checked.snapshots += 1;
        for entry in entries.iter().filter(|e| sampled(&e.path, run_id, percent)) {
            let path = snapshots.join(&name).join(&entry.path);
            let key = fs::metadata(&path).map(|m| (m.dev(), m.ino())).ok();
            let good = match key.and_then(|k| seen.get(&k).copied()) {
                Some(good) => good,
                None => {
                    checked.files += 1;
                    checked.bytes += entry.size;
                    let good = matches!(crate::backup::scan::hash_file(&path), Ok(h) if h == entry.blake3);
                    if let Some(k) = key {
                        seen.insert(k, good);
                    }
                    good
                }
            };
            if !good {
                checked.damaged.push(Damage {
                    shown: format!("{name}/{}", entry.path),
                    file: path.clone(),
                    blake3: entry.blake3.clone(),
                    chunks: damaged_chunks(&path, entry),
                });
            }
        }
    }
    Ok(checked)
}

/// Writes good chunks back into a damaged file, then checks the whole
/// file. The file keeps its inode (so every snapshot linking it is
/// repaired), its mode and its mtime.
pub fn repair(damage: &Damage, chunks: &HashMap<String, Vec<u8>>) -> Result<(), String> {
    let path = &damage.file;
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode();
    let mtime = meta.modified().map_err(|e| e.to_string())?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o200)).map_err(|e| e.to_string())?;
    let written = (|| -> std::io::Result<()> {
        let mut file = fs::OpenOptions::new().write(true).open(path)?;
        for (offset, chunk) in &damage.chunks {
            if let Some(bytes) = chunks.get(&chunk.id) {
                file.seek(SeekFrom::Start(*offset))?;
                file.write_all(bytes)?;
            }
        }
        file.sync_all()?;
        file.set_modified(mtime)
    })();
    let restored = fs::set_permissions(path, fs::Permissions::from_mode(mode));
    written.map_err(|e| format!("cannot repair {}: {e}", path.display()))?;
    restored.map_err(|e| e.to_string())?;
    match crate::backup::scan::hash_file(path) {
        Ok(hash) if hash == damage.blake3 => Ok(()),
        _ => Err(format!(
            "{} still differs from its manifest after the repair",
            damage.shown
        )),
    }
}

/// While a verify reads a snapshot, a marker names it, so that retention
/// at the next publish does not delete it under the reader. Markers older
/// than this are left behind by a crash and ignored.
const MARKER_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

pub fn marker(job_dir: &Path, run_id: i64) -> PathBuf {
    job_dir.join(format!(".verifying-{run_id}"))
}

/// The snapshots being read by verify runs now.
pub fn in_use(job_dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(job_dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".verifying-"))
        .filter(|e| {
            e.metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < MARKER_MAX_AGE)
        })
        .filter_map(|e| fs::read_to_string(e.path()).ok())
        .map(|name| name.trim().to_string())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_stable_within_a_run_and_moves_between_runs() {
        let paths: Vec<String> = (0..1000).map(|i| format!("f{i}")).collect();
        let count = |run| paths.iter().filter(|p| sampled(p, run, 10)).count();
        assert!((50..150).contains(&count(1)), "about 10%: {}", count(1));
        assert_eq!(count(1), count(1));
        let first: Vec<&String> = paths.iter().filter(|p| sampled(p, 1, 10)).collect();
        let second: Vec<&String> = paths.iter().filter(|p| sampled(p, 2, 10)).collect();
        assert_ne!(first, second);
        assert!(paths.iter().all(|p| sampled(p, 3, 100)));
    }
}
