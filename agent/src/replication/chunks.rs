//! The source side of replication, file work only: cutting files into
//! content-defined chunks, remembering the chunk lists of files that did not
//! change, walking an exported folder in a fixed order and serving single
//! chunks back out of it.
//!
//! Chunk boundaries come from the content (FastCDC), so an insertion near the
//! start of a large file shifts only the chunks around it: the destination
//! already holds the others and does not fetch them again.

use std::fs::{self, File, Metadata, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use dicops_proto::{ChunkRef, ManifestEntry};
use fastcdc::v2020::StreamCDC;
use serde::{Deserialize, Serialize};

/// No chunk is shorter than this, except the last one of a file.
pub const MIN_CHUNK: u32 = 16 * 1024;
/// The size FastCDC aims for.
pub const AVG_CHUNK: u32 = 64 * 1024;
/// No chunk is longer than this; also the most `read_chunk` will read.
pub const MAX_CHUNK: u32 = 256 * 1024;

/// The BLAKE3 of a whole file and its chunk list, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileChunks {
    /// BLAKE3 of the whole file, hex.
    pub blake3: String,
    pub chunks: Vec<ChunkRef>,
}

// ---------------------------------------------------------------------------
// Chunking
// ---------------------------------------------------------------------------

/// Cuts `reader` into chunks and hashes the whole stream in the same pass.
/// Returns the chunks and the number of bytes read. Memory stays at about
/// one `MAX_CHUNK` buffer whatever the size of the input.
fn chunk_reader<R: Read>(reader: R, size_hint: u64) -> std::io::Result<(FileChunks, u64)> {
    if size_hint < PARALLEL_HASH_FROM {
        let mut named = Named::default();
        let total = cut_stream(reader, |data| named.add(&data))?;
        return Ok((named.finish(), total));
    }
    // A large file: cutting (reading, the rolling hash) runs on this core
    // while the chunks are named and the whole file hashed on a second one:
    // the two halves of the work are about equal, and the manifest of a
    // fresh tree is bound by them.
    std::thread::scope(|scope| {
        let (send, receive) = std::sync::mpsc::sync_channel::<Vec<u8>>(16);
        let namer = scope.spawn(move || {
            let mut named = Named::default();
            for data in receive {
                named.add(&data);
            }
            named
        });
        let cut = cut_stream(reader, |data| {
            // The receiver only stops when this sender is dropped.
            let _ = send.send(data);
        });
        drop(send);
        let named = namer
            .join()
            .map_err(|_| std::io::Error::other("the hashing thread panicked"))?;
        Ok((named.finish(), cut?))
    })
}

/// Files from this size are cut on one thread and hashed on another.
const PARALLEL_HASH_FROM: u64 = 8 << 20;

/// Cuts `reader` into content-defined chunks and hands each one's bytes, in
/// order, to `each`; returns the number of bytes read.
fn cut_stream<R: Read>(reader: R, mut each: impl FnMut(Vec<u8>)) -> std::io::Result<u64> {
    let mut total = 0u64;
    for chunk in StreamCDC::new(reader, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK) {
        let chunk = chunk.map_err(std::io::Error::from)?;
        if chunk.data.len() > MAX_CHUNK as usize {
            return Err(std::io::Error::other(
                "the chunker returned a chunk longer than MAX_CHUNK",
            ));
        }
        total += chunk.data.len() as u64;
        each(chunk.data);
    }
    Ok(total)
}

/// The chunk list and whole-file hash of a file, fed chunk by chunk.
#[derive(Default)]
struct Named {
    chunks: Vec<ChunkRef>,
    whole: blake3::Hasher,
}

impl Named {
    fn add(&mut self, data: &[u8]) {
        self.chunks.push(ChunkRef {
            id: blake3::hash(data).to_hex().to_string(),
            // cut_stream refuses chunks longer than MAX_CHUNK.
            len: data.len() as u32,
        });
        self.whole.update(data);
    }

    fn finish(self) -> FileChunks {
        FileChunks {
            blake3: self.whole.finalize().to_hex().to_string(),
            chunks: self.chunks,
        }
    }
}

/// Opens a file for reading without following a symlink in the final
/// component (the source never replicates symlinks, and a file swapped for
/// one must not lead outside the folder). `O_NONBLOCK` keeps a regular file
/// swapped for a FIFO from hanging the open; it changes nothing for regular
/// files.
fn open_nofollow(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

fn describe_open(path: &Path, e: &std::io::Error) -> String {
    if e.raw_os_error() == Some(libc::ELOOP) {
        format!("cannot read {}: it is a symbolic link", path.display())
    } else {
        format!("cannot read {}: {e}", path.display())
    }
}

/// Chunks one file, streaming: never holds more than a chunk of it in
/// memory. A symlink is refused, not followed. An empty file has no chunks
/// and the BLAKE3 of the empty input. (The walk chunks through its own
/// change-detecting path; this is the plain form, for tests and tools.)
#[cfg(test)]
pub fn chunk_file(path: &Path) -> Result<FileChunks, String> {
    let file = open_nofollow(path).map_err(|e| describe_open(path, &e))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("cannot read {}: not a regular file", path.display()));
    }
    chunk_reader(&file, meta.len())
        .map(|(chunks, _)| chunks)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Nanoseconds since the epoch, saturating (a file dated in the year 2300
/// must not make the walk fail).
fn mtime_ns(meta: &Metadata) -> i64 {
    meta.mtime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.mtime_nsec())
}

fn ctime_ns(meta: &Metadata) -> i64 {
    meta.ctime()
        .saturating_mul(1_000_000_000)
        .saturating_add(meta.ctime_nsec())
}

// ---------------------------------------------------------------------------
// The chunk-list cache
// ---------------------------------------------------------------------------

/// What identifies one state of a file without reading it. `ctime` is there
/// on top of size and mtime because a writer can put the mtime back
/// (`rsync --inplace -t`, `touch -r`), and nothing can put the ctime back;
/// a chmod costs one needless re-read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileState {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    inode: u64,
}

impl FileState {
    pub fn of(meta: &Metadata) -> FileState {
        FileState {
            size: meta.len(),
            mtime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            inode: meta.ino(),
        }
    }
}

/// The first line of the cache file. The chunk sizes are part of it: a
/// cache made with other sizes describes other chunks and is thrown away.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct CacheHeader {
    format: String,
    version: u32,
    min: u32,
    avg: u32,
    max: u32,
}

const CACHE_FORMAT: &str = "dicops-chunk-cache";
const CACHE_VERSION: u32 = 1;

impl CacheHeader {
    fn current() -> CacheHeader {
        CacheHeader {
            format: CACHE_FORMAT.to_string(),
            version: CACHE_VERSION,
            min: MIN_CHUNK,
            avg: AVG_CHUNK,
            max: MAX_CHUNK,
        }
    }
}

/// One file of the cache, one JSON line; short keys because there is one
/// line per file of the tree.
#[derive(Debug, Serialize, Deserialize)]
struct CacheLine {
    /// Relative path.
    p: String,
    s: u64,
    m: i64,
    t: i64,
    i: u64,
    /// BLAKE3 of the file, hex.
    b: String,
    /// (id, len) of each chunk. Left out for an empty file and for a file
    /// of one chunk, whose id is the file's BLAKE3: most files of a backup
    /// tree are small.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    c: Vec<(String, u32)>,
}

