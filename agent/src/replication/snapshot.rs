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
//! - `staging/build/`: the tree a run is building. Every chunk is written
//!   straight into its place in its file (a fetched chunk, or one copied
//!   from the newest snapshot), so publishing is one rename, with no second
//!   copy of the data. A run that fails leaves it: the retry keeps every
//!   chunk it finds in place with the right BLAKE3 and fetches only the
//!   others.
//!
//! What a crash leaves, and why it is safe:
//! - The manifest is written (temp file, fsync, rename) before the build is
//!   renamed into `snapshots/`, and the whole build is flushed (syncfs)
//!   before that rename: a snapshot that can be seen is complete, and its
//!   manifest exists. A manifest whose snapshot never arrived is removed by
//!   the next `open`.
//! - `staging/build` is never trusted: the next build removes what its
//!   manifest does not name and every hard link (it never writes through a
//!   link into a published snapshot), and checks each chunk of what stays
//!   against its BLAKE3 before keeping it.
//! - Retention first renames a snapshot out of `snapshots/` (into staging,
//!   which `open` clears), then removes its manifest: a half-deleted
//!   snapshot is never visible.
//!
//! Nothing checks for a second process: the caller runs at most one run of
//! a job at a time and opens the job's store only when no run of it is
//! going (`open` removes staging trees it takes for stale).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, NaiveDateTime, Utc};
use dicops_core::retention::{self, Item, RetentionPolicy};
use dicops_proto::{ChunkRef, ManifestEntry, ManifestHeader};

use super::direct::{AlignedBuffer, DirectStream};

const SNAPSHOTS: &str = "snapshots";
const MANIFESTS: &str = "manifests";
const STAGING: &str = "staging";
const BUILD: &str = "build";
/// Chunk ids found damaged in a snapshot's file: later builds do not read
/// them from a snapshot and do not hard-link a file that holds them (so the
/// damage does not carry over into a new snapshot). Cleared by a publish.
const DAMAGED: &str = "damaged-chunks";
const LATEST: &str = "latest";
const LATEST_TMP: &str = "latest.tmp";
const MANIFEST_SUFFIX: &str = ".ndjson";
const NAME_TIME_FORMAT: &str = "%Y-%m-%dT%H-%M-%S";
const READ_BUFFER: usize = 256 * 1024;
/// Files whose whole-file BLAKE3 is computed as their chunks are written in
/// order. A file written out of order (or beyond this many at once) is read
/// back once complete instead.
const LIVE_HASHERS: usize = 256;
/// A file's hash cursor once a chunk was written out of order.
const BROKEN: u32 = u32::MAX;
/// Writeback of a file being built is started every this many bytes (and
/// when it is complete), so that the disk writes while the transfer goes
/// on and the flush before the publish finds little left to do.
const WRITEBACK_STEP: u64 = 16 << 20;
/// Files at least this large are written around the page cache
/// (`direct`) as far as their chunks come in order.
const DIRECT_FROM: u64 = 1 << 20;
/// Files written around the page cache at once (each holds a 1 MiB buffer).
const DIRECT_STREAMS: usize = 4;

/// One replication job's snapshot store, `<root>/<job>/`.
#[derive(Debug)]
pub struct JobStore {
    job: String,
    dir: PathBuf,
    snapshots: PathBuf,
    manifests: PathBuf,
    staging: PathBuf,
    build: PathBuf,
}

/// Where a chunk of the new tree comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkSource {
    /// The base snapshot's file `path` (relative), at `offset`.
    Snapshot { path: String, offset: u64 },
    /// The source, over the network.
    Fetch,
}

/// One place a fetched chunk goes: entry, chunk index, byte offset.
#[derive(Debug, Clone, Copy)]
struct Place {
    entry: u32,
    index: u32,
    offset: u64,
}

/// A file of the build that is assembled (not hard-linked).
#[derive(Debug, Clone, Copy, Default)]
struct FileState {
    /// Chunks not written yet.
    remaining: u32,
    /// Chunks fed, in order, to the file's hasher; BROKEN once out of order.
    cursor: u32,
    /// The file exists in the build.
    created: bool,
    /// Hash checked, mode and mtime set.
    done: bool,
    /// Writeback was started for the bytes before this offset.
    written_back: u64,
}

/// A run's tree being built in `staging/build`, made by
/// [`JobStore::start_build`] for one list of entries: links and local
/// chunks are in place once it returns; `missing` is what to fetch and
/// hand to [`Build::add_chunk`]; [`Build::publish`] then renames it into
/// `snapshots/`.
pub struct Build {
    dir: PathBuf,
    header: ManifestHeader,
    entries: Arc<Vec<ManifestEntry>>,
    base: Option<String>,
    base_dir: Option<PathBuf>,
    /// For each entry: the base snapshot's file it is a hard link to.
    links: Vec<Option<String>>,
    files: Vec<FileState>,
    /// For each chunk still to fetch, every place it goes.
    wanted: HashMap<String, Vec<Place>>,
    hashers: HashMap<u32, blake3::Hasher>,
    /// The file written last (consecutive chunks usually share it).
    open: Option<(u32, File)>,
    /// The folder created last (consecutive files usually share it).
    last_folder: Option<PathBuf>,
    /// The base file read last.
    open_base: Option<(String, File)>,
    damaged: HashSet<String>,
    buf: Vec<u8>,
    /// Files whose leading chunks are being written around the page cache.
    streams: HashMap<u32, DirectStream>,
    /// Buffers of ended streams, for the next ones.
    spare_buffers: Vec<AlignedBuffer>,
    /// False once the file system refused O_DIRECT.
    direct: bool,
    /// Bytes written around the page cache.
    pub bytes_direct: u64,
    /// Chunk ids (deduplicated, in first-use order) that neither the newest
    /// snapshot nor the build in staging has: the only ones to fetch.
    pub missing: Vec<ChunkRef>,
    /// Files identical (content, size, mode, mtime) to a file of the newest
    /// snapshot, at any path: hard-linked, nothing read or fetched.
    pub files_linked: u64,
    pub bytes_linked: u64,
    /// Bytes copied from the newest snapshot's files.
    pub bytes_local: u64,
    /// Bytes found in place, intact, from an earlier attempt.
    pub bytes_resumed: u64,
    /// Bytes of the chunks in `missing`.
    pub bytes_missing: u64,
}

