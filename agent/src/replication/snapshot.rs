//! The destination side's snapshot store: one folder per replication job,
//! holding immutable snapshots of plain files that anyone can restore with
//! `cp -a`, without dicops.
//!
//! Layout under `<root>/<job>/`:
//! - `snapshots/<NAME>/`: published snapshots. NAME is the UTC time of the
//!   publish, `2026-11-27T10-30-00Z`, with `-<run_id>` added when that name
//!   is taken. Files are read-only (write bits removed) and carry the
//!   source's permission bits and mtime.
//! - `manifests/<NAME>.ndjson`: what each snapshot holds (the header line,
//!   then one entry per file). The next run's plan reads the newest one to
//!   hard-link unchanged files and to find chunks locally.
//! - `latest`: a symlink to `snapshots/<NAME>`, the last snapshot published.
//! - `staging/<run_id>/`: the tree a run is building; `staging/chunks/<id>`:
//!   verified chunks fetched so far, kept when a run fails so that its retry
//!   does not fetch them again, emptied after a publish.
//!
//! What a crash leaves, and why it is safe:
//! - The manifest is written (temp file, fsync, rename) before the snapshot
//!   folder is renamed into place, and every file and folder of the tree is
//!   fsynced before that rename: a snapshot that can be seen is complete,
//!   and its manifest exists. A manifest whose snapshot never arrived is
//!   removed by the next `open`.
//! - `staging/<run_id>` trees are removed by the next `open`; the chunks in
//!   `staging/chunks` stay. They are not fsynced (a torn one only costs a
//!   fetch): every chunk is verified against its BLAKE3 when it is used.
//! - Retention first renames a snapshot out of `snapshots/` (into staging,
//!   which `open` clears), then removes its manifest: a half-deleted
//!   snapshot is never visible.
//!
//! Nothing checks for a second process: the caller runs at most one run of
//! a job at a time and opens the job's store only when no run of it is
//! going (`open` removes staging trees it takes for stale).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDateTime, Utc};
use dicops_core::retention::{self, Item, RetentionPolicy};
use dicops_proto::{ChunkRef, ManifestEntry, ManifestHeader};

const SNAPSHOTS: &str = "snapshots";
const MANIFESTS: &str = "manifests";
const STAGING: &str = "staging";
const CHUNKS: &str = "chunks";
/// Chunk ids found damaged in a snapshot's file by a failed publish: the
/// next plan does not read them from a snapshot (so the retry fetches them)
/// and does not hard-link a file that holds them (so the damage does not
/// carry over into the new snapshot). Cleared by a successful publish.
const DAMAGED: &str = "damaged-chunks";
const LATEST: &str = "latest";
const LATEST_TMP: &str = "latest.tmp";
const MANIFEST_SUFFIX: &str = ".ndjson";
const NAME_TIME_FORMAT: &str = "%Y-%m-%dT%H-%M-%S";
const COPY_BUFFER: usize = 256 * 1024;

/// One replication job's snapshot store, `<root>/<job>/`.
#[derive(Debug)]
pub struct JobStore {
    job: String,
    dir: PathBuf,
    snapshots: PathBuf,
    manifests: PathBuf,
    staging: PathBuf,
    chunks: PathBuf,
}

/// Where publish reads a chunk it has not fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkSource {
    /// In the base snapshot's file `path` (relative), at `offset`.
    Snapshot { path: String, offset: u64 },
    /// In `staging/chunks` (already there, or to be fetched).
    Staged,
}

/// What a run must fetch and how publish builds the tree; made by
/// [`JobStore::plan`] for one list of entries and valid only for it.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Chunk ids (deduplicated, in first-use order) that neither the newest
    /// snapshot nor `staging/chunks` has: the only ones to fetch.
    pub missing: Vec<ChunkRef>,
    /// Files identical (content, size, mode, mtime) to a file of the newest
    /// snapshot, at any path: hard-linked, nothing read or fetched.
    pub files_linked: u64,
    pub bytes_linked: u64,
    /// Bytes of the distinct chunks found in the newest snapshot's files or
    /// in `staging/chunks`.
    pub bytes_local: u64,
    /// Bytes of the chunks in `missing`.
    pub bytes_missing: u64,
    /// The snapshot that links and local chunks come from.
    base: Option<String>,
    /// For each entry, in order: the base snapshot's file to hard-link.
    links: Vec<Option<String>>,
    /// Every chunk of the files not linked.
    sources: HashMap<String, ChunkSource>,
    /// Of the entries the plan was made for.
    fingerprint: blake3::Hash,
}

impl Plan {
    /// The published snapshot the plan builds on (None on a first run, or
    /// when its manifest could not be read).
    pub fn base(&self) -> Option<&str> {
        self.base.as_deref()
    }
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub name: String,
    pub files: u64,
    pub bytes: u64,
    pub files_linked: u64,
}

/// Content, size, mode and mtime: what makes a file of the new tree
/// replaceable by a hard link to one of the base snapshot.
type ContentKey = (String, u64, u32, i64);

fn content_key(entry: &ManifestEntry) -> ContentKey {
    (entry.blake3.clone(), entry.size, entry.mode & 0o777, entry.mtime_ns)
}

/// The newest snapshot's manifest, indexed by path, by content and by chunk.
struct BaseIndex {
    name: String,
    dir: PathBuf,
    entries: Vec<ManifestEntry>,
    by_path: HashMap<String, usize>,
    by_content: HashMap<ContentKey, usize>,
    /// First file and offset holding each chunk.
    chunk_at: HashMap<String, (usize, u64)>,
    /// Whether each file checked so far is in the snapshot with its size.
    present: HashMap<usize, bool>,
}

impl BaseIndex {
    fn new(name: String, dir: PathBuf, entries: Vec<ManifestEntry>) -> BaseIndex {
        let mut index = BaseIndex {
            name,
            dir,
            by_path: HashMap::with_capacity(entries.len()),
            by_content: HashMap::with_capacity(entries.len()),
            chunk_at: HashMap::new(),
            present: HashMap::new(),
            entries: Vec::new(),
        };
        for (i, entry) in entries.iter().enumerate() {
            index.by_path.insert(entry.path.clone(), i);
            index.by_content.entry(content_key(entry)).or_insert(i);
            let mut offset = 0u64;
            for chunk in &entry.chunks {
                index.chunk_at.entry(chunk.id.clone()).or_insert((i, offset));
                offset += u64::from(chunk.len);
            }
        }
        index.entries = entries;
        index
    }

    /// A cheap check (one stat) that the snapshot still has the file: a
    /// file deleted or truncated by hand is neither linked nor read.
    fn is_present(&mut self, i: usize) -> bool {
        let Some(entry) = self.entries.get(i) else {
            return false;
        };
        let path = self.dir.join(&entry.path);
        let size = entry.size;
        *self
            .present
            .entry(i)
            .or_insert_with(|| fs::symlink_metadata(&path).is_ok_and(|m| m.is_file() && m.len() == size))
    }

