//! The source side: the agent's data port. It serves an exported folder to
//! exactly the peer the controller granted, for exactly one run, read only.
//!
//! - `GET  /data/v1/runs/RUN/manifest`: the tree as NDJSON (a header, then
//!   one entry per file with its chunks), chunk lists cached by (path,
//!   size, mtime, inode) so an unchanged tree is not read again.
//! - `POST /data/v1/runs/RUN/chunks`: `{"ids": [...], "compress": bool}` ->
//!   frames of `[32-byte id][codec: 0 raw, 1 zstd][u32 LE length][bytes]`.
//!   Every chunk is read again from its file and checked against its id: a
//!   file that changed since the manifest is refused, never sent torn.
//! - `POST /data/v1/runs/RUN/published`: the destination says which files
//!   the snapshot it published holds; backups among them may now be pruned
//!   by local retention.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use dicops_config::CommandConfig;
use dicops_net::server::Peer;
use dicops_proto::{ApiError, ExportAudit, Identity, ManifestHeader, ServeGrant};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};

use super::chunks::{self, ChunkCache, ChunkReadError, FileState};
use crate::backup::Backups;
use crate::report::now_unix;

/// Chunks per request, and their bytes: bounds each answer.
pub const MAX_CHUNKS_PER_REQUEST: usize = 256;
pub const MAX_BYTES_PER_REQUEST: u64 = 16 << 20;
/// A chunk is sent compressed only when that saves at least this share.
const COMPRESSION_MIN_SAVING: f64 = 0.05;

pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

/// A chunk request.
#[derive(Debug, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub ids: Vec<String>,
    pub compress: bool,
}

/// A file the destination published: path in the export, and content.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PublishedFile {
    pub path: String,
    pub blake3: String,
}

/// Where each chunk of a served run lives.
struct RunIndex {
    run_id: i64,
    root: PathBuf,
    export: String,
    paths: Vec<String>,
    /// (size, mtime_ns) of each file, for the audit once published.
    stats: Vec<(u64, i64)>,
    /// What each file was when the manifest was made: a chunk read from a
    /// file still in that state need not be hashed again.
    states: Vec<FileState>,
    /// chunk id -> (index into paths, offset, length)
    chunks: HashMap<String, (u32, u64, u32)>,
}

pub struct Source {
    agent_id: String,
    exports: BTreeMap<String, PathBuf>,
    cache_dir: PathBuf,
    /// Backup commands' output folders, to mark what reached the other site.
    outputs: Vec<(String, PathBuf)>,
    backups: Arc<Backups>,
    grants: Mutex<HashMap<i64, ServeGrant>>,
    runs: Mutex<HashMap<i64, Arc<RunIndex>>>,
    latest_audit: Mutex<Vec<ExportAudit>>,
}

/// Refusals of this process's data port, by reason, for its reports.
static REFUSALS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

fn count_refusal(reason: &str) {
    *REFUSALS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(reason.to_string())
        .or_default() += 1;
}