impl CacheLine {
    fn new(path: &str, state: FileState, chunks: &FileChunks) -> CacheLine {
        CacheLine {
            p: path.to_string(),
            s: state.size,
            m: state.mtime_ns,
            t: state.ctime_ns,
            i: state.inode,
            b: chunks.blake3.clone(),
            c: if chunks.chunks.len() <= 1 {
                Vec::new()
            } else {
                chunks.chunks.iter().map(|c| (c.id.clone(), c.len)).collect()
            },
        }
    }

    fn state(&self) -> FileState {
        FileState {
            size: self.s,
            mtime_ns: self.m,
            ctime_ns: self.t,
            inode: self.i,
        }
    }

    /// Hex ids, lengths adding up to the size, a safe path: what `load`
    /// checks so that a hit never yields a wrong manifest entry.
    fn check(&self) -> Result<(), String> {
        let is_id = |id: &str| id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !is_safe_relative_path(&self.p) {
            return Err(format!("unsafe path {:?}", self.p));
        }
        if !is_id(&self.b) || !self.c.iter().all(|(id, _)| is_id(id)) {
            return Err(format!("bad hash for {:?}", self.p));
        }
        let consistent = match self.c.len() {
            0 => self.s <= u64::from(MAX_CHUNK),
            1 => false,
            _ => self.c.iter().map(|(_, len)| u64::from(*len)).sum::<u64>() == self.s,
        };
        if !consistent {
            return Err(format!("chunk lengths of {:?} do not add up to its size", self.p));
        }
        Ok(())
    }

    fn file_chunks(&self) -> FileChunks {
        let chunks = if !self.c.is_empty() {
            self.c
                .iter()
                .map(|(id, len)| ChunkRef {
                    id: id.clone(),
                    len: *len,
                })
                .collect()
        } else if self.s == 0 {
            Vec::new()
        } else {
            // `check` holds: the size fits a u32.
            let len = u32::try_from(self.s).unwrap_or(MAX_CHUNK);
            vec![ChunkRef {
                id: self.b.clone(),
                len,
            }]
        };
        FileChunks {
            blake3: self.b.clone(),
            chunks,
        }
    }
}

/// Files modified this recently are not cached: a write in the same tick of
/// a coarse file-system clock (2 s on FAT) would leave size and mtime as
/// they were, and the cache would keep the old chunks.
const RACY_WINDOW_NS: i64 = 2_000_000_000;

/// The chunk lists of the files of one tree, keyed by relative path and
/// checked against size, mtime, ctime and inode, so that a walk over an
/// unchanged tree reads no file. Kept on disk between runs (`load`, `save`);
/// one cache per exported folder.
///
/// Nothing of it is held in memory: its entries stay in a file, sorted by
/// path, the order of the walk, which reads them forward like a merge and
/// writes the entries of what it sees to a new (unlinked) file. A tree of
/// millions of files or of many TiB costs a few buffers.
#[derive(Debug)]
pub struct ChunkCache {
    /// The entries, sorted by path, from this offset on: the loaded file
    /// (after its header) until a walk, then what the last walk saw.
    /// `None`: empty.
    entries: Option<(File, u64)>,
    /// Where a walk writes what it sees.
    spill_dir: PathBuf,
    /// For the logs.
    name: String,
}

impl Default for ChunkCache {
    fn default() -> ChunkCache {
        ChunkCache::new()
    }
}

impl ChunkCache {
    /// An empty cache, with its working file in the temporary folder.
    pub fn new() -> ChunkCache {
        ChunkCache {
            entries: None,
            spill_dir: std::env::temp_dir(),
            name: "(new chunk cache)".to_string(),
        }
    }

    /// Opens a cache file and checks it through. A missing file is an
    /// empty cache (first run); a corrupt or unreadable one too, with a
    /// warning: the cache only saves work, losing it costs one full read of
    /// the tree. The walk's working file goes in the same folder.
    pub fn load(path: &Path) -> ChunkCache {
        let mut cache = ChunkCache {
            entries: None,
            spill_dir: folder_of(path).to_path_buf(),
            name: path.display().to_string(),
        };
        let file = match File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return cache,
            Err(e) => {
                tracing::warn!(cache = %path.display(), error = %e, "cannot read the chunk cache; starting with an empty one");
                return cache;
            }
        };
        match check_cache(BufReader::new(&file)) {
            Ok(Some(start)) => cache.entries = Some((file, start)),
            Ok(None) => {
                tracing::info!(cache = %path.display(), "the chunk cache was made with other chunk sizes; starting with an empty one");
            }
            Err(e) => {
                tracing::warn!(cache = %path.display(), error = %e, "the chunk cache is corrupt; starting with an empty one");
            }
        }
        cache
    }

    /// Whether `path` already holds what [`ChunkCache::save`] would write:
    /// after a walk that took every file from the cache (`all_hits`), the
    /// entries are the old ones exactly when they have the same length (a
    /// file gone shortens them; a new or changed one is not a hit). Saving
    /// then only costs a rewrite and an fsync of the whole cache.
    pub fn same_as_saved(&self, path: &Path, all_hits: bool) -> bool {
        let Some((entries, start)) = &self.entries else {
            return false;
        };
        let Ok(header) = serde_json::to_vec(&CacheHeader::current()) else {
            return false;
        };
        let (Ok(walked), Ok(saved)) = (entries.metadata(), fs::metadata(path)) else {
            return false;
        };
        all_hits && walked.len().saturating_sub(*start) + header.len() as u64 + 1 == saved.len()
    }

    /// Writes the cache atomically: a temporary file in the same folder,
    /// flushed to disk, then renamed over `path`, so that a crash leaves the
    /// old cache or the new one, never half of one. After a walk, only the
    /// files that walk saw are written: deleted files do not accumulate.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let dir = folder_of(path);
        let name = path
            .file_name()
            .ok_or_else(|| format!("cannot save the chunk cache to {}: not a file name", path.display()))?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(name);
        tmp_name.push(format!(".tmp.{}", std::process::id()));
        let tmp = dir.join(tmp_name);
        let result = self.write_to(&tmp).and_then(|()| {
            fs::rename(&tmp, path).map_err(|e| format!("cannot save the chunk cache to {}: {e}", path.display()))
        });
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
            return result;
        }
        // The rename itself is durable only once the folder is synced.
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| format!("cannot sync folder {}: {e}", dir.display()))
    }

    fn write_to(&self, tmp: &Path) -> Result<(), String> {
        let err = |e: &dyn std::fmt::Display| format!("cannot write the chunk cache {}: {e}", tmp.display());
        let file = File::create(tmp).map_err(|e| err(&e))?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        serde_json::to_writer(&mut out, &CacheHeader::current()).map_err(|e| err(&e))?;
        out.write_all(b"\n").map_err(|e| err(&e))?;
        if let Some((entries, start)) = &self.entries {
            // Positional reads: `&self` leaves the file offset alone.
            let mut buf = vec![0u8; 1 << 16];
            let mut at = *start;
            loop {
                let n = entries
                    .read_at(&mut buf, at)
                    .map_err(|e| format!("cannot read the chunk cache {}: {e}", self.name))?;
                if n == 0 {
                    break;
                }
                out.write_all(&buf[..n]).map_err(|e| err(&e))?;
                at += n as u64;
            }
        }
        let file = out.into_inner().map_err(|e| err(e.error()))?;
        file.sync_all().map_err(|e| err(&e))
    }

    /// Starts a walk: the current entries become the old ones, read
    /// forward; a new working file receives what the walk sees. Without a
    /// working file the walk still uses the old entries, and the cache is
    /// empty after it.
    fn begin_walk(&mut self) -> CacheWalk {
        let old = self
            .entries
            .take()
            .and_then(|(mut file, start)| match file.seek(SeekFrom::Start(start)) {
                Ok(_) => Some(BufReader::with_capacity(1 << 16, file).lines()),
                Err(e) => {
                    tracing::warn!(cache = %self.name, error = %e, "cannot read the chunk cache");
                    None
                }
            });
        let spill = match create_spill(&self.spill_dir) {
            Ok(file) => Some(BufWriter::with_capacity(1 << 16, file)),
            Err(e) => {
                tracing::warn!(cache = %self.name, folder = %self.spill_dir.display(), error = %e, "cannot create the working file of the chunk cache; this walk will not be remembered");
                None
            }
        };
        CacheWalk {
            old,
            peeked: None,
            old_read: 0,
            previous: None,
            spill,
            name: self.name.clone(),
        }
    }

    /// Ends a walk. After a walk that stopped early, the old entries it did
    /// not reach are kept: a file that was being written must not cost a
    /// re-read of the rest of the tree next time.
    fn end_walk(&mut self, walk: CacheWalk, complete: bool) {
        self.entries = walk.finish(complete).map(|file| (file, 0));
    }
}