    /// The base file to hard-link for `entry`: same path first (keeps the
    /// snapshots' link structure tidy), else any file with the same content.
    fn link_for(&mut self, entry: &ManifestEntry, damaged: &HashSet<String>) -> Option<String> {
        if entry.chunks.iter().any(|c| damaged.contains(&c.id)) {
            return None;
        }
        let key = content_key(entry);
        let same_path = self
            .by_path
            .get(&entry.path)
            .copied()
            .filter(|&i| self.entries.get(i).is_some_and(|e| content_key(e) == key));
        let i = same_path.or_else(|| self.by_content.get(&key).copied())?;
        if !self.is_present(i) {
            return None;
        }
        self.entries.get(i).map(|e| e.path.clone())
    }

    /// Where the snapshot holds `id`, if its file is there.
    fn chunk_source(&mut self, id: &str) -> Option<ChunkSource> {
        let &(i, offset) = self.chunk_at.get(id)?;
        if !self.is_present(i) {
            return None;
        }
        let path = self.entries.get(i)?.path.clone();
        Some(ChunkSource::Snapshot { path, offset })
    }
}

/// A relative, `/`-separated path that stays inside the folder it is joined
/// to: no empty, `.` or `..` component, not absolute, no NUL or backslash.
/// (Kept here rather than shared so that this check is obviously the one
/// guarding the snapshot store.)
fn is_safe_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\0')
        && !path.contains('\\')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

fn is_safe_component(name: &str) -> bool {
    is_safe_path(name) && !name.contains('/')
}

/// A BLAKE3 hex digest as the source writes it: it becomes a file name.
fn is_chunk_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Refuses a list of entries that could write outside the snapshot or that
/// cannot be built as given. Runs before anything touches the disk.
fn validate_entries(entries: &[ManifestEntry]) -> Result<(), String> {
    let mut paths: HashSet<&str> = HashSet::with_capacity(entries.len());
    let mut chunk_lens: HashMap<&str, u32> = HashMap::new();
    for entry in entries {
        let path = &entry.path;
        if !is_safe_path(path) {
            return Err(format!("refused: path {path:?} escapes the snapshot"));
        }
        if !paths.insert(path) {
            return Err(format!("refused: path {path:?} is listed twice"));
        }
        if !is_chunk_id(&entry.blake3) {
            return Err(format!("refused: {path:?} has an invalid BLAKE3 {:?}", entry.blake3));
        }
        let mut sum = 0u64;
        for chunk in &entry.chunks {
            if !is_chunk_id(&chunk.id) {
                return Err(format!("refused: {path:?} has an invalid chunk id {:?}", chunk.id));
            }
            if *chunk_lens.entry(&chunk.id).or_insert(chunk.len) != chunk.len {
                return Err(format!(
                    "refused: chunk {} is listed with two lengths (in {path:?})",
                    chunk.id
                ));
            }
            sum += u64::from(chunk.len);
        }
        if sum != entry.size {
            return Err(format!(
                "refused: the chunks of {path:?} add up to {sum} bytes, its size is {}",
                entry.size
            ));
        }
    }
    for entry in entries {
        let path = entry.path.as_str();
        for (at, _) in path.match_indices('/') {
            let folder = &path[..at];
            if paths.contains(folder) {
                return Err(format!("refused: {folder:?} is both a file and the folder of {path:?}"));
            }
        }
    }
    Ok(())
}

/// Identifies the entries a plan was made for.
fn fingerprint(entries: &[ManifestEntry]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(entries.len() as u64).to_le_bytes());
    for entry in entries {
        hasher.update(entry.path.as_bytes());
        hasher.update(&[0]);
        hasher.update(entry.blake3.as_bytes());
        hasher.update(&entry.size.to_le_bytes());
        hasher.update(&entry.mode.to_le_bytes());
        hasher.update(&entry.mtime_ns.to_le_bytes());
        hasher.update(&(entry.chunks.len() as u64).to_le_bytes());
        for chunk in &entry.chunks {
            hasher.update(chunk.id.as_bytes());
            hasher.update(&chunk.len.to_le_bytes());
        }
    }
    hasher.finalize()
}

/// The time a snapshot name starts with, `2026-11-27T10-30-00Z[-suffix]`.
fn name_time(name: &str) -> Option<DateTime<Utc>> {
    let (time, rest) = (name.get(..19)?, name.get(19..)?);
    let rest = rest.strip_prefix('Z')?;
    if !(rest.is_empty() || rest.starts_with('-')) {
        return None;
    }
    NaiveDateTime::parse_from_str(time, NAME_TIME_FORMAT)
        .ok()
        .map(|t| t.and_utc())
}

fn system_time(mtime_ns: i64) -> SystemTime {
    let magnitude = Duration::from_nanos(mtime_ns.unsigned_abs());
    let time = if mtime_ns >= 0 {
        UNIX_EPOCH.checked_add(magnitude)
    } else {
        UNIX_EPOCH.checked_sub(magnitude)
    };
    time.unwrap_or(UNIX_EPOCH)
}

/// Snapshot files are immutable: the source's permission bits without the
/// write bits. The owner keeps read access, which later runs need to reuse
/// the file's chunks.
fn snapshot_mode(mode: u32) -> u32 {
    (mode & 0o555) | 0o400
}