/// The data port's refusals since the agent started, by reason.
pub fn refusals() -> BTreeMap<String, u64> {
    REFUSALS.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn error(status: StatusCode, reason: &str, message: String) -> Response<Full<Bytes>> {
    tracing::warn!(reason, %message, "data request refused");
    count_refusal(reason);
    let body = serde_json::to_vec(&ApiError {
        reason: reason.to_string(),
        error: message,
    })
    .unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}

fn ok(body: Vec<u8>) -> Response<Full<Bytes>> {
    Response::new(Full::new(Bytes::from(body)))
}

impl Source {
    pub fn new(
        agent_id: &str,
        state_dir: &Path,
        exports: &BTreeMap<String, PathBuf>,
        commands: &BTreeMap<String, CommandConfig>,
        backups: Arc<Backups>,
    ) -> Source {
        Source {
            agent_id: agent_id.to_string(),
            exports: exports.clone(),
            cache_dir: state_dir.join("replication"),
            outputs: commands
                .iter()
                .filter_map(|(name, c)| Some((name.clone(), c.output.as_ref()?.dir.clone())))
                .collect(),
            backups,
            grants: Mutex::new(HashMap::new()),
            runs: Mutex::new(HashMap::new()),
            latest_audit: Mutex::new(Vec::new()),
        }
    }

    /// The last audit, for reports.
    pub fn latest_audit(&self) -> Vec<ExportAudit> {
        self.latest_audit.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Audits every `interval` on a thread of its own (a walk of the
    /// exports' metadata; a hung mount stalls only this thread).
    pub fn start_auditor(self: &Arc<Self>, interval: std::time::Duration) -> std::io::Result<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("export-auditor".into())
            .spawn(move || loop {
                let audit = me.audit();
                *me.latest_audit.lock().unwrap_or_else(|p| p.into_inner()) = audit;
                std::thread::sleep(interval);
            })
            .map(|_| ())
    }

    /// A grant from the controller. Expired grants and their indexes go.
    pub fn grant(&self, grant: ServeGrant) {
        let now = now_unix();
        let mut grants = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        grants.retain(|_, g| g.expires_at > now);
        let live: Vec<i64> = grants.keys().copied().collect();
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| live.contains(id) || *id == grant.run_id);
        tracing::info!(run = grant.run_id, job = %grant.job, export = %grant.export, peer = %grant.peer, "serving a replication run");
        grants.insert(grant.run_id, grant);
    }

    /// Routes one request of a peer.
    pub async fn handle(self: Arc<Self>, req: Request<Incoming>, peer: Peer) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let Some((run, action)) = path
            .strip_prefix("/data/v1/runs/")
            .and_then(|rest| rest.split_once('/'))
            .and_then(|(run, action)| Some((run.parse::<i64>().ok()?, action.to_string())))
        else {
            return error(StatusCode::NOT_FOUND, "not_found", format!("no such endpoint: {path}"));
        };
        let grant = match self.authorize(run, &peer) {
            Ok(grant) => grant,
            Err(refusal) => return refusal,
        };
        match (req.method().clone(), action.as_str()) {
            (Method::GET, "manifest") => {
                let unless = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("unless=")))
                    .map(str::to_string);
                self.manifest(grant, unless).await
            }
            (Method::POST, "chunks") => match read_body::<ChunkRequest>(req).await {
                Ok(request) => self.chunks(run, request).await,
                Err(refusal) => refusal,
            },
            (Method::POST, "published") => match read_body::<Vec<PublishedFile>>(req).await {
                Ok(files) => self.published(&grant, files).await,
                Err(refusal) => refusal,
            },
            _ => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such endpoint: {} {path}", req.method()),
            ),
        }
    }

    /// Only the granted peer, only while the grant lasts.
    #[allow(clippy::result_large_err)]
    fn authorize(&self, run: i64, peer: &Peer) -> Result<ServeGrant, Response<Full<Bytes>>> {
        let grant = self.grants.lock().unwrap_or_else(|p| p.into_inner()).get(&run).cloned();
        let Some(grant) = grant else {
            return Err(error(
                StatusCode::NOT_FOUND,
                "no_grant",
                format!(
                    "agent {} holds no grant for run {run} (not yet, or no more)",
                    self.agent_id
                ),
            ));
        };
        let expected = Identity::Agent(grant.peer.clone());
        if peer.identity.as_ref() != Some(&expected) {
            let who = peer
                .identity
                .as_ref()
                .map_or("anonymous".to_string(), |i| i.to_string());
            return Err(error(
                StatusCode::FORBIDDEN,
                "wrong_peer",
                format!("run {run} is granted to {expected}, not to {who}"),
            ));
        }
        if grant.expires_at <= now_unix() {
            return Err(error(
                StatusCode::GONE,
                "grant_expired",
                format!("the grant for run {run} has expired"),
            ));
        }
        Ok(grant)
    }

    async fn manifest(self: Arc<Self>, grant: ServeGrant, unless: Option<String>) -> Response<Full<Bytes>> {
        let Some(root) = self.exports.get(&grant.export).cloned() else {
            return error(
                StatusCode::FORBIDDEN,
                "unknown_export",
                format!(
                    "export {:?} is not in the `exports:` of agent {}: it serves only the folders its own config names",
                    grant.export, self.agent_id
                ),
            );
        };
        let me = self.clone();
        let built = tokio::task::spawn_blocking(move || me.build_manifest(&grant, &root, unless.as_deref()))
            .await
            .unwrap_or_else(|e| Err(format!("internal error: {e}")));
        match built {
            Ok(body) => ok(body),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "source_read", e),
        }
    }

    /// The manifest of `root` for this run; only its header line when the
    /// entries hash to `unless` (the destination already holds this tree).
    fn build_manifest(&self, grant: &ServeGrant, root: &Path, unless: Option<&str>) -> Result<Vec<u8>, String> {
        let cache_file = self.cache_dir.join(format!("chunks-{}.cache", grant.export));
        // The walk writes its working file there: the folder must exist first.
        std::fs::create_dir_all(&self.cache_dir)
            .map_err(|e| format!("cannot create {}: {e}", self.cache_dir.display()))?;
        let mut cache = ChunkCache::load(&cache_file);
        let mut header = ManifestHeader {
            version: 1,
            job: grant.job.clone(),
            run_id: grant.run_id,
            source_agent: self.agent_id.clone(),
            export: grant.export.clone(),
            taken_at: now_unix(),
            files: None,
            bytes: None,
            entries_blake3: None,
            unchanged: false,
        };
        // The tree as the last manifest saw it: when its files are all as
        // they were and the destination holds that manifest, one pass of
        // lstat answers, without the chunk cache or a manifest.
        let tree_file = self.cache_dir.join(format!("tree-{}.state", grant.export));
        if let (Some(unless), Some(saved)) = (unless, load_tree_state(&tree_file)) {
            if saved.entries_blake3 == unless && chunks::tree_state(root)?.as_deref() == Some(saved.tree.as_str()) {
                header.files = Some(saved.files);
                header.bytes = Some(saved.bytes);
                header.entries_blake3 = Some(saved.entries_blake3);
                header.unchanged = true;
                tracing::info!(
                    run = grant.run_id,
                    files = saved.files,
                    bytes = saved.bytes,
                    read = 0,
                    unchanged = true,
                    "manifest built from the tree state alone"
                );
                let mut body = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
                body.push(b'\n');
                return Ok(body);
            }
        }
        let mut tree = chunks::TreeState::new();
        let mut body = Vec::new();
        let mut index = RunIndex {
            run_id: grant.run_id,
            root: root.to_path_buf(),
            export: grant.export.clone(),
            paths: Vec::new(),
            stats: Vec::new(),
            states: Vec::new(),
            chunks: HashMap::new(),
        };
        let stats = chunks::walk(root, &mut cache, |entry, state| {
            let file = index.paths.len() as u32;
            for (offset, chunk) in chunks::chunk_offsets(&entry) {
                index
                    .chunks
                    .entry(chunk.id.clone())
                    .or_insert((file, offset, chunk.len));
            }
            index.paths.push(entry.path.clone());
            index.stats.push((entry.size, entry.mtime_ns));
            index.states.push(state);
            tree.add(&entry.path, &state, entry.mode);
            serde_json::to_writer(&mut body, &entry).map_err(|e| e.to_string())?;
            body.push(b'\n');
            Ok(())
        })?;
        // The header goes first and announces what follows.
        header.files = Some(stats.files);
        header.bytes = Some(stats.bytes);
        let digest = blake3::hash(&body).to_hex().to_string();
        header.unchanged = unless == Some(digest.as_str());
        let saved = tree.finish().map(|tree| SavedTree {
            tree,
            entries_blake3: digest.clone(),
            files: stats.files,
            bytes: stats.bytes,
        });
        save_tree_state(&tree_file, saved.as_ref());
        header.entries_blake3 = Some(digest);
        if header.unchanged {
            body.clear();
        }
        let mut first = serde_json::to_vec(&header).map_err(|e| e.to_string())?;
        first.push(b'\n');
        body.splice(0..0, first);
        let all_hits = stats.cache_hits == stats.files;
        if cache.same_as_saved(&cache_file, all_hits) {
            tracing::debug!(cache = %cache_file.display(), "the chunk cache is unchanged");
        } else if let Err(e) = cache.save(&cache_file) {
            tracing::warn!(error = %e, "cannot save the chunk cache; the next run reads the tree again");
        }
        tracing::info!(
            run = grant.run_id,
            files = stats.files,
            bytes = stats.bytes,
            read = stats.bytes_read,
            cache_hits = stats.cache_hits,
            unchanged = header.unchanged,
            "manifest built"
        );
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(grant.run_id, Arc::new(index));
        Ok(body)
    }

    async fn chunks(self: Arc<Self>, run: i64, request: ChunkRequest) -> Response<Full<Bytes>> {
        if request.ids.len() > MAX_CHUNKS_PER_REQUEST {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_chunks",
                format!("at most {MAX_CHUNKS_PER_REQUEST} chunks per request"),
            );
        }
        let index = self.runs.lock().unwrap_or_else(|p| p.into_inner()).get(&run).cloned();
        let Some(index) = index else {
            return error(
                StatusCode::CONFLICT,
                "no_manifest",
                format!("ask for the manifest of run {run} before its chunks"),
            );
        };
        let answer = tokio::task::spawn_blocking(move || frames(&index, &request))
            .await
            .unwrap_or_else(|e| Err((StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())));
        match answer {
            Ok(body) => ok(body),
            Err((status, reason, message)) => error(status, reason, message),
        }
    }

    async fn published(self: Arc<Self>, grant: &ServeGrant, files: Vec<PublishedFile>) -> Response<Full<Bytes>> {
        let Some(root) = self.exports.get(&grant.export).cloned() else {
            return error(
                StatusCode::FORBIDDEN,
                "unknown_export",
                format!("unknown export {:?}", grant.export),
            );
        };
        let index = self
            .runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&grant.run_id)
            .cloned();
        let me = self.clone();
        let job = grant.job.clone();
        let marked = tokio::task::spawn_blocking(move || {
            if let Some(index) = index {
                me.remember_published(&job, &index, &files);
            }
            me.mark_replicated(&root, &files)
        })
        .await
        .unwrap_or(0);
        tracing::info!(run = grant.run_id, marked, "the other site holds this run's files");
        ok(serde_json::to_vec(&serde_json::json!({ "marked": marked })).unwrap_or_default())
    }

    /// Remembers which (path, size, mtime) the other site holds for `job`,
    /// for the audit. Messages come in parts: a part names files of the
    /// run's manifest, so the set grows until the run's last part.
    fn remember_published(&self, job: &str, index: &RunIndex, files: &[PublishedFile]) {
        let path = self.cache_dir.join(format!("published-{}-{job}.tsv", index.export));
        let positions: HashMap<&str, usize> = index.paths.iter().enumerate().map(|(i, p)| (p.as_str(), i)).collect();
        let mut set = load_published(&path).unwrap_or_default();
        // A new run replaces the set of the previous one.
        if set.run_id != Some(index.run_id) {
            set = PublishedSet {
                run_id: Some(index.run_id),
                at: now_unix(),
                files: HashMap::new(),
            };
        }
        for file in files {
            if let Some(&i) = positions.get(file.path.as_str()) {
                set.files.insert(file.path.clone(), index.stats[i]);
            }
        }
        if let Err(e) = save_published(&path, &set) {
            tracing::warn!(error = %e, "cannot save what the other site holds; the audit will overstate");
        }
    }

    /// The cross-site audit of every job served from each export.
    pub fn audit(&self) -> Vec<ExportAudit> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.cache_dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix("published-").and_then(|r| r.strip_suffix(".tsv")) else {
                continue;
            };
            let Some((export, root)) = self
                .exports
                .iter()
                .find(|(e, _)| rest.starts_with(&format!("{e}-")))
                .map(|(e, r)| (e.clone(), r.clone()))
            else {
                continue;
            };
            let job = rest[export.len() + 1..].to_string();
            let set = load_published(&entry.path()).unwrap_or_default();
            out.push(audit_export(&export, &job, &root, &set));
        }
        out
    }

    /// Files of backup output folders under the export are now in the
    /// other site: local retention may delete them when their time comes.
    fn mark_replicated(&self, root: &Path, files: &[PublishedFile]) -> usize {
        let mut marked = 0;
        for (command, output) in &self.outputs {
            let Ok(prefix) = output.strip_prefix(root) else {
                continue;
            };
            let prefix = prefix.to_string_lossy();
            for file in files {
                let rel = if prefix.is_empty() {
                    Some(file.path.as_str())
                } else {
                    file.path
                        .strip_prefix(prefix.as_ref())
                        .and_then(|rest| rest.strip_prefix('/'))
                };
                if let Some(rel) = rel {
                    match self.backups.mark_replicated(command, rel, &file.blake3) {
                        Ok(n) => marked += n,
                        Err(e) => tracing::error!(%command, error = %e, "cannot mark a backup as replicated"),
                    }
                }
            }
        }
        marked
    }
}