/// The folder of a file path (`.` for a bare name).
fn folder_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// A new file, read-write, already unlinked: nothing to clean up after a
/// crash.
fn create_spill(dir: &Path) -> std::io::Result<File> {
    let path = dir.join(format!(".dicops-chunk-cache.{}.{}.walk", std::process::id(), now_ns()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    fs::remove_file(&path)?;
    Ok(file)
}

/// Checks a cache file's header. Returns the offset of the first entry, or
/// `None` when it was made with other chunk sizes or another format
/// version. The entries are checked as a walk reads them (see
/// `CacheWalk::next_old`): reading them all here as well would double the
/// cost of walking an unchanged tree.
fn check_cache<R: BufRead>(mut reader: R) -> Result<Option<u64>, String> {
    let mut first = String::new();
    let start = reader.read_line(&mut first).map_err(|e| e.to_string())?;
    if start == 0 {
        return Err("the file is empty".to_string());
    }
    let header: CacheHeader = serde_json::from_str(&first).map_err(|e| format!("bad header: {e}"))?;
    if header.format != CACHE_FORMAT {
        return Err(format!("not a chunk cache (format {:?})", header.format));
    }
    if header != CacheHeader::current() {
        return Ok(None);
    }
    Ok(Some(start as u64))
}

/// The cache during a walk: the old entries read forward as the walk goes
/// (both are in path order), the new ones written out.
struct CacheWalk {
    old: Option<std::io::Lines<BufReader<File>>>,
    /// An old entry read ahead (with its text): its path is past the walk's.
    peeked: Option<(CacheLine, String)>,
    /// Old entries read so far, and the last one's path: the entries must
    /// come in strictly increasing path order.
    old_read: u64,
    previous: Option<String>,
    spill: Option<BufWriter<File>>,
    name: String,
}

impl CacheWalk {
    /// The next old entry, checked: well-formed, consistent, and past the
    /// previous one. A bad entry ends the use of the old cache (what was
    /// read before it was good; the rest of the tree is read again).
    fn next_old(&mut self) -> Option<(CacheLine, String)> {
        if let Some(line) = self.peeked.take() {
            return Some(line);
        }
        let text = self.old.as_mut()?.next()?;
        self.old_read += 1;
        let line = self.old_read + 1;
        let result = text.map_err(|e| e.to_string()).and_then(|text| {
            let parsed: CacheLine = serde_json::from_str(&text).map_err(|e| format!("line {line}: {e}"))?;
            parsed.check().map_err(|e| format!("line {line}: {e}"))?;
            if self.previous.as_deref().is_some_and(|p| p >= parsed.p.as_str()) {
                return Err(format!("line {line}: paths out of order"));
            }
            Ok((parsed, text))
        });
        match result {
            Ok((parsed, text)) => {
                self.previous = Some(parsed.p.clone());
                Some((parsed, text))
            }
            Err(e) => {
                tracing::warn!(cache = %self.name, error = %e, "the chunk cache is corrupt; not using the rest of it");
                self.old = None;
                None
            }
        }
    }

    /// The chunks of `rel` if it is still in the state they were made
    /// from. Old entries before `rel` are files that are gone: dropped.
    fn lookup(&mut self, rel: &str, state: FileState) -> Option<FileChunks> {
        while let Some((line, text)) = self.next_old() {
            match line.p.as_str().cmp(rel) {
                std::cmp::Ordering::Less => continue,
                std::cmp::Ordering::Equal if line.state() == state => {
                    let chunks = line.file_chunks();
                    // The checked text as it was: no need to write it anew.
                    self.write_text(&text);
                    return Some(chunks);
                }
                std::cmp::Ordering::Equal => return None,
                std::cmp::Ordering::Greater => {
                    self.peeked = Some((line, text));
                    return None;
                }
            }
        }
        None
    }

    /// Remembers the chunks of `rel`, unless it was modified too recently
    /// to trust its mtime (see `RACY_WINDOW_NS`).
    fn record(&mut self, rel: &str, state: FileState, chunks: &FileChunks, read_started_ns: i64) {
        if state.mtime_ns <= read_started_ns.saturating_sub(RACY_WINDOW_NS) {
            self.write(&CacheLine::new(rel, state, chunks));
        }
    }

    fn write(&mut self, line: &CacheLine) {
        let Some(out) = self.spill.as_mut() else { return };
        let written = serde_json::to_writer(&mut *out, line)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"));
        if let Err(e) = written {
            tracing::warn!(cache = %self.name, error = %e, "cannot write the chunk cache; this walk will not be remembered");
            self.spill = None;
        }
    }

    fn write_text(&mut self, text: &str) {
        let Some(out) = self.spill.as_mut() else { return };
        let written = out.write_all(text.as_bytes()).and_then(|()| out.write_all(b"\n"));
        if let Err(e) = written {
            tracing::warn!(cache = %self.name, error = %e, "cannot write the chunk cache; this walk will not be remembered");
            self.spill = None;
        }
    }

    /// The file of the entries this walk saw (plus, if it stopped early,
    /// the old entries it did not reach), or `None` if it could not be
    /// written.
    fn finish(mut self, complete: bool) -> Option<File> {
        if !complete {
            while let Some((_, text)) = self.next_old() {
                self.write_text(&text);
            }
        }
        let out = self.spill.take()?;
        match out.into_inner() {
            Ok(file) => Some(file),
            Err(e) => {
                tracing::warn!(cache = %self.name, error = %e.error(), "cannot write the chunk cache; this walk will not be remembered");
                None
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The walk
// ---------------------------------------------------------------------------

/// What a walk saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WalkStats {
    /// Regular files visited.
    pub files: u64,
    /// Their total size.
    pub bytes: u64,
    pub skipped_symlinks: u64,
    /// Sockets, FIFOs and devices.
    pub skipped_special: u64,
    /// Files and folders whose name is not UTF-8 (a folder counts once and
    /// its content is not visited).
    pub skipped_non_utf8: u64,
    /// Files whose chunks came from the cache.
    pub cache_hits: u64,
    /// Bytes actually read to chunk files (a re-read counts twice).
    pub bytes_read: u64,
}

/// One name in a folder, as the walk will handle it.
struct Child {
    name: String,
    is_dir: bool,
}

/// Folders sort as `name/`: depth-first in this order visits the files in
/// the byte order of their full relative paths (`a-b`, `a.txt`, `a/x`), the
/// order of the manifest.
fn sort_children(children: &mut [Child]) {
    children.sort_unstable_by(|a, b| {
        let a_key = a.name.as_bytes().iter().chain(if a.is_dir { &b"/"[..] } else { &[] });
        let b_key = b.name.as_bytes().iter().chain(if b.is_dir { &b"/"[..] } else { &[] });
        a_key.cmp(b_key)
    });
}

/// A folder being walked.
struct Frame {
    dir: PathBuf,
    /// Its relative path, `""` for the root.
    prefix: String,
    children: std::vec::IntoIter<Child>,
}

fn join_rel(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}/{name}")
    }
}

fn describe_dir(dir: &Path, e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => format!("folder {} does not exist", dir.display()),
        std::io::ErrorKind::PermissionDenied => format!("folder {} cannot be read: permission denied", dir.display()),
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => format!("{} is not a folder", dir.display()),
        _ => format!("folder {} cannot be read: {e}", dir.display()),
    }
}

/// Counts and logs a name that is neither a regular file nor a folder.
fn skip_other(path: &Path, file_type: &fs::FileType, stats: &mut WalkStats) {
    if file_type.is_symlink() {
        tracing::debug!(path = %path.display(), "not replicating a symbolic link");
        stats.skipped_symlinks += 1;
    } else {
        let kind = if file_type.is_fifo() {
            "FIFO"
        } else if file_type.is_socket() {
            "socket"
        } else {
            "device"
        };
        tracing::debug!(path = %path.display(), kind, "not replicating a special file");
        stats.skipped_special += 1;
    }
}

/// The files and folders directly in `dir`, sorted; `None` if the folder
/// disappeared since it was listed in its parent.
fn list_dir(dir: &Path, stats: &mut WalkStats) -> Result<Option<Vec<Child>>, String> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(folder = %dir.display(), "folder deleted during the walk");
            return Ok(None);
        }
        Err(e) => return Err(describe_dir(dir, &e)),
    };
    let mut children = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| describe_dir(dir, &e))?;
        let file_name = entry.file_name();
        let Some(name) = file_name.to_str() else {
            tracing::warn!(folder = %dir.display(), name = ?file_name, "not replicating a file whose name is not UTF-8");
            stats.skipped_non_utf8 += 1;
            continue;
        };
        // From the folder entry when the file system says; else an lstat.
        // Never follows a symlink.
        let file_type = match entry.file_type() {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(format!("cannot read {}: {e}", entry.path().display())),
        };
        if file_type.is_dir() || file_type.is_file() {
            children.push(Child {
                name: name.to_string(),
                is_dir: file_type.is_dir(),
            });
        } else {
            skip_other(&entry.path(), &file_type, stats);
        }
    }
    sort_children(&mut children);
    Ok(Some(children))
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Reads and chunks one file, checking that it did not change meanwhile
/// (same size and mtime before and after, and exactly `size` bytes read).
/// A change means a writer is at work: one more try, then an error, never
/// the chunks of a torn file. `None` if the file is gone or is no longer a
/// regular file.
fn chunk_stable(path: &Path, stats: &mut WalkStats) -> Result<Option<(Metadata, FileChunks, i64)>, String> {
    for attempt in 0..2 {
        let started = now_ns();
        let file = match open_nofollow(path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ELOOP) => {
                tracing::debug!(path = %path.display(), "file deleted or replaced during the walk");
                return Ok(None);
            }
            Err(e) => return Err(describe_open(path, &e)),
        };
        let read_err = |e: std::io::Error| format!("cannot read {}: {e}", path.display());
        let before = file.metadata().map_err(read_err)?;
        if !before.is_file() {
            tracing::debug!(path = %path.display(), "file replaced during the walk");
            return Ok(None);
        }
        let (chunks, read) = chunk_reader(&file, before.len()).map_err(read_err)?;
        stats.bytes_read += read;
        let after = file.metadata().map_err(read_err)?;
        let stable = read == before.len()
            && after.len() == before.len()
            && mtime_ns(&after) == mtime_ns(&before)
            && ctime_ns(&after) == ctime_ns(&before);
        if stable {
            return Ok(Some((before, chunks, started)));
        }
        tracing::debug!(path = %path.display(), attempt, "file changed while it was being read");
    }
    Err(format!(
        "{} changed while it was being read: something is still writing it",
        path.display()
    ))
}