/// Flushes everything written to the filesystem holding `dir` (syncfs(2)):
/// for a tree of many small files, far cheaper than an fsync of each.
#[allow(unsafe_code)]
fn sync_filesystem(dir: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let handle = File::open(dir).map_err(|e| format!("cannot open {}: {e}", dir.display()))?;
    // SAFETY: syncfs on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::syncfs(handle.as_raw_fd()) };
    if rc != 0 {
        return Err(format!(
            "cannot flush {} to disk: {}",
            dir.display(),
            io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), String> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn create_dir(path: &Path) -> Result<(), String> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .map_err(|e| format!("cannot create {}: {e}", path.display()))
}

/// Reads a manifest line by line, checking each entry as a new one would be.
pub(crate) fn read_manifest(path: &Path) -> Result<(ManifestHeader, Vec<ManifestEntry>), String> {
    let file = File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut lines = BufReader::new(file).lines();
    let first = lines
        .next()
        .ok_or_else(|| format!("{} is empty", path.display()))?
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let header: ManifestHeader = serde_json::from_str(&first).map_err(|e| format!("{} line 1: {e}", path.display()))?;
    let mut entries = Vec::new();
    for (number, line) in lines.enumerate() {
        let line = line.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let entry: ManifestEntry =
            serde_json::from_str(&line).map_err(|e| format!("{} line {}: {e}", path.display(), number + 2))?;
        entries.push(entry);
    }
    validate_entries(&entries).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((header, entries))
}

/// Writes a manifest: temp file, fsync, rename, fsync of the folder.
fn write_manifest(dir: &Path, name: &str, header: &ManifestHeader, entries: &[ManifestEntry]) -> Result<(), String> {
    let file_name = format!("{name}{MANIFEST_SUFFIX}");
    let tmp = dir.join(format!(".{file_name}.tmp"));
    let target = dir.join(&file_name);
    let write = || -> io::Result<()> {
        let mut out = BufWriter::new(File::create(&tmp)?);
        serde_json::to_writer(&mut out, header)?;
        out.write_all(b"\n")?;
        for entry in entries {
            serde_json::to_writer(&mut out, entry)?;
            out.write_all(b"\n")?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        fs::rename(&tmp, &target)
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(format!("cannot write the manifest {}: {e}", target.display()));
    }
    sync_dir(dir)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
}

/// Copies exactly `len` bytes from `src` to `out`, feeding both hashers.
fn copy_exact(
    src: &mut File,
    out: &mut File,
    len: u64,
    buf: &mut [u8],
    hashers: [&mut blake3::Hasher; 2],
) -> Result<(), CopyError> {
    let [chunk, whole] = hashers;
    let mut left = len;
    while left > 0 {
        let want = left.min(buf.len() as u64) as usize;
        let n = match src.read(&mut buf[..want]) {
            Ok(0) => {
                return Err(CopyError::Read(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the file ends before the chunk does",
                )))
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        chunk.update(&buf[..n]);
        whole.update(&buf[..n]);
        out.write_all(&buf[..n]).map_err(CopyError::Write)?;
        left -= n as u64;
    }
    Ok(())
}

/// Builds one run's tree in staging.
struct Builder<'a> {
    store: &'a JobStore,
    plan: &'a Plan,
    run_dir: &'a Path,
    base_dir: Option<PathBuf>,
    /// Chunks known damaged in the base snapshot, from earlier runs and this one.
    damaged: HashSet<String>,
    /// Found damaged by this publish: saved if it fails.
    newly_damaged: Vec<String>,
    /// The base file read last (consecutive chunks usually share it).
    open_base: Option<(String, File)>,
    buf: Vec<u8>,
}

impl Builder<'_> {
    /// Builds `entry`; true if it was hard-linked.
    fn file(&mut self, entry: &ManifestEntry, link: Option<&str>) -> Result<bool, String> {
        let dst = self.run_dir.join(&entry.path);
        if let Some(parent) = dst.parent() {
            create_dir(parent)?;
        }
        if let (Some(link), Some(base_dir)) = (link, &self.base_dir) {
            let src = base_dir.join(link);
            match fs::hard_link(&src, &dst) {
                Ok(()) => return Ok(true),
                // E.g. the file's link count is at the file system's limit:
                // a copy of it does as well.
                Err(e) => tracing::warn!(
                    from = %src.display(), to = %dst.display(), error = %e,
                    "cannot hard-link an unchanged file; copying it"
                ),
            }
            self.assemble(entry, &dst, Some(link))?;
            return Ok(false);
        }
        self.assemble(entry, &dst, None)?;
        Ok(false)
    }

    /// Writes `dst` chunk by chunk, each verified, then checks the whole
    /// file. `whole_base`: read every chunk from this base file (the copy
    /// that replaces a failed hard link).
    fn assemble(&mut self, entry: &ManifestEntry, dst: &Path, whole_base: Option<&str>) -> Result<(), String> {
        let mut out = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(dst)
            .map_err(|e| format!("cannot create {}: {e}", dst.display()))?;
        let mut whole = blake3::Hasher::new();
        let mut offset = 0u64;
        for chunk in &entry.chunks {
            let source = match whole_base {
                Some(path) => Some(ChunkSource::Snapshot {
                    path: path.to_string(),
                    offset,
                }),
                None => self.plan.sources.get(&chunk.id).cloned(),
            };
            let mut done = false;
            if let Some(ChunkSource::Snapshot { path, offset }) = source {
                if !self.damaged.contains(&chunk.id) {
                    done = self.chunk_from_base(&mut out, &mut whole, &path, offset, chunk, dst)?;
                }
            }
            if !done {
                self.chunk_from_staging(&mut out, &mut whole, chunk, entry)?;
            }
            offset += u64::from(chunk.len);
        }
        let actual = whole.finalize().to_hex();
        if actual.as_str() != entry.blake3 {
            return Err(format!(
                "refused: {:?} built from its chunks has BLAKE3 {actual}, the manifest says {}",
                entry.path, entry.blake3
            ));
        }
        let finish = || -> io::Result<()> {
            out.set_permissions(fs::Permissions::from_mode(snapshot_mode(entry.mode)))?;
            // Made durable all at once before the publish (`sync_filesystem`):
            // one flush instead of one fsync per file, which on a tree of
            // many small files costs more than the transfer.
            out.set_modified(system_time(entry.mtime_ns))
        };
        finish().map_err(|e| format!("cannot finish {}: {e}", dst.display()))
    }

    /// Copies a chunk from the base snapshot. Ok(false) when the snapshot's
    /// copy is unreadable or damaged: what was written is taken back and
    /// the chunk is noted as damaged.
    fn chunk_from_base(
        &mut self,
        out: &mut File,
        whole: &mut blake3::Hasher,
        path: &str,
        offset: u64,
        chunk: &ChunkRef,
        dst: &Path,
    ) -> Result<bool, String> {
        let Some(base_dir) = &self.base_dir else {
            return Ok(false);
        };
        let src_path = base_dir.join(path);
        if self.open_base.as_ref().is_none_or(|(open, _)| open != path) {
            match File::open(&src_path) {
                Ok(file) => self.open_base = Some((path.to_string(), file)),
                Err(e) => {
                    tracing::warn!(file = %src_path.display(), error = %e, "cannot open a file of the previous snapshot");
                    self.open_base = None;
                    self.note_damaged(&chunk.id);
                    return Ok(false);
                }
            }
        }
        let Some((_, src)) = self.open_base.as_mut() else {
            return Ok(false);
        };
        let start = out
            .stream_position()
            .map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
        let saved = whole.clone();
        let mut chunk_hasher = blake3::Hasher::new();
        let copied = match src.seek(SeekFrom::Start(offset)) {
            Ok(_) => copy_exact(
                src,
                out,
                u64::from(chunk.len),
                &mut self.buf,
                [&mut chunk_hasher, whole],
            ),
            Err(e) => Err(CopyError::Read(e)),
        };
        let problem = match copied {
            Ok(()) if chunk_hasher.finalize().to_hex().as_str() == chunk.id => return Ok(true),
            Ok(()) => "its content does not match its BLAKE3".to_string(),
            Err(CopyError::Read(e)) => format!("cannot read it: {e}"),
            Err(CopyError::Write(e)) => return Err(format!("cannot write {}: {e}", dst.display())),
        };
        tracing::warn!(
            chunk = %chunk.id, file = %src_path.display(), offset, problem = %problem,
            "a chunk of the previous snapshot is damaged; using a fetched copy"
        );
        out.set_len(start)
            .and_then(|()| out.seek(SeekFrom::Start(start)).map(|_| ()))
            .map_err(|e| format!("cannot write {}: {e}", dst.display()))?;
        *whole = saved;
        self.note_damaged(&chunk.id);
        Ok(false)
    }

    fn note_damaged(&mut self, id: &str) {
        if self.damaged.insert(id.to_string()) {
            self.newly_damaged.push(id.to_string());
        }
    }

    /// Copies a chunk from `staging/chunks`; a damaged one is removed so
    /// that the retry fetches it again.
    fn chunk_from_staging(
        &mut self,
        out: &mut File,
        whole: &mut blake3::Hasher,
        chunk: &ChunkRef,
        entry: &ManifestEntry,
    ) -> Result<(), String> {
        let path = self.store.chunks.join(&chunk.id);
        let mut src = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(if self.damaged.contains(&chunk.id) {
                    format!(
                        "chunk {} ({} bytes, for {:?}) is damaged in snapshot {} and was not fetched: \
                         it must be fetched; plan again (it is now listed as missing), fetch and publish",
                        chunk.id,
                        chunk.len,
                        entry.path,
                        self.plan.base.as_deref().unwrap_or("?")
                    )
                } else {
                    format!(
                        "chunk {} ({} bytes, for {:?}) is not in staging/chunks: fetch it (store_chunk) before publishing",
                        chunk.id, chunk.len, entry.path
                    )
                });
            }
            Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
        };
        let mut chunk_hasher = blake3::Hasher::new();
        let dst = self.run_dir.join(&entry.path);
        let problem = match copy_exact(
            &mut src,
            out,
            u64::from(chunk.len),
            &mut self.buf,
            [&mut chunk_hasher, whole],
        ) {
            Ok(()) if chunk_hasher.finalize().to_hex().as_str() == chunk.id => None,
            Ok(()) => Some("does not match its BLAKE3".to_string()),
            Err(CopyError::Read(e)) => Some(format!("cannot be read ({e})")),
            Err(CopyError::Write(e)) => return Err(format!("cannot write {}: {e}", dst.display())),
        };
        match problem {
            None => Ok(()),
            Some(problem) => {
                let _ = fs::remove_file(&path);
                Err(format!(
                    "chunk {} in {} {problem}; removed, fetch it again (plan lists it as missing)",
                    chunk.id,
                    path.display()
                ))
            }
        }
    }
}