/// The tree state of an export when its last manifest was made, and that
/// manifest's entries hash (see `chunks::TreeState`).
#[derive(Debug, Serialize, Deserialize)]
struct SavedTree {
    tree: String,
    entries_blake3: String,
    files: u64,
    bytes: u64,
}

fn load_tree_state(path: &Path) -> Option<SavedTree> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Saves the state, or removes the old one when this walk's is not to be
/// trusted. Not fsynced: a lost state only costs one full walk.
fn save_tree_state(path: &Path, saved: Option<&SavedTree>) {
    let written = match saved {
        Some(saved) => serde_json::to_vec(saved)
            .map_err(std::io::Error::other)
            .and_then(|bytes| {
                let tmp = path.with_extension("state.tmp");
                std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path))
            }),
        None => match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    };
    if let Err(e) = written {
        tracing::warn!(file = %path.display(), error = %e, "cannot save the tree state; the next unchanged run walks the tree in full");
    }
}

/// What the newest published snapshot of a job holds, by path.
#[derive(Debug, Default)]
struct PublishedSet {
    run_id: Option<i64>,
    at: f64,
    files: HashMap<String, (u64, i64)>,
}

/// `run\tat` then `size\tmtime_ns\tpath` lines.
fn load_published(path: &Path) -> Option<PublishedSet> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines();
    let (run, at) = lines.next()?.split_once('\t')?;
    let mut set = PublishedSet {
        run_id: run.parse().ok(),
        at: at.parse().ok()?,
        files: HashMap::new(),
    };
    for line in lines {
        let mut parts = line.splitn(3, '\t');
        let (Some(size), Some(mtime), Some(file)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        if let (Ok(size), Ok(mtime)) = (size.parse(), mtime.parse()) {
            set.files.insert(file.to_string(), (size, mtime));
        }
    }
    Some(set)
}