/// The manifest entry of one regular file, from the cache or by reading
/// it; `None` if it disappeared or stopped being a regular file.
fn visit_file(
    path: &Path,
    rel: String,
    cache: &mut CacheWalk,
    stats: &mut WalkStats,
) -> Result<Option<(ManifestEntry, FileState)>, String> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::debug!(path = %path.display(), "file deleted during the walk");
            return Ok(None);
        }
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if !meta.is_file() {
        skip_other(path, &meta.file_type(), stats);
        return Ok(None);
    }
    let (meta, chunks) = match cache.lookup(&rel, FileState::of(&meta)) {
        Some(chunks) => {
            stats.cache_hits += 1;
            (meta, chunks)
        }
        None => {
            let Some((meta, chunks, started)) = chunk_stable(path, stats)? else {
                return Ok(None);
            };
            cache.record(&rel, FileState::of(&meta), &chunks, started);
            (meta, chunks)
        }
    };
    let entry = ManifestEntry {
        path: rel,
        size: meta.len(),
        mode: meta.mode() & 0o777,
        mtime_ns: mtime_ns(&meta),
        blake3: chunks.blake3,
        chunks: chunks.chunks,
    };
    Ok(Some((entry, FileState::of(&meta))))
}

/// Visits every regular file under `root`, in the byte order of their
/// relative paths, depth-first: only the folders on the current path are
/// held in memory, so trees of any size stream. Symlinks (never followed),
/// sockets, FIFOs, devices and names that are not UTF-8 are skipped and
/// counted. Files are chunked, or their chunks taken from `cache` when
/// their size, mtime, ctime and inode did not change. The first error of
/// `visit` stops the walk and is returned.
///
/// Afterwards `cache` holds the files this walk saw; if it stopped on an
/// error, also the old entries of the files it did not reach.
pub fn walk(
    root: &Path,
    cache: &mut ChunkCache,
    visit: impl FnMut(ManifestEntry, FileState) -> Result<(), String>,
) -> Result<WalkStats, String> {
    let meta = fs::metadata(root).map_err(|e| describe_dir(root, &e))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a folder", root.display()));
    }
    let mut cache_walk = cache.begin_walk();
    let mut stats = WalkStats::default();
    let result = walk_tree(root, &mut cache_walk, &mut stats, visit);
    cache.end_walk(cache_walk, result.is_ok());
    result.map(|()| stats)
}