/// A build that stops (a failed or aborted run) writes out what its
/// direct streams hold, so that the retry finds those chunks in place.
impl Drop for Build {
    fn drop(&mut self) {
        let open: Vec<u32> = self.streams.keys().copied().collect();
        for i in open {
            if let Err(e) = self.end_stream(i) {
                tracing::warn!(error = %e, "cannot keep the last chunks of a stopped build");
            }
        }
    }
}

impl std::fmt::Debug for Build {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Build")
            .field("dir", &self.dir)
            .field("base", &self.base)
            .field("missing", &self.missing.len())
            .finish_non_exhaustive()
    }
}

/// A fetched chunk whose bytes hash to its id: only
/// [`VerifiedChunk::check`] makes one.
#[derive(Debug)]
pub struct VerifiedChunk {
    id: String,
    bytes: Vec<u8>,
}

impl VerifiedChunk {
    pub fn check(id: String, bytes: Vec<u8>) -> Result<VerifiedChunk, String> {
        if !is_chunk_id(&id) {
            return Err(format!("refused: {id:?} is not a chunk id (BLAKE3 hex)"));
        }
        let actual = blake3::hash(&bytes).to_hex();
        if actual.as_str() != id {
            return Err(format!(
                "refused: chunk {id} ({} bytes received) has BLAKE3 {actual}: damaged in transit",
                bytes.len()
            ));
        }
        Ok(VerifiedChunk { id, bytes })
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
pub(crate) fn validate_entries(entries: &[ManifestEntry]) -> Result<(), String> {
    if u32::try_from(entries.len()).is_err() {
        return Err(format!(
            "refused: {} files is more than one snapshot holds",
            entries.len()
        ));
    }
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
        if entry.chunks.len() >= BROKEN as usize {
            return Err(format!("refused: {path:?} has too many chunks"));
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

/// Asks the kernel to start writing `from..to` of `file` to disk (`to` 0:
/// to the end) without waiting for it (sync_file_range(2) with
/// SYNC_FILE_RANGE_WRITE). Durability still comes from the flush before the
/// publish; this only spreads the disk's work over the transfer.
#[allow(unsafe_code)]
fn start_writeback(file: &File, from: u64, to: u64) {
    use std::os::fd::AsRawFd;
    let (Ok(offset), Ok(len)) = (i64::try_from(from), i64::try_from(to.saturating_sub(from))) else {
        return;
    };
    // SAFETY: a plain syscall on a file descriptor we own for the duration
    // of the call; a failure only means the flush before the publish does
    // all the work.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Reads exactly `buf.len()` bytes at `offset`; false if the file is shorter.
fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<bool> {
    match file.read_exact_at(buf, offset) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes from an earlier attempt's build whatever the new entries do not
/// name as a file or folder, and every hard link: a file of the build is
/// only ever written when it is the build's own.
fn tidy_build(dir: &Path, entries: &[ManifestEntry]) -> Result<(), String> {
    let files: HashSet<&str> = entries.iter().map(|e| e.path.as_str()).collect();
    let mut folders: HashSet<&str> = HashSet::new();
    for entry in entries {
        for (at, _) in entry.path.match_indices('/') {
            folders.insert(&entry.path[..at]);
        }
    }
    let mut stack: Vec<(PathBuf, String)> = vec![(dir.to_path_buf(), String::new())];
    while let Some((folder, prefix)) = stack.pop() {
        let listing = fs::read_dir(&folder).map_err(|e| format!("cannot list {}: {e}", folder.display()))?;
        for item in listing {
            let item = item.map_err(|e| format!("cannot list {}: {e}", folder.display()))?;
            let path = item.path();
            let relative = item.file_name().into_string().ok().map(|name| {
                if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                }
            });
            let meta = fs::symlink_metadata(&path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
            let keep = match &relative {
                Some(rel) if meta.is_dir() && folders.contains(rel.as_str()) => {
                    stack.push((path.clone(), rel.clone()));
                    true
                }
                Some(rel) => meta.is_file() && meta.nlink() == 1 && files.contains(rel.as_str()),
                None => false,
            };
            if !keep {
                remove_any(&path).map_err(|e| format!("cannot remove {}: {e}", path.display()))?;
            }
        }
    }
    Ok(())
}

impl Build {
    /// The published snapshot the build reuses (None on a first run, or
    /// when its manifest could not be read).
    pub fn base(&self) -> Option<&str> {
        self.base.as_deref()
    }

    fn entry(&self, i: u32) -> &ManifestEntry {
        &self.entries[i as usize]
    }

    fn create_parent(&mut self, path: &Path) -> Result<(), String> {
        let Some(parent) = path.parent() else {
            return Ok(());
        };
        if self.last_folder.as_deref() != Some(parent) {
            create_dir(parent)?;
            self.last_folder = Some(parent.to_path_buf());
        }
        Ok(())
    }

    /// The build's file for entry `i`, created (sized, sparse) on first use.
    fn file(&mut self, i: u32) -> Result<&File, String> {
        if self.open.as_ref().is_none_or(|(open, _)| *open != i) {
            self.open = None;
            let path = self.dir.join(&self.entry(i).path);
            let state = self.files[i as usize];
            let file = if state.created {
                OpenOptions::new().write(true).read(true).open(&path)
            } else {
                self.create_parent(&path)?;
                OpenOptions::new()
                    .write(true)
                    .read(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)
            };
            let file = file.map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            if !state.created {
                file.set_len(self.entry(i).size)
                    .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
                self.files[i as usize].created = true;
            }
            self.open = Some((i, file));
        }
        match &self.open {
            Some((_, file)) => Ok(file),
            None => Err("internal error: no open file".to_string()),
        }
    }

    /// Notes chunk `index` of entry `i` as written with `bytes`, feeding the
    /// file's running hash when it comes in order; finishes the file when
    /// it was the last one.
    fn written(&mut self, i: u32, index: u32, bytes: &[u8]) -> Result<(), String> {
        let state = &mut self.files[i as usize];
        state.remaining -= 1;
        if state.cursor == index {
            let live = self.hashers.len() < LIVE_HASHERS || self.hashers.contains_key(&i);
            if live {
                self.hashers.entry(i).or_default().update(bytes);
                state.cursor += 1;
            } else {
                state.cursor = BROKEN;
            }
        } else if state.cursor != BROKEN {
            state.cursor = BROKEN;
            self.hashers.remove(&i);
        }
        if state.remaining == 0 {
            self.finish_file(i)?;
        }
        Ok(())
    }

    /// Writes the bytes of `place` through the file's direct stream when
    /// they continue it (starting one at offset 0 of a large file); true
    /// when they were taken. A stream that the bytes do not continue ends.
    fn write_direct(&mut self, place: Place, bytes: &[u8]) -> Result<bool, String> {
        let i = place.entry;
        let continues = match self.streams.get(&i) {
            Some(stream) => stream.end() == place.offset,
            None => {
                if !(self.direct
                    && place.offset == 0
                    && self.entry(i).size >= DIRECT_FROM
                    && self.streams.len() < DIRECT_STREAMS)
                {
                    return Ok(false);
                }
                self.file(i)?;
                let path = self.dir.join(&self.entry(i).path);
                let buffer = self.spare_buffers.pop().unwrap_or_else(AlignedBuffer::new);
                match DirectStream::open(&path, buffer) {
                    Ok(stream) => {
                        self.streams.insert(i, stream);
                        true
                    }
                    Err((buffer, e)) => {
                        tracing::debug!(file = %path.display(), error = %e, "no O_DIRECT here; writing through the page cache");
                        self.spare_buffers.push(buffer);
                        self.direct = false;
                        return Ok(false);
                    }
                }
            }
        };
        if !continues {
            self.end_stream(i)?;
            return Ok(false);
        }
        let Some(mut stream) = self.streams.remove(&i) else {
            return Ok(false);
        };
        let pushed = stream.push(bytes, self.file(i)?);
        self.streams.insert(i, stream);
        if let Err(e) = pushed {
            let path = self.dir.join(&self.entry(i).path);
            return Err(format!("cannot write {}: {e}", path.display()));
        }
        self.written(i, place.index, bytes)?;
        Ok(true)
    }

    /// Writes out what entry `i`'s direct stream holds, if it has one.
    fn end_stream(&mut self, i: u32) -> Result<(), String> {
        let Some(stream) = self.streams.remove(&i) else {
            return Ok(());
        };
        let path = self.dir.join(&self.entry(i).path);
        let file = self.file(i)?;
        let (buffer, direct) = stream
            .finish(file)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        self.bytes_direct += direct;
        self.spare_buffers.push(buffer);
        Ok(())
    }

    fn write_at(&mut self, place: Place, bytes: &[u8]) -> Result<(), String> {
        if self.write_direct(place, bytes)? {
            return Ok(());
        }
        let from = self.files[place.entry as usize].written_back;
        let end = place.offset + bytes.len() as u64;
        let file = self.file(place.entry)?;
        if let Err(e) = file.write_all_at(bytes, place.offset) {
            let path = self.dir.join(&self.entry(place.entry).path);
            return Err(format!("cannot write {}: {e}", path.display()));
        }
        if end >= from + WRITEBACK_STEP {
            start_writeback(file, from, end);
            self.files[place.entry as usize].written_back = end;
        }
        self.written(place.entry, place.index, bytes)
    }

    /// Checks the whole file's BLAKE3 (from its running hash, or by reading
    /// it back), then gives it its mode and mtime.
    fn finish_file(&mut self, i: u32) -> Result<(), String> {
        // The list is shared: a handle to it, not a copy of the entry.
        let entries = Arc::clone(&self.entries);
        let entry = &entries[i as usize];
        let path = self.dir.join(&entry.path);
        self.end_stream(i)?;
        let state = self.files[i as usize];
        let hasher = self.hashers.remove(&i);
        let chunks = entry.chunks.len() as u32;
        let mut buf = std::mem::take(&mut self.buf);
        if buf.len() < READ_BUFFER {
            buf.resize(READ_BUFFER, 0);
        }
        let file = self.file(i)?;
        let hash = match hasher {
            Some(hasher) if state.cursor == chunks => hasher.finalize(),
            _ if chunks == 0 => blake3::hash(b""),
            _ => {
                let mut hasher = blake3::Hasher::new();
                let mut offset = 0u64;
                while offset < entry.size {
                    let want = (entry.size - offset).min(buf.len() as u64) as usize;
                    let n = file
                        .read_at(&mut buf[..want], offset)
                        .map_err(|e| format!("cannot read back {}: {e}", path.display()))?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    offset += n as u64;
                }
                hasher.finalize()
            }
        };
        self.buf = buf;
        let actual = hash.to_hex();
        if actual.as_str() != entry.blake3 {
            return Err(format!(
                "refused: {:?} built from its chunks has BLAKE3 {actual}, the manifest says {}",
                entry.path, entry.blake3
            ));
        }
        let file = self.file(i)?;
        let finish = || -> io::Result<()> {
            file.set_permissions(fs::Permissions::from_mode(snapshot_mode(entry.mode)))?;
            // Made durable all at once before the publish (`sync_filesystem`):
            // one flush instead of one fsync per file, which on a tree of
            // many small files costs more than the transfer.
            file.set_modified(system_time(entry.mtime_ns))
        };
        finish().map_err(|e| format!("cannot finish {}: {e}", path.display()))?;
        start_writeback(file, 0, 0);
        self.files[i as usize].done = true;
        self.open = None;
        Ok(())
    }

    /// Reads a chunk of the base snapshot into `self.buf`; false when the
    /// snapshot's copy is unreadable or damaged (then noted as damaged).
    fn read_from_base(&mut self, path: &str, offset: u64, chunk: &ChunkRef) -> bool {
        let Some(base_dir) = &self.base_dir else {
            return false;
        };
        let src_path = base_dir.join(path);
        if self.open_base.as_ref().is_none_or(|(open, _)| open != path) {
            match File::open(&src_path) {
                Ok(file) => self.open_base = Some((path.to_string(), file)),
                Err(e) => {
                    tracing::warn!(file = %src_path.display(), error = %e, "cannot open a file of the previous snapshot");
                    self.open_base = None;
                    self.damaged.insert(chunk.id.clone());
                    return false;
                }
            }
        }
        let Some((_, src)) = &self.open_base else {
            return false;
        };
        let len = chunk.len as usize;
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        let problem = match read_exact_at(src, &mut self.buf[..len], offset) {
            Ok(true) if blake3::hash(&self.buf[..len]).to_hex().as_str() == chunk.id => return true,
            Ok(true) => "its content does not match its BLAKE3".to_string(),
            Ok(false) => "the file ends before the chunk does".to_string(),
            Err(e) => format!("cannot read it: {e}"),
        };
        tracing::warn!(
            chunk = %chunk.id, file = %src_path.display(), offset, problem = %problem,
            "a chunk of the previous snapshot is damaged; fetching it instead"
        );
        self.damaged.insert(chunk.id.clone());
        false
    }

    /// Puts entry `i` in place as far as it can locally: chunks an earlier
    /// attempt left intact, then chunks of the base snapshot; every other
    /// chunk is noted as wanted.
    fn prepare_file(
        &mut self,
        i: u32,
        base: &mut Option<BaseIndex>,
        sources: &mut HashMap<String, ChunkSource>,
    ) -> Result<(), String> {
        // The list is shared: a handle to it, not a copy of the entry.
        let entries = Arc::clone(&self.entries);
        let entry = &entries[i as usize];
        let path = self.dir.join(&entry.path);
        self.files[i as usize] = FileState {
            remaining: entry.chunks.len() as u32,
            ..FileState::default()
        };
        // What an earlier attempt left (tidy_build kept it only if it is
        // the build's own regular file at this path).
        let mut intact = vec![false; entry.chunks.len()];
        if fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))
                .map_err(|e| format!("cannot reuse {}: {e}", path.display()))?;
            self.files[i as usize].created = true;
            let reader = self
                .file(i)?
                .try_clone()
                .map_err(|e| format!("cannot reuse {}: {e}", path.display()))?;
            // Whatever it held beyond the new size goes.
            reader
                .set_len(entry.size)
                .map_err(|e| format!("cannot size {}: {e}", path.display()))?;
            let mut buf = std::mem::take(&mut self.buf);
            let mut offset = 0u64;
            let mut checked = Ok(());
            for (k, chunk) in entry.chunks.iter().enumerate() {
                let len = chunk.len as usize;
                if buf.len() < len {
                    buf.resize(len, 0);
                }
                if read_exact_at(&reader, &mut buf[..len], offset).unwrap_or(false)
                    && blake3::hash(&buf[..len]).to_hex().as_str() == chunk.id
                {
                    intact[k] = true;
                    self.bytes_resumed += u64::from(chunk.len);
                    checked = self.written(i, k as u32, &buf[..len]);
                    if checked.is_err() {
                        break;
                    }
                }
                offset += u64::from(chunk.len);
            }
            self.buf = buf;
            checked?;
        }
        let mut offset = 0u64;
        for (k, chunk) in entry.chunks.iter().enumerate() {
            let place = Place {
                entry: i,
                index: k as u32,
                offset,
            };
            offset += u64::from(chunk.len);
            if intact[k] {
                continue;
            }
            let source = match sources.get(&chunk.id) {
                Some(source) => source.clone(),
                None => {
                    let source = match base.as_mut() {
                        Some(b) if !self.damaged.contains(&chunk.id) => b.chunk_source(&chunk.id),
                        _ => None,
                    }
                    .unwrap_or(ChunkSource::Fetch);
                    sources.insert(chunk.id.clone(), source.clone());
                    source
                }
            };
            if let ChunkSource::Snapshot { path: from, offset } = source {
                if self.read_from_base(&from, offset, chunk) {
                    let buf = std::mem::take(&mut self.buf);
                    let written = self.write_at(place, &buf[..chunk.len as usize]);
                    self.buf = buf;
                    written?;
                    self.bytes_local += u64::from(chunk.len);
                    continue;
                }
                sources.insert(chunk.id.clone(), ChunkSource::Fetch);
            }
            let places = self.wanted.entry(chunk.id.clone()).or_default();
            if places.is_empty() {
                self.missing.push(chunk.clone());
                self.bytes_missing += u64::from(chunk.len);
            }
            places.push(place);
        }
        if entry.chunks.is_empty() {
            // An empty file: nothing to write, but it must exist.
            self.file(i)?;
            self.finish_file(i)?;
        }
        Ok(())
    }

    /// Verifies a fetched chunk against its id and writes it to every place
    /// it goes; returns its length.
    #[cfg(test)]
    pub fn add_chunk(&mut self, id: &str, bytes: &[u8]) -> Result<u64, String> {
        let chunk = VerifiedChunk::check(id.to_string(), bytes.to_vec())?;
        self.add_verified(&chunk)
    }

    /// Writes a chunk checked beforehand (on another thread, while this
    /// build writes the previous ones) to every place it goes.
    pub fn add_verified(&mut self, chunk: &VerifiedChunk) -> Result<u64, String> {
        let (id, bytes) = (chunk.id.as_str(), chunk.bytes.as_slice());
        let Some(places) = self.wanted.remove(id) else {
            return Err(format!(
                "refused: chunk {id} was not asked for, or was already received"
            ));
        };
        for place in places {
            self.write_at(place, bytes)?;
        }
        Ok(bytes.len() as u64)
    }

    /// Publishes the build once every file is in place: flushed to disk,
    /// its manifest written, renamed into `snapshots/` in one step, and
    /// `latest` switched to it.
    pub fn publish(self, store: &JobStore) -> Result<Published, String> {
        self.publish_at(store, Utc::now())
    }

    fn publish_at(mut self, store: &JobStore, now: DateTime<Utc>) -> Result<Published, String> {
        if let Some((id, places)) = self.wanted.iter().next() {
            let len = places
                .first()
                .and_then(|p| self.entry(p.entry).chunks.get(p.index as usize))
                .map_or(0, |c| c.len);
            return Err(format!(
                "chunk {id} ({len} bytes) was not fetched: the build is incomplete"
            ));
        }
        let mut published = Published {
            name: String::new(),
            files: self.entries.len() as u64,
            bytes: self.entries.iter().map(|e| e.size).sum(),
            files_linked: self.files_linked,
        };
        for (i, entry) in self.entries.iter().enumerate() {
            if self.links[i].is_none() && !self.files[i].done {
                return Err(format!("internal error: {:?} was not built", entry.path));
            }
        }
        self.open = None;
        // Every built file and folder durable before the rename publishes them.
        sync_filesystem(&self.dir)?;
        let name = store.free_name(now, self.header.run_id);
        write_manifest(&store.manifests, &name, &self.header, &self.entries)?;
        let target = store.snapshots.join(&name);
        if let Err(e) = fs::rename(&self.dir, &target) {
            let _ = fs::remove_file(store.manifests.join(format!("{name}{MANIFEST_SUFFIX}")));
            return Err(format!(
                "cannot publish {} as {}: {e}",
                self.dir.display(),
                target.display()
            ));
        }
        sync_dir(&store.snapshots)?;
        store
            .switch_latest(&name)
            .map_err(|e| format!("snapshot {name} is published, but `latest` still points to the previous one: {e}"))?;
        let _ = fs::remove_file(store.staging.join(DAMAGED));
        tracing::info!(
            job = %store.job, snapshot = %name, files = published.files, bytes = published.bytes,
            files_linked = published.files_linked, bytes_direct = self.bytes_direct, "snapshot published"
        );
        published.name = name;
        Ok(published)
    }
}

impl JobStore {
    /// Opens (creating the folders) `<root>/<job>`; `job` must be a safe
    /// single component. Removes what a crashed run left: temp files, half
    /// deleted snapshots, a manifest whose snapshot never arrived. Keeps
    /// `staging/build`, which the retry reuses.
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
            build: dir.join(STAGING).join(BUILD),
            dir,
        };
        for folder in [&store.snapshots, &store.manifests, &store.staging] {
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
            let keep = (name == BUILD && path.is_dir()) || name == DAMAGED;
            if !keep {
                remove(&path, "a stale staging entry")?;
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

    /// The newest snapshot and its manifest's header (one line read); None
    /// while a chunk of it is known damaged (the next run must rebuild).
    pub fn latest_header(&self) -> Option<(String, ManifestHeader)> {
        if self.staging.join(DAMAGED).exists() {
            return None;
        }
        let name = self.newest().ok()??;
        let file = File::open(self.manifests.join(format!("{name}{MANIFEST_SUFFIX}"))).ok()?;
        let mut first = String::new();
        BufReader::new(file).read_line(&mut first).ok()?;
        let header = serde_json::from_str(&first).ok()?;
        Some((name, header))
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

    /// Starts (or resumes) the build of a run's tree in `staging/build`:
    /// refuses entries that could write outside it; hard-links unchanged
    /// files from the newest snapshot; keeps what an earlier attempt left
    /// intact; copies, verified, every chunk the newest snapshot holds; and
    /// lists the chunks left to fetch.
    pub fn start_build(&self, header: &ManifestHeader, entries: Arc<Vec<ManifestEntry>>) -> Result<Build, String> {
        self.check_header(header)?;
        validate_entries(&entries)?;
        let damaged_before = self.read_damaged();
        let mut base = self.base_index()?;
        if self.build.is_dir() {
            tidy_build(&self.build, &entries)?;
        } else {
            create_dir(&self.build)?;
        }
        let count = entries.len();
        let mut build = Build {
            dir: self.build.clone(),
            header: header.clone(),
            base: base.as_ref().map(|b| b.name.clone()),
            base_dir: base.as_ref().map(|b| b.dir.clone()),
            links: Vec::with_capacity(count),
            files: vec![FileState::default(); count],
            wanted: HashMap::new(),
            hashers: HashMap::new(),
            open: None,
            last_folder: None,
            open_base: None,
            damaged: damaged_before.clone(),
            buf: vec![0; READ_BUFFER],
            streams: HashMap::new(),
            spare_buffers: Vec::new(),
            direct: true,
            bytes_direct: 0,
            missing: Vec::new(),
            files_linked: 0,
            bytes_linked: 0,
            bytes_local: 0,
            bytes_resumed: 0,
            bytes_missing: 0,
            entries,
        };
        for entry in build.entries.iter() {
            let link = base.as_mut().and_then(|b| b.link_for(entry, &build.damaged));
            build.links.push(link);
        }
        // Copying from the snapshot may find damaged chunks; a file to be
        // hard-linked that holds one is then built instead.
        let mut sources: HashMap<String, ChunkSource> = HashMap::new();
        let mut todo: Vec<u32> = (0..count as u32)
            .filter(|&i| build.links[i as usize].is_none())
            .collect();
        while !todo.is_empty() {
            let damaged = build.damaged.len();
            for i in std::mem::take(&mut todo) {
                build.prepare_file(i, &mut base, &mut sources)?;
            }
            if build.damaged.len() == damaged {
                break;
            }
            for (i, entry) in build.entries.iter().enumerate() {
                if build.links[i].is_some() && entry.chunks.iter().any(|c| build.damaged.contains(&c.id)) {
                    build.links[i] = None;
                    todo.push(i as u32);
                }
            }
        }
        if build.damaged != damaged_before {
            self.save_damaged(&build.damaged);
        }
        let entries = Arc::clone(&build.entries);
        for (i, entry) in entries.iter().enumerate() {
            let Some(link) = build.links[i].clone() else {
                continue;
            };
            let dst = build.dir.join(&entry.path);
            build.create_parent(&dst)?;
            let src = build.base_dir.as_ref().map(|d| d.join(&link));
            let link_to = |src: &Path| match fs::hard_link(src, &dst) {
                // An earlier attempt's copy of the file: the link replaces it.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    remove_any(&dst).and_then(|()| fs::hard_link(src, &dst))
                }
                other => other,
            };
            let linked = src
                .as_deref()
                .map(link_to)
                .unwrap_or_else(|| Err(io::Error::other("no base snapshot")));
            match linked {
                Ok(()) => {
                    build.files_linked += 1;
                    build.bytes_linked += entry.size;
                }
                // E.g. the file's link count is at the file system's limit:
                // a copy of it does as well.
                Err(e) => {
                    tracing::warn!(
                        to = %dst.display(), error = %e,
                        "cannot hard-link an unchanged file; copying it"
                    );
                    build.links[i] = None;
                    build.prepare_file(i as u32, &mut base, &mut sources)?;
                }
            }
        }
        Ok(build)
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
        manifest_chunked(files, CHUNK)
    }

    fn manifest_chunked(files: &[SourceFile], chunk_size: usize) -> (Vec<ManifestEntry>, HashMap<String, Vec<u8>>) {
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
                    .chunks(chunk_size)
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
            bytes: None,
            entries_blake3: None,
            unchanged: false,
        }
    }

    fn day(d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, 10, 30, 0).single().expect("time")
    }

    /// What a build found before fetching.
    #[derive(Debug)]
    struct Planned {
        base: Option<String>,
        missing: Vec<ChunkRef>,
        files_linked: u64,
        bytes_linked: u64,
        bytes_local: u64,
        bytes_resumed: u64,
        bytes_missing: u64,
    }

    fn planned(build: &Build) -> Planned {
        Planned {
            base: build.base.clone(),
            missing: build.missing.clone(),
            files_linked: build.files_linked,
            bytes_linked: build.bytes_linked,
            bytes_local: build.bytes_local,
            bytes_resumed: build.bytes_resumed,
            bytes_missing: build.bytes_missing,
        }
    }

    fn start(store: &JobStore, entries: &[ManifestEntry], run_id: i64) -> Result<Build, String> {
        store.start_build(&header(run_id), Arc::new(entries.to_vec()))
    }

    /// One run: build, fetch what is missing, publish.
    fn run(store: &JobStore, files: &[SourceFile], run_id: i64, now: DateTime<Utc>) -> (Planned, Published) {
        let (entries, chunks) = manifest(files);
        let mut build = start(store, &entries, run_id).expect("build");
        let plan = planned(&build);
        for chunk in &plan.missing {
            build.add_chunk(&chunk.id, &chunks[&chunk.id]).expect("add");
        }
        let published = build.publish_at(store, now).expect("publish");
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

    /// Large files are written around the page cache while their chunks
    /// come in order, and through it when not: the result is the same.
    #[test]
    fn large_files_are_byte_identical_whatever_order_their_chunks_come_in() {
        let pattern = |len: usize, seed: u8| -> Vec<u8> {
            (0..len)
                .map(|i| ((i / 7) as u8).wrapping_mul(13) ^ seed ^ (i >> 12) as u8)
                .collect()
        };
        // b.bin holds one block twice: that chunk goes to two places.
        let mut b = pattern(2 * 1024 * 1024 + 77, 3);
        let repeated = b[..65536].to_vec();
        b[1024 * 1024..1024 * 1024 + 65536].copy_from_slice(&repeated);
        let files: Vec<SourceFile> = vec![
            ("big/a.bin", pattern(5 * 1024 * 1024 + 1234, 1), 0o644, 1),
            ("big/b.bin", b, 0o644, 2),
            ("small.txt", b"small".to_vec(), 0o644, 3),
        ];
        let (entries, chunks) = manifest_chunked(&files, 65536);
        let direct_works = {
            let probe = tempfile::tempdir().expect("probe");
            let path = probe.path().join("p");
            fs::write(&path, b"").expect("probe file");
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&path)
                .is_ok()
        };
        for reversed in [false, true] {
            let root = tempfile::tempdir().expect("root");
            let store = JobStore::open(root.path(), "web").expect("open");
            let mut build = start(&store, &entries, 1).expect("build");
            let mut missing = build.missing.clone();
            if reversed {
                missing.reverse();
            }
            for chunk in &missing {
                build.add_chunk(&chunk.id, &chunks[&chunk.id]).expect("add");
            }
            let direct = build.bytes_direct;
            if direct_works && !reversed {
                // a.bin whole but its last partial block; b.bin up to its
                // repeated block.
                assert!(direct >= 5 * 1024 * 1024, "{direct} bytes written around the cache");
            }
            build.publish_at(&store, day(1)).expect("publish");
            let snap = root.path().join("web/snapshots/2026-11-01T10-30-00Z");
            for (path, body, _, _) in &files {
                assert!(
                    fs::read(snap.join(path)).expect("read") == *body,
                    "{path} (reversed: {reversed})"
                );
            }
        }
    }

    /// A build that stops writes out what it held back for direct writes:
    /// the retry fetches none of it again.
    #[test]
    fn a_stopped_build_keeps_every_chunk_it_was_given() {
        let body: Vec<u8> = (0..3 * 1024 * 1024 + 5)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        let files: Vec<SourceFile> = vec![("big.bin", body, 0o644, 1)];
        let (entries, chunks) = manifest_chunked(&files, 100_000);
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let mut build = start(&store, &entries, 1).expect("build");
        let missing = build.missing.clone();
        let half = &missing[..missing.len() / 2];
        for chunk in half {
            build.add_chunk(&chunk.id, &chunks[&chunk.id]).expect("add");
        }
        drop(build);
        let build = start(&store, &entries, 2).expect("retry");
        let given: u64 = half.iter().map(|c| u64::from(c.len)).sum();
        assert_eq!(build.bytes_resumed, given);
        assert_eq!(build.missing.len(), missing.len() - half.len());
    }

    #[test]
    fn first_run_restores_the_tree_byte_identical() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let files = tree();
        let (plan, published) = run(&store, &files, 7, day(1));
        assert_eq!(plan.base, None);
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
        assert!(listing(&root.path().join("web/staging")).is_empty());
        assert_eq!(store.snapshots().expect("list"), ["2026-11-01T10-30-00Z"]);
    }

    #[test]
    fn an_unchanged_tree_fetches_nothing_and_links_every_file_even_renamed() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let (_, first) = run(&store, &tree(), 1, day(1));
        let (plan, second) = run(&store, &tree(), 2, day(2));
        assert_eq!(plan.base.as_deref(), Some(first.name.as_str()));
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
            let plan_error = start(&store, &entries, 1).expect_err(bad);
            assert!(plan_error.contains("escapes the snapshot"), "{bad:?}: {plan_error}");
            assert!(plan_error.contains(&format!("{bad:?}")), "{plan_error}");
        }
        let mut twice = good.clone();
        twice[1] = twice[0].clone();
        assert!(start(&store, &twice, 1).expect_err("twice").contains("listed twice"));
        let mut short = good.clone();
        short[0].size += 1;
        assert!(start(&store, &short, 1).expect_err("size").contains("add up to"));
        let mut folder = good.clone();
        folder[0].path = "data/a".into();
        assert!(start(&store, &folder, 1).expect_err("folder").contains("both a file"));
        let mut bad_id = good.clone();
        bad_id[0].chunks[0].id = "../../x".into();
        assert!(start(&store, &bad_id, 1).expect_err("id").contains("invalid chunk id"));
        let mut other_job = header(1);
        other_job.job = "db".into();
        assert!(store
            .start_build(&other_job, Arc::new(good.clone()))
            .expect_err("job")
            .contains("job"));
        assert!(JobStore::open(root.path(), "../x").is_err());
        assert!(JobStore::open(root.path(), "a/b").is_err());
        assert!(JobStore::open(root.path(), "..").is_err());
        assert_eq!(listing(root.path()), before, "nothing was written");
        assert!(!root.path().parent().expect("parent").join("evil").exists());
    }

    #[test]
    fn a_chunk_that_does_not_match_its_id_or_was_not_asked_for_is_refused() {
        let root = tempfile::tempdir().expect("root");
        let store = JobStore::open(root.path(), "web").expect("open");
        let (entries, chunks) = manifest(&tree());
        let mut build = start(&store, &entries, 1).expect("build");
        let id = build.missing[0].id.clone();
        let error = build.add_chunk(&id, b"evil").expect_err("mismatch");
        assert!(error.contains(&id) && error.contains("damaged in transit"), "{error}");
        assert!(build.add_chunk("../../escape", b"x").is_err());
        let other = blake3::hash(b"other").to_hex().to_string();
        assert!(build
            .add_chunk(&other, b"other")
            .expect_err("not asked")
            .contains("not asked for"));
        build.add_chunk(&id, &chunks[&id]).expect("good chunk");
        assert!(build
            .add_chunk(&id, &chunks[&id])
            .expect_err("twice")
            .contains("already received"));
        let error = build.publish(&store).expect_err("incomplete");
        assert!(error.contains("was not fetched"), "{error}");
        assert!(store.snapshots().expect("list").is_empty());
        assert!(!root.path().join("web/latest").exists());
    }

    #[test]
    fn a_retry_resumes_with_what_the_failed_attempt_wrote_and_never_writes_through_a_link() {
        let root = tempfile::tempdir().expect("root");
        let (entries, chunks) = manifest(&tree());
        let fetched: Vec<ChunkRef>;
        let outside = root.path().join("outside.html");
        {
            let store = JobStore::open(root.path(), "web").expect("open");
            let mut build = start(&store, &entries, 1).expect("build");
            fetched = build.missing[..3].to_vec();
            for chunk in &fetched {
                build.add_chunk(&chunk.id, &chunks[&chunk.id]).expect("add");
            }
            // The attempt dies here. What else a crash or an older version
            // may leave: a stray file, a stale tree, a hard link to a file
            // outside the build at a path of the new tree.
            drop(build);
            let staged = root.path().join("web/staging");
            fs::write(staged.join("build/data/stray"), b"x").expect("write");
            create_dir(&staged.join("0/data")).expect("mkdir");
            create_dir(&staged.join("chunks")).expect("mkdir");
            fs::write(&outside, b"<html>hello</html>").expect("write");
            fs::hard_link(&outside, staged.join("build/index.html")).expect("link");
        }
        let store = JobStore::open(root.path(), "web").expect("reopen");
        assert_eq!(
            listing(&root.path().join("web/staging")).first().map(String::as_str),
            Some("build")
        );
        assert!(!root.path().join("web/staging/0").exists());
        assert!(!root.path().join("web/staging/chunks").exists());
        let mut build = start(&store, &entries, 2).expect("build");
        let plan = planned(&build);
        assert!(fetched.iter().all(|c| !plan.missing.contains(c)), "{plan:?}");
        assert_eq!(
            plan.bytes_resumed,
            fetched.iter().map(|c| u64::from(c.len)).sum::<u64>()
        );
        assert!(!root.path().join("web/staging/build/data/stray").exists());
        for chunk in &plan.missing {
            build.add_chunk(&chunk.id, &chunks[&chunk.id]).expect("add");
        }
        let published = build.publish_at(&store, day(1)).expect("publish");
        assert_eq!(published.files, 4);
        let snap = root.path().join("web/snapshots").join(&published.name);
        for (path, body, ..) in tree() {
            assert_eq!(fs::read(snap.join(path)).expect("read"), body, "{path}");
        }
        assert_eq!(nlink(&outside), 1, "the link was removed, not written through");
        assert_eq!(fs::read(&outside).expect("read"), b"<html>hello</html>");
    }

    #[test]
    fn a_damaged_chunk_in_the_previous_snapshot_is_fetched_in_the_same_run() {
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
        let mut build = start(&store, &entries, 2).expect("build");
        let rotten_id = blake3::hash(b"<htm").to_hex().to_string();
        assert!(build.missing.iter().any(|c| c.id == rotten_id), "{:?}", build.missing);
        assert_eq!(
            build.files_linked, 3,
            "index.html holds the damaged chunk: built, not linked"
        );
        assert!(root.path().join("web/staging").join(DAMAGED).exists());
        for chunk in build.missing.clone() {
            build.add_chunk(&chunk.id, &chunks[&chunk.id]).expect("add");
        }
        let second = build.publish_at(&store, day(2)).expect("publish");
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
        assert_eq!(plan.base, None);
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
        assert!(listing(&root.path().join("web/staging")).is_empty());
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
