//! Reading backup folders: which files are there, which ones a run
//! produced, and their BLAKE3 checksums.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use dicops_proto::Artifact;

/// A regular file under a folder.
#[derive(Debug, Clone, PartialEq)]
pub struct FileInfo {
    /// Relative to the folder, `/`-separated.
    pub rel: String,
    pub size: u64,
    /// Modification time, Unix seconds.
    pub mtime: f64,
    pub inode: u64,
}

/// Deeper than any sane backup layout; stops a symlink-free but
/// pathological tree from running away.
const MAX_DEPTH: usize = 16;

fn describe(dir: &Path, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!("folder {} does not exist", dir.display()),
        std::io::ErrorKind::PermissionDenied => {
            format!("folder {} cannot be read: permission denied", dir.display())
        }
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => {
            format!("{} is not a folder", dir.display())
        }
        _ => format!("folder {} cannot be read: {e}", dir.display()),
    }
}

/// Lists the regular files in `dir` (and below it when `recursive`) whose
/// name matches `glob`. Symbolic links are not followed. The error names
/// the folder and the cause.
pub fn list_files(dir: &Path, recursive: bool, glob: Option<&str>) -> Result<Vec<FileInfo>, String> {
    let meta = fs::metadata(dir).map_err(|e| describe(dir, &e))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a folder", dir.display()));
    }
    let mut files = Vec::new();
    let mut stack: Vec<(PathBuf, String, usize)> = vec![(dir.to_path_buf(), String::new(), 0)];
    while let Some((path, prefix, depth)) = stack.pop() {
        let entries = fs::read_dir(&path).map_err(|e| describe(&path, &e))?;
        for entry in entries {
            let entry = entry.map_err(|e| describe(&path, &e))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                tracing::warn!(folder = %path.display(), name = ?entry.file_name(), "skipping a file whose name is not UTF-8");
                continue;
            };
            let rel = if prefix.is_empty() {
                name.clone()
            } else {
                format!("{prefix}/{name}")
            };
            // lstat: a symlink is neither followed nor counted.
            let Ok(meta) = fs::symlink_metadata(entry.path()) else {
                continue; // deleted between the listing and the stat
            };
            if meta.is_dir() {
                if recursive && depth < MAX_DEPTH {
                    stack.push((entry.path(), rel, depth + 1));
                }
                continue;
            }
            if !meta.is_file() || glob.is_some_and(|g| !dicops_core::glob::glob_match(g, &name)) {
                continue;
            }
            files.push(FileInfo {
                rel,
                size: meta.len(),
                mtime: meta.mtime() as f64 + meta.mtime_nsec() as f64 / 1e9,
                inode: meta.ino(),
            });
        }
    }
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    Ok(files)
}

/// The files in `after` that are new or changed since `before`.
pub fn produced(before: &[FileInfo], after: &[FileInfo]) -> Vec<FileInfo> {
    let old: HashMap<&str, &FileInfo> = before.iter().map(|f| (f.rel.as_str(), f)).collect();
    after
        .iter()
        .filter(|f| match old.get(f.rel.as_str()) {
            None => true,
            Some(o) => o.size != f.size || o.mtime != f.mtime || o.inode != f.inode,
        })
        .cloned()
        .collect()
}

/// BLAKE3 of a file, read in 1 MiB blocks.
pub fn hash_file(path: &Path) -> std::io::Result<String> {
    let mut file = fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

/// The manifest of the files a run produced. A file that changes while it
/// is hashed (something still writing) is an error, never a checksum of a
/// torn file.
pub fn manifest(dir: &Path, files: &[FileInfo]) -> Result<Vec<Artifact>, String> {
    files
        .iter()
        .map(|f| {
            let path = dir.join(&f.rel);
            let blake3 = hash_file(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let meta = fs::metadata(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            let mtime = meta.mtime() as f64 + meta.mtime_nsec() as f64 / 1e9;
            if meta.len() != f.size || mtime != f.mtime {
                return Err(format!(
                    "{} changed while it was being checksummed: something is still writing it",
                    path.display()
                ));
            }
            Ok(Artifact {
                path: f.rel.clone(),
                size: f.size,
                blake3,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_matching_files_and_finds_what_a_run_produced() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("old.dump"), b"old").expect("write");
        fs::write(dir.path().join(".partial.dump"), b"tmp").expect("write");
        fs::create_dir(dir.path().join("2026-11-27")).expect("mkdir");
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link.dump")).expect("symlink");
        let before = list_files(dir.path(), true, None).expect("list");
        fs::write(dir.path().join("2026-11-27/db.dump"), b"new dump").expect("write");
        let after = list_files(dir.path(), true, None).expect("list");
        let new = produced(&before, &after);
        assert_eq!(
            new.iter().map(|f| f.rel.as_str()).collect::<Vec<_>>(),
            ["2026-11-27/db.dump"]
        );
        let watched = list_files(dir.path(), false, Some("*.dump")).expect("list");
        assert_eq!(watched.iter().map(|f| f.rel.as_str()).collect::<Vec<_>>(), ["old.dump"]);
        let manifest = manifest(dir.path(), &new).expect("manifest");
        assert_eq!(manifest[0].blake3, blake3::hash(b"new dump").to_hex().to_string());
        assert_eq!(manifest[0].size, 8);
    }

    #[test]
    fn a_missing_folder_or_a_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("nope");
        assert!(list_files(&missing, false, None)
            .unwrap_err()
            .contains("does not exist"));
        let file = dir.path().join("file");
        fs::write(&file, b"x").expect("write");
        assert!(list_files(&file, false, None).unwrap_err().contains("is not a folder"));
    }
}