fn walk_tree(
    root: &Path,
    cache: &mut CacheWalk,
    stats: &mut WalkStats,
    mut visit: impl FnMut(ManifestEntry, FileState) -> Result<(), String>,
) -> Result<(), String> {
    walk_names(root, stats, |path, rel, stats| {
        if let Some((entry, state)) = visit_file(path, rel, cache, stats)? {
            stats.files += 1;
            stats.bytes += entry.size;
            visit(entry, state)?;
        }
        Ok(())
    })
}

/// Calls `on_file` with the path and relative path of every name under
/// `root` that is not a folder, a symlink or special, in walk order.
fn walk_names(
    root: &Path,
    stats: &mut WalkStats,
    mut on_file: impl FnMut(&Path, String, &mut WalkStats) -> Result<(), String>,
) -> Result<(), String> {
    let children = list_dir(root, stats)?.ok_or_else(|| format!("folder {} does not exist", root.display()))?;
    let mut stack = vec![Frame {
        dir: root.to_path_buf(),
        prefix: String::new(),
        children: children.into_iter(),
    }];
    while let Some(frame) = stack.last_mut() {
        let Some(child) = frame.children.next() else {
            stack.pop();
            continue;
        };
        let path = frame.dir.join(&child.name);
        let rel = join_rel(&frame.prefix, &child.name);
        if child.is_dir {
            if let Some(children) = list_dir(&path, stats)? {
                stack.push(Frame {
                    dir: path,
                    prefix: rel,
                    children: children.into_iter(),
                });
            }
            continue;
        }
        on_file(&path, rel, stats)?;
    }
    Ok(())
}

/// What a tree's files are, without reading them: one hash over the path,
/// size, mtime, ctime, inode and mode of every regular file, in walk order.
/// An equal state means a walk would make the same manifest (nothing can
/// change a file's bytes or mode without changing its ctime), unless a
/// file changed so shortly before the state was taken that a later write
/// could keep the same timestamps: such a state is not trusted (`None`).
pub struct TreeState {
    hasher: blake3::Hasher,
    started_ns: i64,
    racy: bool,
}

impl Default for TreeState {
    fn default() -> TreeState {
        TreeState::new()
    }
}

impl TreeState {
    pub fn new() -> TreeState {
        TreeState {
            hasher: blake3::Hasher::new(),
            started_ns: now_ns(),
            racy: false,
        }
    }

    pub fn add(&mut self, rel: &str, state: &FileState, mode: u32) {
        self.hasher.update(rel.as_bytes());
        self.hasher.update(&[0]);
        for field in [
            state.size,
            state.mtime_ns as u64,
            state.ctime_ns as u64,
            state.inode,
            u64::from(mode),
        ] {
            self.hasher.update(&field.to_le_bytes());
        }
        let newest = state.mtime_ns.max(state.ctime_ns);
        self.racy |= newest > self.started_ns.saturating_sub(RACY_WINDOW_NS);
    }

    pub fn finish(self) -> Option<String> {
        (!self.racy).then(|| self.hasher.finalize().to_hex().to_string())
    }
}

/// The [`TreeState`] of `root` from its folders and an lstat of each file:
/// no file is read and the chunk cache is not used.
pub fn tree_state(root: &Path) -> Result<Option<String>, String> {
    let meta = fs::metadata(root).map_err(|e| describe_dir(root, &e))?;
    if !meta.is_dir() {
        return Err(format!("{} is not a folder", root.display()));
    }
    let mut tree = TreeState::new();
    walk_names(root, &mut WalkStats::default(), |path, rel, _| {
        match fs::symlink_metadata(path) {
            Ok(meta) if meta.is_file() => tree.add(&rel, &FileState::of(&meta), meta.mode() & 0o777),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        }
        Ok(())
    })?;
    Ok(tree.finish())
}

// ---------------------------------------------------------------------------
// Serving chunks
// ---------------------------------------------------------------------------

/// Why a chunk could not be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkReadError {
    /// The file no longer holds these bytes there (modified, shortened or
    /// deleted since the manifest was made): the run needs a new manifest.
    #[error("the file changed since the manifest was made")]
    Changed,
    /// Anything else; names the file and the cause.
    #[error("{0}")]
    Io(String),
}

/// The offset of each chunk of `entry` in the file, with the chunk.
pub fn chunk_offsets(entry: &ManifestEntry) -> impl Iterator<Item = (u64, &ChunkRef)> {
    entry.chunks.iter().scan(0u64, |offset, chunk| {
        let at = *offset;
        *offset += u64::from(chunk.len);
        Some((at, chunk))
    })
}

/// Refuses a path under `root` that goes through a symlink: the folders on
/// the way are checked with lstat, the final name by `O_NOFOLLOW`. (A
/// folder swapped for a symlink between the check and the open is not
/// caught; the bytes must still hash to an id of the manifest.)
fn check_no_symlink_dirs(root: &Path, entry_path: &str) -> Result<(), ChunkReadError> {
    let mut dir = root.to_path_buf();
    let components: Vec<&str> = entry_path.split('/').collect();
    let Some((_, parents)) = components.split_last() else {
        return Ok(());
    };
    for component in parents {
        dir.push(component);
        match fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(meta) if meta.file_type().is_symlink() => {
                return Err(ChunkReadError::Io(format!(
                    "refusing to read through {}: it is a symbolic link",
                    dir.display()
                )))
            }
            Ok(_) => return Err(ChunkReadError::Changed),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ChunkReadError::Changed),
            Err(e) => return Err(ChunkReadError::Io(format!("cannot read {}: {e}", dir.display()))),
        }
    }
    Ok(())
}