fn save_published(path: &Path, set: &PublishedSet) -> Result<(), String> {
    use std::fmt::Write as _;
    let mut text = format!("{}\t{}\n", set.run_id.unwrap_or(0), set.at);
    for (file, (size, mtime)) in &set.files {
        let _ = writeln!(text, "{size}\t{mtime}\t{file}");
    }
    let dir = path.parent().ok_or("no folder")?;
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let name = path.file_name().ok_or("no name")?.to_string_lossy().into_owned();
    crate::spool::write_atomically(dir, &name, text.as_bytes()).map_err(|e| e.to_string())
}

/// Walks the export (metadata only) against what the other site holds.
fn audit_export(export: &str, job: &str, root: &Path, set: &PublishedSet) -> ExportAudit {
    let mut audit = ExportAudit {
        export: export.to_string(),
        job: job.to_string(),
        files: 0,
        bytes: 0,
        unreplicated_files: 0,
        unreplicated_bytes: 0,
        oldest_unreplicated_at: None,
        published_at: (set.at > 0.0).then_some(set.at),
        error: None,
        scanned_at: now_unix(),
    };
    match crate::backup::scan::list_files(root, true, None) {
        Err(e) => audit.error = Some(e),
        Ok(files) => {
            for file in files {
                audit.files += 1;
                audit.bytes += file.size;
                let mtime_ns = (file.mtime * 1e9).round() as i64;
                let held = set
                    .files
                    .get(&file.rel)
                    .is_some_and(|(size, mtime)| *size == file.size && (*mtime - mtime_ns).abs() < 1_000);
                if !held {
                    audit.unreplicated_files += 1;
                    audit.unreplicated_bytes += file.size;
                    audit.oldest_unreplicated_at = Some(
                        audit
                            .oldest_unreplicated_at
                            .map_or(file.mtime, |o: f64| o.min(file.mtime)),
                    );
                }
            }
        }
    }
    audit
}