impl JobStore {
    /// Opens (creating the folders) `<root>/<job>`; `job` must be a safe
    /// single component. Removes what a crashed run left: staging trees,
    /// temp files, a manifest whose snapshot never arrived. Keeps the
    /// fetched chunks, so that the retry does not fetch them again.
    pub fn open(root: &Path, job: &str) -> Result<JobStore, String> {
        if !is_safe_component(job) {
            return Err(format!("refused: job name {job:?} is not a single safe path component"));
        }
        let dir = root.join(job);
        let store = JobStore {
            job: job.to_string(),
            snapshots: dir.join(SNAPSHOTS),
            manifests: dir.join(MANIFESTS),
            staging: dir.join(STAGING),
            chunks: dir.join(STAGING).join(CHUNKS),
            dir,
        };
        for folder in [&store.snapshots, &store.manifests, &store.chunks] {
            create_dir(folder)?;
        }
        store.clean_after_crash()?;
        Ok(store)
    }

    fn clean_after_crash(&self) -> Result<(), String> {
        let list = |dir: &Path| -> Result<Vec<(String, PathBuf)>, String> {
            let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
            let mut found = Vec::new();
            for entry in entries {
                let entry = entry.map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
                found.push((entry.file_name().to_string_lossy().into_owned(), entry.path()));
            }
            Ok(found)
        };
        let remove = |path: &Path, why: &str| -> Result<(), String> {
            tracing::info!(path = %path.display(), "removing {why}");
            remove_any(path).map_err(|e| format!("cannot remove {why} {}: {e}", path.display()))
        };
        for (name, path) in list(&self.staging)? {
            if name != CHUNKS && name != DAMAGED {
                remove(&path, "a stale staging tree")?;
            }
        }
        for (name, path) in list(&self.chunks)? {
            if !is_chunk_id(&name) {
                remove(&path, "a partial chunk")?;
            }
        }
        for (name, path) in list(&self.manifests)? {
            let orphan = match name.strip_suffix(MANIFEST_SUFFIX) {
                Some(snapshot) if !name.starts_with('.') => !self.snapshots.join(snapshot).is_dir(),
                _ => true,
            };
            if orphan {
                remove(&path, "a manifest without a snapshot")?;
            }
        }
        remove_any(&self.dir.join(LATEST_TMP))
            .map_err(|e| format!("cannot remove {}: {e}", self.dir.join(LATEST_TMP).display()))
    }