/// Reads `len` bytes at `offset` of `root/entry_path` and checks that they
/// are still the chunk `expected_id`: when the file's size, mtime, ctime and
/// inode are `known` (those the manifest was made from) before and after
/// the read, it is (nothing can write a file without changing its ctime),
/// and hashing again would only cost CPU; otherwise the bytes must hash to
/// the id. (The destination checks every chunk against its id anyway.) The
/// path must be a safe relative path and must not go through a symlink;
/// `len` is at most `MAX_CHUNK`, so a peer cannot make the agent allocate
/// more.
pub fn read_chunk(
    root: &Path,
    entry_path: &str,
    offset: u64,
    len: u32,
    expected_id: &str,
    known: Option<FileState>,
) -> Result<Vec<u8>, ChunkReadError> {
    if !is_safe_relative_path(entry_path) {
        return Err(ChunkReadError::Io(format!(
            "refusing to read {entry_path:?}: not a safe relative path"
        )));
    }
    if len > MAX_CHUNK {
        return Err(ChunkReadError::Io(format!(
            "refusing to read {len} bytes of {entry_path:?}: chunks are at most {MAX_CHUNK} bytes"
        )));
    }
    let expected = blake3::Hash::from_hex(expected_id)
        .map_err(|e| ChunkReadError::Io(format!("bad chunk id {expected_id:?}: {e}")))?;
    check_no_symlink_dirs(root, entry_path)?;
    let path = root.join(entry_path);
    let file = match open_nofollow(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ChunkReadError::Changed),
        Err(e) => return Err(ChunkReadError::Io(describe_open(&path, &e))),
    };
    let meta = file
        .metadata()
        .map_err(|e| ChunkReadError::Io(format!("cannot read {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(ChunkReadError::Io(format!(
            "cannot read {}: not a regular file",
            path.display()
        )));
    }
    let mut buf = vec![0u8; len as usize];
    match file.read_exact_at(&mut buf, offset) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(ChunkReadError::Changed),
        Err(e) => return Err(ChunkReadError::Io(format!("cannot read {}: {e}", path.display()))),
    }
    let unchanged = known.is_some_and(|known| {
        FileState::of(&meta) == known && file.metadata().is_ok_and(|after| FileState::of(&after) == known)
    });
    if !unchanged && blake3::hash(&buf) != expected {
        return Err(ChunkReadError::Changed);
    }
    Ok(buf)
}

// ---------------------------------------------------------------------------
// Paths from peers
// ---------------------------------------------------------------------------