type Refusal = (StatusCode, &'static str, String);

/// The requested chunks, each read again and checked, compressed where
/// that pays.
fn frames(index: &RunIndex, request: &ChunkRequest) -> Result<Vec<u8>, Refusal> {
    let mut body = Vec::new();
    // One context per request: making one per chunk cost more CPU than
    // compressing (zstd clears its tables on creation). Without one, chunks
    // go raw.
    let mut compressor = request.compress.then(|| zstd::bulk::Compressor::new(1).ok()).flatten();
    let mut total = 0u64;
    for id in &request.ids {
        let Some(&(file, offset, len)) = index.chunks.get(id) else {
            return Err((
                StatusCode::NOT_FOUND,
                "unknown_chunk",
                format!("chunk {id} is not in this run's manifest"),
            ));
        };
        total += u64::from(len);
        if total > MAX_BYTES_PER_REQUEST {
            return Err((
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_bytes",
                format!("at most {MAX_BYTES_PER_REQUEST} bytes of chunks per request"),
            ));
        }
        let path = &index.paths[file as usize];
        let known = index.states.get(file as usize).copied();
        let bytes = match chunks::read_chunk(&index.root, path, offset, len, id, known) {
            Ok(bytes) => bytes,
            Err(ChunkReadError::Changed) => {
                return Err((
                    StatusCode::CONFLICT,
                    "source_changed",
                    format!("{path} changed since the manifest was taken: the run must start again"),
                ))
            }
            Err(e) => return Err((StatusCode::INTERNAL_SERVER_ERROR, "source_read", e.to_string())),
        };
        let raw_id = decode_hex32(id).ok_or((StatusCode::BAD_REQUEST, "bad_id", format!("{id} is not a chunk id")))?;
        let compressed = compressor
            .as_mut()
            .and_then(|z| worth_compressing(z, &bytes).then(|| z.compress(&bytes).ok()).flatten())
            .filter(|c| (c.len() as f64) < bytes.len() as f64 * (1.0 - COMPRESSION_MIN_SAVING));
        let (codec, payload) = match &compressed {
            Some(c) => (CODEC_ZSTD, c.as_slice()),
            None => (CODEC_RAW, bytes.as_slice()),
        };
        body.extend_from_slice(&raw_id);
        body.push(codec);
        body.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        body.extend_from_slice(payload);
    }
    Ok(body)
}

/// A quick look at the start of a chunk: already-compressed or encrypted
/// data (most backup archives) is not worth compressing, and finding out on
/// the whole chunk would cost more than sending it.
fn worth_compressing(z: &mut zstd::bulk::Compressor<'static>, bytes: &[u8]) -> bool {
    let probe = &bytes[..bytes.len().min(4096)];
    z.compress(probe)
        .is_ok_and(|c| (c.len() as f64) < probe.len() as f64 * 0.9)
}

pub fn decode_hex32(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub fn encode_hex32(raw: &[u8; 32]) -> String {
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

async fn read_body<T: serde::de::DeserializeOwned>(req: Request<Incoming>) -> Result<T, Response<Full<Bytes>>> {
    let mut body = req.into_body();
    let bytes = dicops_net::body::read_limited(&mut body, 4 << 20)
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, "malformed", e.to_string()))?;
    serde_json::from_slice(&bytes).map_err(|e| error(StatusCode::BAD_REQUEST, "malformed", e.to_string()))
}

/// Connections the data port holds at once. A run uses two; the limit
/// bounds what peers (or a flood of half-open connections, each cut after
/// the handshake timeout) can take from the agent.
pub const MAX_DATA_CONNECTIONS: usize = 64;

/// Listens on the data port until `shutdown`.
pub async fn serve(
    source: Arc<Source>,
    listener: tokio::net::TcpListener,
    tls: Arc<dicops_net::TlsReloader>,
    shutdown: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_DATA_CONNECTIONS));
    loop {
        let (tcp, addr) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "data port accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(peer = %addr, limit = MAX_DATA_CONNECTIONS, "data port: too many open connections; refusing");
            count_refusal("too_many_connections");
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(tls.server_config());
        let source = source.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let (tls, peer) = match dicops_net::server::accept(&acceptor, tcp, addr).await {
                Ok(accepted) => accepted,
                Err((reason, error)) => {
                    tracing::warn!(peer = %addr, reason, %error, "data port: TLS handshake failed");
                    return;
                }
            };
            let handler = move |req: Request<Incoming>, peer: Peer| source.clone().handle(req, peer);
            dicops_net::server::serve_http1(tls, peer, handler, shutdown).await;
        });
    }
}