    /// Published snapshot names, oldest first.
    pub fn snapshots(&self) -> Result<Vec<String>, String> {
        let entries =
            fs::read_dir(&self.snapshots).map_err(|e| format!("cannot list {}: {e}", self.snapshots.display()))?;
        let mut names: Vec<(DateTime<Utc>, String)> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| format!("cannot list {}: {e}", self.snapshots.display()))?;
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if let (Some(time), true) = (name_time(&name), entry.path().is_dir()) {
                names.push((time, name));
            }
        }
        names.sort();
        Ok(names.into_iter().map(|(_, name)| name).collect())
    }

    /// The snapshot `latest` points to, if it is a published one.
    fn latest_target(&self) -> Option<String> {
        let target = fs::read_link(self.dir.join(LATEST)).ok()?;
        let name = target.strip_prefix(SNAPSHOTS).ok()?.to_str()?.to_string();
        (is_safe_component(&name) && name_time(&name).is_some() && self.snapshots.join(&name).is_dir()).then_some(name)
    }

    /// The last snapshot published: `latest`'s, else the newest by name.
    fn newest(&self) -> Result<Option<String>, String> {
        if let Some(name) = self.latest_target() {
            return Ok(Some(name));
        }
        Ok(self.snapshots()?.pop())
    }

    fn check_header(&self, header: &ManifestHeader) -> Result<(), String> {
        if header.job != self.job {
            return Err(format!(
                "refused: the manifest is for job {:?}, this store is job {:?}",
                header.job, self.job
            ));
        }
        Ok(())
    }

    fn read_damaged(&self) -> HashSet<String> {
        fs::read_to_string(self.staging.join(DAMAGED))
            .map(|text| text.lines().filter(|l| is_chunk_id(l)).map(str::to_string).collect())
            .unwrap_or_default()
    }

    fn save_damaged(&self, ids: &HashSet<String>) {
        let mut ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        ids.sort_unstable();
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        if let Err(e) = crate::spool::write_atomically(&self.staging, DAMAGED, text.as_bytes()) {
            tracing::error!(dir = %self.staging.display(), error = %e, "cannot note damaged chunks; the retry may fail the same way");
        }
    }

    /// The newest snapshot's index; None on a first run, or when its
    /// manifest cannot be used (logged: the run then fetches more, it does
    /// not fail).
    fn base_index(&self) -> Result<Option<BaseIndex>, String> {
        let Some(name) = self.newest()? else {
            return Ok(None);
        };
        let manifest = self.manifests.join(format!("{name}{MANIFEST_SUFFIX}"));
        match read_manifest(&manifest) {
            Ok((_, entries)) => Ok(Some(BaseIndex::new(name.clone(), self.snapshots.join(&name), entries))),
            Err(e) => {
                tracing::warn!(snapshot = %name, error = %e, "the previous snapshot's manifest cannot be used; nothing is reused from it");
                Ok(None)
            }
        }
    }

    /// What to fetch: every chunk of the new tree that neither the newest
    /// snapshot nor `staging/chunks` holds. Chunks in the snapshot are not
    /// read here (publish verifies them as it copies them).
    pub fn plan(&self, header: &ManifestHeader, entries: &[ManifestEntry]) -> Result<Plan, String> {
        self.check_header(header)?;
        validate_entries(entries)?;
        let damaged = self.read_damaged();
        let mut base = self.base_index()?;
        let mut plan = Plan {
            missing: Vec::new(),
            files_linked: 0,
            bytes_linked: 0,
            bytes_local: 0,
            bytes_missing: 0,
            base: base.as_ref().map(|b| b.name.clone()),
            links: Vec::with_capacity(entries.len()),
            sources: HashMap::new(),
            fingerprint: fingerprint(entries),
        };
        for entry in entries {
            let link = base.as_mut().and_then(|b| b.link_for(entry, &damaged));
            if link.is_some() {
                plan.files_linked += 1;
                plan.bytes_linked += entry.size;
                plan.links.push(link);
                continue;
            }
            plan.links.push(None);
            for chunk in &entry.chunks {
                if plan.sources.contains_key(&chunk.id) {
                    continue;
                }
                let in_base = match (&mut base, damaged.contains(&chunk.id)) {
                    (Some(b), false) => b.chunk_source(&chunk.id),
                    _ => None,
                };
                let source = match in_base {
                    Some(source) => {
                        plan.bytes_local += u64::from(chunk.len);
                        source
                    }
                    None => {
                        let staged = fs::metadata(self.chunks.join(&chunk.id))
                            .is_ok_and(|m| m.is_file() && m.len() == u64::from(chunk.len));
                        if staged {
                            plan.bytes_local += u64::from(chunk.len);
                        } else {
                            plan.bytes_missing += u64::from(chunk.len);
                            plan.missing.push(chunk.clone());
                        }
                        ChunkSource::Staged
                    }
                };
                plan.sources.insert(chunk.id.clone(), source);
            }
        }
        Ok(plan)
    }

    /// Verifies `bytes` against `id` (BLAKE3 hex) and stores it in
    /// `staging/chunks` (temp file and rename, not fsynced: publish verifies
    /// it again before use).
    pub fn store_chunk(&self, id: &str, bytes: &[u8]) -> Result<(), String> {
        if !is_chunk_id(id) {
            return Err(format!("refused: {id:?} is not a chunk id (BLAKE3 hex)"));
        }
        let actual = blake3::hash(bytes).to_hex();
        if actual.as_str() != id {
            return Err(format!(
                "refused: chunk {id} ({} bytes received) has BLAKE3 {actual}: damaged in transit",
                bytes.len()
            ));
        }
        let tmp = self.chunks.join(format!(".{id}.tmp"));
        let target = self.chunks.join(id);
        let result = fs::write(&tmp, bytes).and_then(|()| fs::rename(&tmp, &target));
        result.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            format!("cannot store chunk {id} in {}: {e}", self.chunks.display())
        })
    }

    /// Builds `staging/<run_id>/` from links, local chunks and stored
    /// chunks; verifies every built file's BLAKE3 (hard-linked files are
    /// the base snapshot's, verified when it was published); writes the
    /// manifest; publishes with one rename; switches `latest`; clears
    /// staging.
    pub fn publish(
        &self,
        header: &ManifestHeader,
        entries: &[ManifestEntry],
        plan: &Plan,
    ) -> Result<Published, String> {
        self.publish_at(header, entries, plan, Utc::now())
    }

    fn publish_at(
        &self,
        header: &ManifestHeader,
        entries: &[ManifestEntry],
        plan: &Plan,
        now: DateTime<Utc>,
    ) -> Result<Published, String> {
        self.check_header(header)?;
        validate_entries(entries)?;
        if plan.links.len() != entries.len() || plan.fingerprint != fingerprint(entries) {
            return Err("the plan was made for other manifest entries: plan again".to_string());
        }
        let run_dir = self.staging.join(header.run_id.to_string());
        remove_any(&run_dir).map_err(|e| format!("cannot remove {}: {e}", run_dir.display()))?;
        create_dir(&run_dir)?;

        let mut builder = Builder {
            store: self,
            plan,
            run_dir: &run_dir,
            base_dir: plan.base.as_ref().map(|name| self.snapshots.join(name)),
            damaged: self.read_damaged(),
            newly_damaged: Vec::new(),
            open_base: None,
            buf: vec![0; COPY_BUFFER],
        };
        let mut published = Published {
            name: String::new(),
            files: 0,
            bytes: 0,
            files_linked: 0,
        };
        let mut built = Ok(());
        for (entry, link) in entries.iter().zip(&plan.links) {
            match builder.file(entry, link.as_deref()) {
                Ok(linked) => {
                    published.files += 1;
                    published.bytes += entry.size;
                    published.files_linked += u64::from(linked);
                }
                Err(e) => {
                    built = Err(e);
                    break;
                }
            }
        }
        // Every built file and folder durable before the rename publishes them.
        let built = built.and_then(|()| sync_filesystem(&run_dir));
        if !builder.newly_damaged.is_empty() {
            // Also on success: harmless, cleared below.
            self.save_damaged(&builder.damaged);
        }
        if let Err(e) = built {
            if let Err(rm) = remove_any(&run_dir) {
                tracing::warn!(dir = %run_dir.display(), error = %rm, "cannot remove a failed run's tree; the next open will");
            }
            return Err(e);
        }

        let name = self.free_name(now, header.run_id);
        if let Err(e) = write_manifest(&self.manifests, &name, header, entries) {
            let _ = remove_any(&run_dir);
            return Err(e);
        }
        let target = self.snapshots.join(&name);
        if let Err(e) = fs::rename(&run_dir, &target) {
            let _ = fs::remove_file(self.manifests.join(format!("{name}{MANIFEST_SUFFIX}")));
            let _ = remove_any(&run_dir);
            return Err(format!(
                "cannot publish {} as {}: {e}",
                run_dir.display(),
                target.display()
            ));
        }
        sync_dir(&self.snapshots)?;
        self.switch_latest(&name)
            .map_err(|e| format!("snapshot {name} is published, but `latest` still points to the previous one: {e}"))?;
        self.clear_chunks();
        tracing::info!(
            job = %self.job, snapshot = %name, files = published.files, bytes = published.bytes,
            files_linked = published.files_linked, "snapshot published"
        );
        published.name = name;
        Ok(published)
    }

    /// The snapshot name for `now`, with `-<run_id>` (then `-2`, ...) added
    /// when taken.
    fn free_name(&self, now: DateTime<Utc>, run_id: i64) -> String {
        let stamp = format!("{}Z", now.format(NAME_TIME_FORMAT));
        let taken =
            |n: &str| self.snapshots.join(n).exists() || self.manifests.join(format!("{n}{MANIFEST_SUFFIX}")).exists();
        if !taken(&stamp) {
            return stamp;
        }
        let with_run = format!("{stamp}-{run_id}");
        let mut candidate = with_run.clone();
        let mut n = 2u64;
        while taken(&candidate) {
            candidate = format!("{with_run}-{n}");
            n += 1;
        }
        candidate
    }

    /// Points `latest` at the snapshot: a new symlink renamed over the old.
    fn switch_latest(&self, name: &str) -> Result<(), String> {
        let tmp = self.dir.join(LATEST_TMP);
        let switch = || -> io::Result<()> {
            remove_any(&tmp)?;
            std::os::unix::fs::symlink(Path::new(SNAPSHOTS).join(name), &tmp)?;
            fs::rename(&tmp, self.dir.join(LATEST))
        };
        switch().map_err(|e| format!("cannot switch {}: {e}", self.dir.join(LATEST).display()))?;
        sync_dir(&self.dir)
    }

    /// After a publish the fetched chunks are in the new snapshot.
    fn clear_chunks(&self) {
        let _ = fs::remove_file(self.staging.join(DAMAGED));
        let Ok(entries) = fs::read_dir(&self.chunks) else {
            return;
        };
        for entry in entries.flatten() {
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::warn!(file = %entry.path().display(), error = %e, "cannot remove a fetched chunk");
            }
        }
    }

    /// Applies retention to published snapshots: never the last published
    /// (`latest`) nor the newest, never one in `in_use` (being restored or
    /// verified). Deletes the snapshot folder and its manifest; returns the
    /// deleted names, newest first. A snapshot that cannot be deleted is
    /// logged and kept.
    pub fn apply_retention(
        &self,
        policy: &RetentionPolicy,
        tz: chrono_tz::Tz,
        in_use: &[String],
    ) -> Result<Vec<String>, String> {
        let names = self.snapshots()?;
        let latest = self.latest_target();
        let items: Vec<Item<String>> = names
            .iter()
            .filter_map(|name| {
                Some(Item {
                    key: name.clone(),
                    time: name_time(name)?,
                    protected: in_use.contains(name) || latest.as_deref() == Some(name.as_str()),
                })
            })
            .collect();
        let decided = retention::plan(policy, &items, tz);
        let mut deleted = Vec::new();
        for name in decided.delete {
            match self.delete_snapshot(&name) {
                Ok(()) => {
                    tracing::info!(job = %self.job, snapshot = %name, "retention deleted a snapshot");
                    deleted.push(name);
                }
                Err(e) => {
                    tracing::error!(job = %self.job, snapshot = %name, error = %e, "retention cannot delete a snapshot")
                }
            }
        }
        Ok(deleted)
    }

    /// Moves the snapshot out of sight first, so that a crash midway leaves
    /// no partial snapshot (`open` clears staging).
    fn delete_snapshot(&self, name: &str) -> Result<(), String> {
        let from = self.snapshots.join(name);
        let trash = self.staging.join(format!(".deleting-{name}"));
        remove_any(&trash).map_err(|e| format!("cannot remove {}: {e}", trash.display()))?;
        fs::rename(&from, &trash).map_err(|e| format!("cannot move {} away: {e}", from.display()))?;
        let manifest = self.manifests.join(format!("{name}{MANIFEST_SUFFIX}"));
        match fs::remove_file(&manifest) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(file = %manifest.display(), error = %e, "cannot remove a deleted snapshot's manifest")
            }
            _ => {}
        }
        fs::remove_dir_all(&trash).map_err(|e| format!("cannot remove {}: {e}", trash.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::os::unix::fs::MetadataExt;

    const CHUNK: usize = 4;

    /// A source file: path, content, mode, mtime (ns).
    type SourceFile = (&'static str, Vec<u8>, u32, i64);

    /// Entries with fixed-size chunks, and every chunk's bytes by id.
    fn manifest(files: &[SourceFile]) -> (Vec<ManifestEntry>, HashMap<String, Vec<u8>>) {
        let mut chunks = HashMap::new();
        let mut entries: Vec<ManifestEntry> = files
            .iter()
            .map(|(path, body, mode, mtime_ns)| ManifestEntry {
                path: path.to_string(),
                size: body.len() as u64,
                mode: *mode,
                mtime_ns: *mtime_ns,
                blake3: blake3::hash(body).to_hex().to_string(),
                chunks: body
                    .chunks(CHUNK)
                    .map(|c| {
                        let id = blake3::hash(c).to_hex().to_string();
                        chunks.insert(id.clone(), c.to_vec());
                        ChunkRef {
                            id,
                            len: c.len() as u32,
                        }
                    })
                    .collect(),
            })
            .collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        (entries, chunks)
    }

    fn header(run_id: i64) -> ManifestHeader {
        ManifestHeader {
            version: 1,
            job: "web".into(),
            run_id,
            source_agent: "a1".into(),
            export: "www".into(),
            taken_at: 1.7e9,
            files: None,
        }
    }

    fn day(d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, 10, 30, 0).single().expect("time")
    }

    /// One run: plan, fetch what is missing, publish.
    fn run(store: &JobStore, files: &[SourceFile], run_id: i64, now: DateTime<Utc>) -> (Plan, Published) {
        let (entries, chunks) = manifest(files);
        let plan = store.plan(&header(run_id), &entries).expect("plan");
        for chunk in &plan.missing {
            store.store_chunk(&chunk.id, &chunks[&chunk.id]).expect("store");
        }
        let published = store
            .publish_at(&header(run_id), &entries, &plan, now)
            .expect("publish");
        (plan, published)
    }

    fn tree() -> Vec<SourceFile> {
        vec![
            (
                "index.html",
                b"<html>hello</html>".to_vec(),
                0o644,
                1_700_000_000_123_456_789,
            ),
            (
                "bin/run.sh",
                b"#!/bin/sh\necho run\n".to_vec(),
                0o755,
                1_600_000_000_000_000_001,
            ),
            (
                "data/a/b/big.bin",
                (0..=255u8).cycle().take(1000).collect(),
                0o640,
                1_650_000_000_000_000_000,
            ),
            ("data/empty", Vec::new(), 0o600, 0),
        ]
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).expect("list").flatten() {
                let path = entry.path();
                found.push(path.strip_prefix(dir).expect("prefix").display().to_string());
                if entry.file_type().expect("type").is_dir() {
                    stack.push(path);
                }
            }
        }
        found.sort();
        found
    }

    fn nlink(path: &Path) -> u64 {
        fs::metadata(path).expect("stat").nlink()
    }

    #[test]
    fn first_run_restores_the_tree_byte_identical() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let files = tree();
        let (plan, published) = run(&store, &files, 7, day(1));
        assert_eq!(plan.base(), None);
        assert_eq!(plan.files_linked, 0);
        // big.bin repeats every 256 bytes: 64 distinct chunks.
        assert_eq!(plan.bytes_missing, 18 + 19 + 256);
        assert_eq!(published.name, "2026-11-01T10-30-00Z");
        assert_eq!((published.files, published.bytes, published.files_linked), (4, 1037, 0));

        let snap = root.path().join("web/snapshots/2026-11-01T10-30-00Z");
        for (path, body, mode, mtime_ns) in &files {
            let file = snap.join(path);
            assert_eq!(&fs::read(&file).expect("read"), body, "{path}");
            let meta = fs::metadata(&file).expect("stat");
            assert_eq!(meta.mode() & 0o777, snapshot_mode(*mode), "{path}");
            assert_eq!(meta.mode() & 0o222, 0, "{path} is read-only");
            assert_eq!(meta.mtime() * 1_000_000_000 + meta.mtime_nsec(), *mtime_ns, "{path}");
        }
        assert_eq!(
            fs::metadata(snap.join("bin/run.sh")).expect("stat").mode() & 0o777,
            0o555
        );
        assert_eq!(
            fs::metadata(snap.join("index.html")).expect("stat").mode() & 0o777,
            0o444
        );
        assert_eq!(
            fs::read_link(root.path().join("web/latest")).expect("latest"),
            Path::new("snapshots/2026-11-01T10-30-00Z")
        );
        assert_eq!(
            fs::read(root.path().join("web/latest/index.html")).expect("via latest"),
            b"<html>hello</html>"
        );
        // The manifest: header, then the entries in path order.
        let (entries, _) = manifest(&files);
        let (h, read) =
            read_manifest(&root.path().join("web/manifests/2026-11-01T10-30-00Z.ndjson")).expect("manifest");
        assert_eq!((h, read), (header(7), entries));
        // Staging is empty again.
        assert_eq!(listing(&root.path().join("web/staging")), ["chunks"]);
        assert_eq!(store.snapshots().expect("list"), ["2026-11-01T10-30-00Z"]);
    }

    #[test]
    fn an_unchanged_tree_fetches_nothing_and_links_every_file_even_renamed() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let (_, first) = run(&store, &tree(), 1, day(1));
        let (plan, second) = run(&store, &tree(), 2, day(2));
        assert_eq!(plan.base(), Some(first.name.as_str()));
        assert!(plan.missing.is_empty());
        assert_eq!((plan.files_linked, plan.bytes_linked, plan.bytes_local), (4, 1037, 0));
        assert_eq!(second.files_linked, 4);
        let snaps = root.path().join("web/snapshots");
        for (path, ..) in tree() {
            assert_eq!(nlink(&snaps.join(&second.name).join(path)), 2, "{path}");
        }

        // A renamed file costs nothing either.
        let mut renamed = tree();
        renamed[0].0 = "home.html";
        let (plan, third) = run(&store, &renamed, 3, day(3));
        assert!(plan.missing.is_empty());
        assert_eq!(plan.files_linked, 4);
        assert_eq!(nlink(&snaps.join(&third.name).join("home.html")), 3);
        assert_eq!(
            fs::read(root.path().join("web/latest/home.html")).expect("read"),
            b"<html>hello</html>"
        );
    }

    #[test]
    fn an_appended_file_fetches_only_its_new_chunks() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let mut files = tree();
        files[0].1 = b"line one\nline two\n".to_vec(); // 18 bytes: 4+4+4+4+2
        run(&store, &files, 1, day(1));
        files[0].1.extend_from_slice(b"ZZ three\n"); // the 2-byte tail changes
        files[0].3 += 1;
        let (plan, published) = run(&store, &files, 2, day(2));
        let new_chunks: Vec<&[u8]> = vec![b"o\nZZ", b" thr", b"ee\n"];
        let expected: Vec<String> = new_chunks
            .iter()
            .map(|c| blake3::hash(c).to_hex().to_string())
            .collect();
        let missing: Vec<String> = plan.missing.iter().map(|c| c.id.clone()).collect();
        assert_eq!(missing, expected);
        assert_eq!((plan.bytes_missing, plan.bytes_local), (11, 16));
        assert_eq!((plan.files_linked, published.files_linked), (3, 3));
        let snap = root.path().join("web/snapshots").join(&published.name);
        assert_eq!(fs::read(snap.join("index.html")).expect("read"), files[0].1);
        assert_eq!(nlink(&snap.join("index.html")), 1);
        assert_eq!(nlink(&snap.join("bin/run.sh")), 2);
    }

    #[test]
    fn traversal_and_inconsistent_entries_are_refused_with_nothing_written() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let before = listing(root.path());
        let (good, _) = manifest(&tree());
        for bad in [
            "../evil",
            "/etc/passwd",
            "a//b",
            "a/./b",
            "a/../../b",
            "a\0b",
            "a\\b",
            "",
            "a/",
            ".",
        ] {
            let mut entries = good.clone();
            entries[0].path = bad.to_string();
            let plan_error = store.plan(&header(1), &entries).expect_err(bad);
            assert!(plan_error.contains("escapes the snapshot"), "{bad:?}: {plan_error}");
            assert!(plan_error.contains(&format!("{bad:?}")), "{plan_error}");
            // publish checks again, even with a plan made for other entries.
            let plan = store.plan(&header(1), &good).expect("plan");
            let publish_error = store.publish(&header(1), &entries, &plan).expect_err(bad);
            assert!(publish_error.contains("escapes the snapshot"), "{publish_error}");
        }
        let mut twice = good.clone();
        twice[1] = twice[0].clone();
        assert!(store
            .plan(&header(1), &twice)
            .expect_err("twice")
            .contains("listed twice"));
        let mut short = good.clone();
        short[0].size += 1;
        assert!(store.plan(&header(1), &short).expect_err("size").contains("add up to"));
        let mut folder = good.clone();
        folder[0].path = "data/a".into();
        assert!(store
            .plan(&header(1), &folder)
            .expect_err("folder")
            .contains("both a file"));
        let mut bad_id = good.clone();
        bad_id[0].chunks[0].id = "../../x".into();
        assert!(store
            .plan(&header(1), &bad_id)
            .expect_err("id")
            .contains("invalid chunk id"));
        let mut other_job = header(1);
        other_job.job = "db".into();
        assert!(store.plan(&other_job, &good).expect_err("job").contains("job"));
        assert!(JobStore::open(root.path(), "../x").is_err());
        assert!(JobStore::open(root.path(), "a/b").is_err());
        assert!(JobStore::open(root.path(), "..").is_err());
        assert_eq!(listing(root.path()), before, "nothing was written");
        assert!(!root.path().parent().expect("parent").join("evil").exists());
    }

    #[test]
    fn a_damaged_chunk_is_refused_by_store_chunk() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let id = blake3::hash(b"good").to_hex().to_string();
        let error = store.store_chunk(&id, b"evil").expect_err("mismatch");
        assert!(error.contains(&id), "{error}");
        assert!(store.store_chunk("../../escape", b"x").is_err());
        assert!(store.store_chunk(&id.to_uppercase(), b"good").is_err());
        assert!(listing(&root.path().join("web/staging/chunks")).is_empty());
        store.store_chunk(&id, b"good").expect("good chunk");
        assert_eq!(listing(&root.path().join("web/staging/chunks")), [id]);
    }

    #[test]
    fn a_retry_resumes_with_the_chunks_already_fetched() {
        let root = tempfile::tempdir().expect("root");
        let (entries, chunks) = manifest(&tree());
        let fetched: Vec<ChunkRef>;
        {
            let store = JobStore::open(root.path(), "web").expect("open");
            let plan = store.plan(&header(1), &entries).expect("plan");
            fetched = plan.missing[..3].to_vec();
            for chunk in &fetched {
                store.store_chunk(&chunk.id, &chunks[&chunk.id]).expect("store");
            }
            let error = store.publish(&header(1), &entries, &plan).expect_err("not all fetched");
            assert!(error.contains("fetch it"), "{error}");
            assert!(
                !root.path().join("web/staging/1").exists(),
                "a failed publish cleans up"
            );
            // Killed mid-build: a partial tree and a partial chunk remain.
            create_dir(&root.path().join("web/staging/0/data")).expect("mkdir");
            fs::write(root.path().join("web/staging/0/data/part"), b"par").expect("write");
            fs::write(root.path().join("web/staging/chunks/.abc.tmp"), b"x").expect("write");
        }
        let store = JobStore::open(root.path(), "web").expect("reopen");
        assert_eq!(listing(&root.path().join("web/staging/chunks")).len(), 3);
        assert!(!root.path().join("web/staging/0").exists());
        let plan = store.plan(&header(2), &entries).expect("plan");
        assert!(fetched.iter().all(|c| !plan.missing.contains(c)));
        assert_eq!(plan.bytes_local, fetched.iter().map(|c| u64::from(c.len)).sum::<u64>());
        let (_, published) = run(&store, &tree(), 2, day(1));
        assert_eq!(published.files, 4);
        assert!(store.snapshots().expect("list").len() == 1);
    }

    #[test]
    fn a_damaged_chunk_in_the_previous_snapshot_is_fetched_not_copied() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let mut files = tree();
        let (_, first) = run(&store, &files, 1, day(1));
        // Bit rot in the first chunk of index.html ("<htm"), same size.
        let rotten = root.path().join("web/snapshots").join(&first.name).join("index.html");
        fs::set_permissions(&rotten, fs::Permissions::from_mode(0o644)).expect("chmod");
        fs::write(&rotten, b"<HTml>hello</html>").expect("rot");
        // A new file shares that chunk; index.html itself is unchanged.
        files.push(("copy.html", b"<html>copy</html>".to_vec(), 0o644, 5));
        let (entries, chunks) = manifest(&files);
        let plan = store.plan(&header(2), &entries).expect("plan");
        let rotten_id = blake3::hash(b"<htm").to_hex().to_string();
        assert!(
            !plan.missing.iter().any(|c| c.id == rotten_id),
            "plan does not read snapshots"
        );
        for chunk in &plan.missing {
            store.store_chunk(&chunk.id, &chunks[&chunk.id]).expect("store");
        }
        let error = store
            .publish_at(&header(2), &entries, &plan, day(2))
            .expect_err("damaged");
        assert!(
            error.contains(&rotten_id) && error.contains("must be fetched"),
            "{error}"
        );
        assert_eq!(store.snapshots().expect("list"), std::slice::from_ref(&first.name));

        // The retry fetches it, and rebuilds index.html instead of linking it.
        let plan = store.plan(&header(2), &entries).expect("plan");
        assert!(plan.missing.iter().any(|c| c.id == rotten_id));
        let (_, second) = run(&store, &files, 2, day(2));
        let snap = root.path().join("web/snapshots").join(&second.name);
        assert_eq!(fs::read(snap.join("index.html")).expect("read"), b"<html>hello</html>");
        assert_eq!(fs::read(snap.join("copy.html")).expect("read"), b"<html>copy</html>");
        assert_eq!(nlink(&snap.join("index.html")), 1);
        assert!(!root.path().join("web/staging").join(DAMAGED).exists());
    }

    #[test]
    fn a_corrupt_old_manifest_means_fetching_more_not_failing() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let (_, first) = run(&store, &tree(), 1, day(1));
        let manifest_path = root.path().join("web/manifests").join(format!("{}.ndjson", first.name));
        fs::write(&manifest_path, b"{\"version\":1,\"job\":\"web\"}\nnot json\n").expect("corrupt");
        let (plan, second) = run(&store, &tree(), 2, day(2));
        assert_eq!(plan.base(), None);
        assert_eq!((plan.files_linked, plan.bytes_local), (0, 0));
        assert_eq!(second.files, 4);
        assert_eq!(store.snapshots().expect("list").len(), 2);
    }

    #[test]
    fn a_taken_name_gets_the_run_id() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let (_, a) = run(&store, &tree(), 1, day(1));
        let (_, b) = run(&store, &tree(), 42, day(1));
        let (_, c) = run(&store, &tree(), 42, day(1));
        assert_eq!(a.name, "2026-11-01T10-30-00Z");
        assert_eq!(b.name, "2026-11-01T10-30-00Z-42");
        assert_eq!(c.name, "2026-11-01T10-30-00Z-42-2");
        assert_eq!(store.snapshots().expect("list"), [a.name, b.name, c.name.clone()]);
        assert_eq!(store.latest_target(), Some(c.name));
    }

    #[test]
    fn retention_keeps_the_newest_and_the_snapshots_in_use() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        for d in 1..=5 {
            let mut files = tree();
            files[0].1.push(b'0' + d as u8);
            run(&store, &files, i64::from(d), day(d));
        }
        let names = store.snapshots().expect("list");
        assert_eq!(names.len(), 5);
        let policy = RetentionPolicy {
            keep_last: 1,
            ..RetentionPolicy::default()
        };
        let in_use = vec![names[1].clone()];
        let deleted = store
            .apply_retention(&policy, chrono_tz::UTC, &in_use)
            .expect("retention");
        assert_eq!(deleted, [names[3].clone(), names[2].clone(), names[0].clone()]);
        assert_eq!(store.snapshots().expect("list"), [names[1].clone(), names[4].clone()]);
        assert_eq!(
            listing(&root.path().join("web/manifests")),
            [format!("{}.ndjson", names[1]), format!("{}.ndjson", names[4])]
        );
        assert_eq!(listing(&root.path().join("web/staging")), ["chunks"]);
        // Files shared with deleted snapshots are still whole.
        assert_eq!(
            fs::read(root.path().join("web/latest/bin/run.sh")).expect("read"),
            b"#!/bin/sh\necho run\n"
        );
        // No policy: nothing is deleted.
        let none = store
            .apply_retention(&RetentionPolicy::default(), chrono_tz::UTC, &[])
            .expect("retention");
        assert!(none.is_empty());
    }

    #[test]
    fn open_removes_a_manifest_whose_snapshot_never_arrived() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let (_, first) = run(&store, &tree(), 1, day(1));
        let orphan = root.path().join("web/manifests/2026-11-02T10-30-00Z.ndjson");
        fs::write(&orphan, b"{}").expect("write");
        drop(store);
        let store = JobStore::open(root.path(), "web").expect("reopen");
        assert!(!orphan.exists());
        assert_eq!(store.snapshots().expect("list"), [first.name]);
    }

    #[test]
    fn snapshot_names_parse_back_to_their_time() {
        assert_eq!(
            name_time("2026-11-27T10-30-00Z"),
            Utc.with_ymd_and_hms(2026, 11, 27, 10, 30, 0).single()
        );
        assert!(name_time("2026-11-27T10-30-00Z-42").is_some());
        assert!(name_time("2026-11-27T10-30-00Zx").is_none());
        assert!(name_time("2026-11-27").is_none());
        assert!(name_time("é026-11-27T10-30-00Z").is_none());
        assert_eq!(system_time(-1_500_000_000), UNIX_EPOCH - Duration::from_millis(1500));
    }
}