/// True only for a non-empty relative path of `/`-separated components that
/// are neither empty, `.` nor `..`, without NUL: a path that stays under
/// the folder it is joined to. The destination checks everything a source
/// sends with it; the source checks what a peer asks for.
pub fn is_safe_relative_path(path: &str) -> bool {
    !path.is_empty()
        && !path.starts_with('/')
        && !path.contains('\0')
        && path.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Deterministic pseudo-random bytes (xorshift64*).
    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Writes a file and dates it an hour back, out of the racy window.
    fn write_old(path: &Path, data: &[u8]) {
        fs::write(path, data).expect("write");
        set_mtime(path, SystemTime::now() - Duration::from_secs(3600));
    }

    fn set_mtime(path: &Path, when: SystemTime) {
        File::options()
            .write(true)
            .open(path)
            .expect("open")
            .set_modified(when)
            .expect("set mtime");
    }

    /// How many files `cache` would save.
    fn cached_files(cache: &ChunkCache) -> usize {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("count");
        cache.save(&path).expect("save");
        fs::read_to_string(&path).expect("read").lines().count() - 1
    }

    fn walk_all(root: &Path, cache: &mut ChunkCache) -> (Vec<ManifestEntry>, WalkStats) {
        let mut entries = Vec::new();
        let stats = walk(root, cache, |e, _| {
            entries.push(e);
            Ok(())
        })
        .expect("walk");
        (entries, stats)
    }

    #[test]
    fn a_large_file_hashed_on_two_cores_gets_the_same_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = pseudo_random((PARALLEL_HASH_FROM + 3 * 1024 * 1024 + 17) as usize, 5);
        let path = dir.path().join("big");
        write_old(&path, &data);
        let parallel = chunk_file(&path).expect("chunk");
        let (inline, total) = chunk_reader(&data[..], 0).expect("chunk inline");
        assert_eq!(total, data.len() as u64);
        assert_eq!(parallel, inline);
        assert_eq!(parallel.blake3, blake3::hash(&data).to_hex().to_string());
        let mut offset = 0usize;
        for chunk in &parallel.chunks {
            let bytes = &data[offset..offset + chunk.len as usize];
            assert_eq!(chunk.id, blake3::hash(bytes).to_hex().to_string());
            offset += chunk.len as usize;
        }
        assert_eq!(offset, data.len());
    }

    #[test]
    fn chunk_boundaries_follow_the_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = pseudo_random(3 << 20, 42);
        let mut shifted = pseudo_random(100, 7);
        shifted.extend_from_slice(&data);
        fs::write(dir.path().join("a"), &data).expect("write");
        fs::write(dir.path().join("b"), &shifted).expect("write");
        let a = chunk_file(&dir.path().join("a")).expect("chunk a");
        let b = chunk_file(&dir.path().join("b")).expect("chunk b");

        for (chunks, content) in [(&a, &data), (&b, &shifted)] {
            assert_eq!(chunks.blake3, blake3::hash(content).to_hex().to_string());
            assert_eq!(
                chunks.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>(),
                content.len() as u64
            );
            let (last, rest) = chunks.chunks.split_last().expect("chunks");
            assert!(rest.iter().all(|c| (MIN_CHUNK..=MAX_CHUNK).contains(&c.len)));
            assert!(last.len <= MAX_CHUNK);
        }
        assert!(a.chunks.len() >= 20, "{} chunks for 3 MiB", a.chunks.len());
        let in_a: std::collections::HashSet<&str> = a.chunks.iter().map(|c| c.id.as_str()).collect();
        let shared = b.chunks.iter().filter(|c| in_a.contains(c.id.as_str())).count();
        assert!(
            shared * 5 >= b.chunks.len() * 4,
            "only {shared} of {} chunks shared",
            b.chunks.len()
        );
        // Chunk ids are the BLAKE3 of the bytes at their offsets.
        let entry = ManifestEntry {
            path: "a".into(),
            size: data.len() as u64,
            mode: 0o644,
            mtime_ns: 0,
            blake3: a.blake3.clone(),
            chunks: a.chunks.clone(),
        };
        for (offset, chunk) in chunk_offsets(&entry) {
            let range = offset as usize..offset as usize + chunk.len as usize;
            assert_eq!(chunk.id, blake3::hash(&data[range]).to_hex().to_string());
        }
    }

    #[test]
    fn an_empty_file_has_no_chunks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("empty");
        fs::write(&path, b"").expect("write");
        let chunks = chunk_file(&path).expect("chunk");
        assert!(chunks.chunks.is_empty());
        assert_eq!(chunks.blake3, blake3::hash(b"").to_hex().to_string());
        let small = dir.path().join("small");
        fs::write(&small, b"hello").expect("write");
        let chunks = chunk_file(&small).expect("chunk");
        assert_eq!(
            chunks.chunks,
            [ChunkRef {
                id: blake3::hash(b"hello").to_hex().to_string(),
                len: 5
            }]
        );
    }

    #[test]
    fn chunk_file_refuses_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("real"), b"x").expect("write");
        std::os::unix::fs::symlink("real", dir.path().join("link")).expect("symlink");
        let err = chunk_file(&dir.path().join("link")).unwrap_err();
        assert!(err.contains("symbolic link"), "{err}");
    }

    #[test]
    fn the_walk_is_sorted_and_skips_symlinks_and_fifos() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("a/deep")).expect("mkdir");
        fs::create_dir(root.join("empty")).expect("mkdir");
        for name in ["b.txt", "a.txt", "a-b", "a/deep/z", "a/x", "a/deep.txt"] {
            write_old(&root.join(name), name.as_bytes());
        }
        fs::write(outside.path().join("secret"), b"secret").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("link")).expect("symlink");
        std::os::unix::fs::symlink(outside.path(), root.join("a/linkdir")).expect("symlink");
        let status = std::process::Command::new("mkfifo")
            .arg(root.join("a/fifo"))
            .status()
            .expect("mkfifo");
        assert!(status.success());
        fs::set_permissions(root.join("a/x"), std::os::unix::fs::PermissionsExt::from_mode(0o4751)).expect("chmod");

        let (entries, stats) = walk_all(root, &mut ChunkCache::new());
        let paths: Vec<&str> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["a-b", "a.txt", "a/deep.txt", "a/deep/z", "a/x", "b.txt"]);
        let mut sorted = paths.clone();
        sorted.sort_unstable();
        assert_eq!(paths, sorted);
        assert_eq!(stats.files, 6);
        assert_eq!(stats.skipped_symlinks, 2);
        assert_eq!(stats.skipped_special, 1);
        assert_eq!(stats.skipped_non_utf8, 0);
        let x = entries.iter().find(|e| e.path == "a/x").expect("a/x");
        assert_eq!(x.mode, 0o751);
        assert_eq!(x.size, 3);
        assert_eq!(x.blake3, blake3::hash(b"a/x").to_hex().to_string());
        let meta = fs::metadata(root.join("a/x")).expect("stat");
        assert_eq!(x.mtime_ns, mtime_ns(&meta));
        assert!(entries.iter().all(|e| is_safe_relative_path(&e.path)));
    }

    #[test]
    fn names_that_are_not_utf8_are_skipped() {
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bad = std::ffi::OsStr::from_bytes(b"bad\xff");
        // Some file systems refuse such names; nothing to test there.
        if fs::write(dir.path().join(bad), b"x").is_err() {
            return;
        }
        write_old(&dir.path().join("good"), b"y");
        let (entries, stats) = walk_all(dir.path(), &mut ChunkCache::new());
        assert_eq!(entries.len(), 1);
        assert_eq!(stats.skipped_non_utf8, 1);
    }

    #[test]
    fn the_cache_spares_reading_an_unchanged_tree() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("sub")).expect("mkdir");
        write_old(&root.join("big"), &pseudo_random(600 * 1024, 3));
        write_old(&root.join("sub/small"), b"small");
        write_old(&root.join("sub/empty"), b"");
        write_old(&root.join("gone"), b"deleted later");
        let cache_path = dir.path().join("chunks.cache");

        let mut cache = ChunkCache::load(&cache_path);
        assert_eq!(cached_files(&cache), 0);
        let (first, stats) = walk_all(&root, &mut cache);
        assert_eq!(stats.cache_hits, 0);
        assert_eq!(stats.bytes_read, stats.bytes);
        cache.save(&cache_path).expect("save");

        let mut cache = ChunkCache::load(&cache_path);
        assert_eq!(cached_files(&cache), 4);
        let (second, stats) = walk_all(&root, &mut cache);
        assert_eq!(second, first);
        assert_eq!(stats.bytes_read, 0);
        assert_eq!(stats.cache_hits, 4);

        // A touch: that file is read again, the others are not.
        set_mtime(&root.join("big"), SystemTime::now() - Duration::from_secs(60));
        fs::remove_file(root.join("gone")).expect("rm");
        let (third, stats) = walk_all(&root, &mut cache);
        assert_eq!(stats.cache_hits, 2);
        assert_eq!(stats.bytes_read, 600 * 1024);
        assert_eq!(third.len(), 3);
        assert_eq!(third[0].chunks, first[0].chunks);
        cache.save(&cache_path).expect("save");
        // The deleted file is not kept.
        let cache = ChunkCache::load(&cache_path);
        assert_eq!(cached_files(&cache), 3);
        let text = fs::read_to_string(&cache_path).expect("read");
        assert!(!text.contains("\"gone\""));
        // Nothing but the cache itself is left in its folder.
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["chunks.cache", "tree"]);
    }

    #[test]
    fn a_walk_that_stops_early_keeps_the_rest_of_the_cache() {
        let dir = tempfile::tempdir().expect("tempdir");
        for name in ["a", "b", "c"] {
            write_old(&dir.path().join(name), name.as_bytes());
        }
        let mut cache = ChunkCache::new();
        walk_all(dir.path(), &mut cache);
        let err = walk(dir.path(), &mut cache, |e, _| {
            if e.path == "b" {
                Err("peer went away".to_string())
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err, "peer went away");
        assert_eq!(cached_files(&cache), 3);
        let (_, stats) = walk_all(dir.path(), &mut cache);
        assert_eq!((stats.cache_hits, stats.bytes_read), (3, 0));
    }

    #[test]
    fn recently_modified_files_are_not_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::write(dir.path().join("fresh"), b"just written").expect("write");
        let mut cache = ChunkCache::new();
        walk_all(dir.path(), &mut cache);
        let (_, stats) = walk_all(dir.path(), &mut cache);
        assert_eq!(stats.cache_hits, 0);
        assert_eq!(stats.bytes_read, 12);
    }

    #[test]
    fn a_tree_state_changes_with_any_file_and_is_not_trusted_when_fresh() {
        let old = now_ns() - 3 * RACY_WINDOW_NS;
        let file = FileState {
            size: 10,
            mtime_ns: old,
            ctime_ns: old,
            inode: 7,
        };
        let state = |files: &[(&str, FileState, u32)]| {
            let mut tree = TreeState::new();
            for (rel, state, mode) in files {
                tree.add(rel, state, *mode);
            }
            tree.finish()
        };
        let base = state(&[("a", file, 0o644), ("b/c", file, 0o600)]);
        assert!(base.is_some());
        assert_eq!(base, state(&[("a", file, 0o644), ("b/c", file, 0o600)]));
        let changed = [
            state(&[("a", FileState { size: 11, ..file }, 0o644), ("b/c", file, 0o600)]),
            state(&[("a", FileState { inode: 8, ..file }, 0o644), ("b/c", file, 0o600)]),
            state(&[
                (
                    "a",
                    FileState {
                        ctime_ns: old + 1,
                        ..file
                    },
                    0o644,
                ),
                ("b/c", file, 0o600),
            ]),
            state(&[("a", file, 0o640), ("b/c", file, 0o600)]),
            state(&[("a", file, 0o644), ("b/d", file, 0o600)]),
            state(&[("a", file, 0o644)]),
        ];
        for other in changed {
            assert!(other.is_some() && other != base);
        }
        // Changed a moment ago: a later write might keep its timestamps.
        let fresh = FileState {
            ctime_ns: now_ns(),
            ..file
        };
        assert_eq!(state(&[("a", fresh, 0o644)]), None);
    }

    #[test]
    fn tree_state_sees_only_what_a_walk_replicates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir(root.join("sub")).expect("mkdir");
        write_old(&root.join("a"), b"one");
        write_old(&root.join("sub/b"), b"two");
        // Just written (ctime is now): not trusted yet.
        assert_eq!(tree_state(root).expect("state"), None);
        std::thread::sleep(std::time::Duration::from_nanos(RACY_WINDOW_NS as u64 + 100_000_000));
        let settled = tree_state(root).expect("state");
        assert!(settled.is_some());
        // A symlink is never replicated: the state stays.
        std::os::unix::fs::symlink("a", root.join("link")).expect("symlink");
        assert_eq!(tree_state(root).expect("state"), settled);
        // The same as a full walk computes.
        let mut tree = TreeState::new();
        walk(root, &mut ChunkCache::new(), |entry, state| {
            tree.add(&entry.path, &state, entry.mode);
            Ok(())
        })
        .expect("walk");
        assert_eq!(tree.finish(), settled);
    }

    #[test]
    fn a_corrupt_or_foreign_cache_is_empty() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c");
        for text in [
            "",
            "garbage\n",
            "{\"format\":\"dicops-chunk-cache\",\"version\":1,\"min\":1,\"avg\":65536,\"max\":262144}\n",
        ] {
            fs::write(&path, text).expect("write");
            assert!(ChunkCache::load(&path).entries.is_none(), "{text:?}");
        }
        assert!(ChunkCache::load(&dir.path().join("missing")).entries.is_none());
    }

    #[test]
    fn a_walk_uses_a_cache_only_up_to_its_first_bad_entry() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tree = dir.path().join("tree");
        fs::create_dir(&tree).expect("mkdir");
        // Larger than a chunk: each entry lists its chunks.
        for (name, seed) in [("a", 1), ("b", 5), ("c", 7)] {
            write_old(&tree.join(name), &pseudo_random(300_000, seed));
        }
        let cache_path = dir.path().join("cache");
        let mut cache = ChunkCache::new();
        let (truth, _) = walk_all(&tree, &mut cache);
        cache.save(&cache_path).expect("save");
        let good = fs::read_to_string(&cache_path).expect("read");
        let lines: Vec<&str> = good.lines().collect();
        assert_eq!(lines.len(), 4, "header and three entries");
        let size_of_b = format!("\"s\":{}", 300_000);
        for (damage, hits) in [
            // b's size no longer matches its chunks: a is used, b and c not.
            (
                format!(
                    "{}\n{}\n{}\n{}\n",
                    lines[0],
                    lines[1],
                    lines[2].replacen(&size_of_b, "\"s\":5", 1),
                    lines[3]
                ),
                1,
            ),
            // Not JSON from b on.
            (format!("{}\n{}\n{{\"p\":\n{}\n", lines[0], lines[1], lines[3]), 1),
            // Out of order (b before a): b is used, then the order breaks.
            (format!("{}\n{}\n{}\n{}\n", lines[0], lines[2], lines[1], lines[3]), 1),
        ] {
            fs::write(&cache_path, &damage).expect("write");
            let mut cache = ChunkCache::load(&cache_path);
            let (entries, stats) = walk_all(&tree, &mut cache);
            assert_eq!(entries, truth, "{damage}");
            assert_eq!(stats.cache_hits, hits, "{damage}");
            assert_eq!(stats.bytes_read, 2 * 300_000, "{damage}");
        }
    }

    #[test]
    fn save_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cache");
        ChunkCache::new().save(&path).expect("save");
        ChunkCache::new().save(&path).expect("save again");
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, [std::ffi::OsString::from("cache")]);
        let err = ChunkCache::new()
            .save(&dir.path().join("no/such/folder/cache"))
            .unwrap_err();
        assert!(err.contains("no/such/folder"), "{err}");
    }

    #[test]
    fn read_chunk_serves_the_bytes_until_the_file_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir(root.join("sub")).expect("mkdir");
        let data = pseudo_random(400 * 1024, 9);
        write_old(&root.join("sub/f"), &data);
        let mut entries = Vec::new();
        walk(root, &mut ChunkCache::new(), |e, state| {
            entries.push((e, state));
            Ok(())
        })
        .expect("walk");
        let (entry, state) = &entries[0];
        assert!(entry.chunks.len() >= 2);
        // With the state the manifest was made from, or without (hashed).
        for known in [Some(*state), None] {
            for (offset, chunk) in chunk_offsets(entry) {
                let bytes = read_chunk(root, &entry.path, offset, chunk.len, &chunk.id, known).expect("read");
                assert_eq!(bytes, &data[offset as usize..offset as usize + chunk.len as usize]);
            }
        }
        let (offset, last) = chunk_offsets(entry).last().expect("last");

        // Rewritten in place, same size: the state differs, so the bytes
        // are hashed and found changed.
        let mut changed = data.clone();
        changed[offset as usize] ^= 1;
        fs::write(root.join("sub/f"), &changed).expect("write");
        for known in [Some(*state), None] {
            assert_eq!(
                read_chunk(root, &entry.path, offset, last.len, &last.id, known),
                Err(ChunkReadError::Changed)
            );
        }
        fs::write(root.join("sub/f"), &data[..1000]).expect("truncate");
        assert_eq!(
            read_chunk(root, &entry.path, offset, last.len, &last.id, Some(*state)),
            Err(ChunkReadError::Changed)
        );
        fs::remove_file(root.join("sub/f")).expect("rm");
        assert_eq!(
            read_chunk(root, &entry.path, offset, last.len, &last.id, Some(*state)),
            Err(ChunkReadError::Changed)
        );
    }

    #[test]
    fn read_chunk_refuses_symlinks_and_unsafe_requests() {
        let dir = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::write(outside.path().join("secret"), b"secret").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret"), root.join("link")).expect("symlink");
        std::os::unix::fs::symlink(outside.path(), root.join("dirlink")).expect("symlink");
        let id = blake3::hash(b"secret").to_hex().to_string();
        for path in ["link", "dirlink/secret", "../secret", "/etc/passwd"] {
            match read_chunk(root, path, 0, 6, &id, None) {
                Err(ChunkReadError::Io(_)) => {}
                other => panic!("{path}: {other:?}"),
            }
        }
        fs::write(root.join("f"), b"x").expect("write");
        assert!(matches!(
            read_chunk(root, "f", 0, MAX_CHUNK + 1, &id, None),
            Err(ChunkReadError::Io(_))
        ));
        assert!(matches!(
            read_chunk(root, "f", 0, 1, "not hex", None),
            Err(ChunkReadError::Io(_))
        ));
    }

    #[test]
    fn safe_relative_paths() {
        for (path, safe) in [
            ("a", true),
            ("a/b/c.txt", true),
            ("..a", true),
            ("a..", true),
            (".hidden/x", true),
            ("a b/c\\d", true),
            ("", false),
            ("/", false),
            ("/a", false),
            ("a/", false),
            ("a//b", false),
            (".", false),
            ("..", false),
            ("./a", false),
            ("a/./b", false),
            ("a/..", false),
            ("../a", false),
            ("a/../b", false),
            ("a\0b", false),
        ] {
            assert_eq!(is_safe_relative_path(path), safe, "{path:?}");
        }
    }
}
