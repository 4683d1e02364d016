//! The destination side: one replication run. The agent checks that the
//! root is one its own config names, fetches the source's manifest over
//! mutual TLS from exactly the agent the ticket names, asks only for the
//! chunks it does not hold, and publishes the snapshot with one rename once
//! every file is verified.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicops_net::{ClientError, HttpsClient, TlsReloader};
use dicops_proto::{
    ApiError, ChunkRef, Identity, ManifestEntry, ManifestHeader, PullTask, ReplicationStats, VerifyStats, VerifyTask,
};
use hyper::{Method, StatusCode};
use tokio_util::sync::CancellationToken;

use super::serve::{encode_hex32, ChunkRequest, PublishedFile, CODEC_RAW, CODEC_ZSTD};
use super::snapshot::{Build, JobStore, VerifiedChunk};

/// Bytes of chunks asked for in one request (the source allows 16 MiB);
/// under a bandwidth limit, about half a second's worth, so that the rate
/// stays smooth and an interrupted request loses little.
const BATCH_BYTES: u64 = 8 << 20;
const MIN_BATCH_BYTES: u64 = 256 << 10;
const BATCH_CHUNKS: usize = 256;
/// How long to wait for the source to receive its grant.
const GRANT_WAIT: Duration = Duration::from_secs(30);
/// The largest manifest a source may send.
const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// Files per `published` message.
const PUBLISHED_BATCH: usize = 10_000;

/// What a pull reports as it goes.
pub struct Progress {
    pub phase: &'static str,
    pub bytes: u64,
    pub remaining: u64,
    pub message: String,
}

pub struct Puller {
    pub roots: BTreeMap<String, PathBuf>,
    pub tls: Arc<TlsReloader>,
    pub config_file: String,
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T, String> + Send + 'static) -> Result<T, String> {
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(format!("internal error: {e}")))
}

/// The refusal text of a source's answer.
fn refusal(status: StatusCode, body: &[u8]) -> (String, String) {
    match serde_json::from_slice::<ApiError>(body) {
        Ok(e) => (e.reason, e.error),
        Err(_) => (String::new(), format!("{status}")),
    }
}

/// A connection to the source named in a ticket, for one run.
struct SourceLink {
    client: HttpsClient,
    /// "source agent db01 at https://...", for errors.
    name: String,
    agent: String,
    stall: Duration,
    run_id: i64,
}

impl SourceLink {
    fn new(tls: Arc<TlsReloader>, agent: &str, url: &str, stall: Duration, run_id: i64) -> Result<SourceLink, String> {
        let name = format!("source agent {agent} at {url}");
        let mut client =
            HttpsClient::new(url, Identity::Agent(agent.to_string()), tls).map_err(|e| format!("{name}: {e}"))?;
        client.request_timeout = stall;
        // A manifest is about 250 bytes a file: room for about 4 million.
        client.max_response_bytes = MAX_MANIFEST_BYTES;
        Ok(SourceLink {
            client,
            name,
            agent: agent.to_string(),
            stall,
            run_id,
        })
    }

    /// The source's manifest of this run (waiting for its grant to arrive).
    /// `unless`: the entries hash of the tree this side holds; if the
    /// source's is the same, it answers with its header alone.
    async fn manifest(
        &mut self,
        job: &str,
        cancel: &CancellationToken,
        unless: Option<&str>,
    ) -> Result<(ManifestHeader, Vec<ManifestEntry>), String> {
        let mut path = format!("/data/v1/runs/{}/manifest", self.run_id);
        if let Some(digest) = unless {
            path.push_str(&format!("?unless={digest}"));
        }
        // The grant travels in the source's own poll, which the controller
        // wakes at once: it is usually there within milliseconds.
        let mut pause = Duration::from_millis(20);
        let started = Instant::now();
        let body = loop {
            match self.client.request(Method::GET, &path, None).await {
                Ok((status, body)) if status.is_success() => break body,
                Ok((status, body)) => {
                    let (reason, error) = refusal(status, &body);
                    // The grant travels in the source's own poll: give it time.
                    if reason == "no_grant" && started.elapsed() < GRANT_WAIT && !cancel.is_cancelled() {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_millis(500));
                        continue;
                    }
                    return Err(format!("{} refused the manifest: {error}", self.name));
                }
                Err(e) => return Err(describe(&self.name, &e, self.stall)),
            }
        };
        let (header, entries) = parse_manifest(&body)?;
        if header.run_id != self.run_id || header.job != job || header.source_agent != self.agent {
            return Err(format!(
                "{} sent the manifest of run {} of {} from {}, not of this run",
                self.name, header.run_id, header.job, header.source_agent
            ));
        }
        if header.unchanged && (unless.is_none() || header.entries_blake3.as_deref() != unless || !entries.is_empty()) {
            return Err(format!(
                "{} says the tree is unchanged, but not of the tree this side named",
                self.name
            ));
        }
        Ok((header, entries))
    }

    /// Chunks, each decompressed and sized as asked (their content is
    /// checked against their id when stored); with the bytes on the wire.
    async fn chunks(&mut self, batch: &[ChunkRef], compress: bool) -> Result<(Vec<(String, Vec<u8>)>, u64), String> {
        let request = ChunkRequest {
            ids: batch.iter().map(|c| c.id.clone()).collect(),
            compress,
        };
        let body = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
        let path = format!("/data/v1/runs/{}/chunks", self.run_id);
        let answer = match self.client.request(Method::POST, &path, Some(body)).await {
            Ok((status, body)) if status.is_success() => body,
            Ok((status, body)) => {
                let (_, error) = refusal(status, &body);
                return Err(format!("{} refused chunks: {error}", self.name));
            }
            Err(e) => return Err(describe(&self.name, &e, self.stall)),
        };
        Ok((parse_frames(&answer, batch)?, answer.len() as u64))
    }

    /// Tells the source which files the other site now holds. Best effort:
    /// the source keeps a backup a little longer if this fails.
    async fn published(&mut self, entries: &[ManifestEntry]) {
        let files: Vec<PublishedFile> = entries
            .iter()
            .map(|e| PublishedFile {
                path: e.path.clone(),
                blake3: e.blake3.clone(),
            })
            .collect();
        let path = format!("/data/v1/runs/{}/published", self.run_id);
        for part in files.chunks(PUBLISHED_BATCH) {
            let Ok(body) = serde_json::to_vec(part) else { continue };
            if let Err(e) = self.client.request(Method::POST, &path, Some(body)).await {
                tracing::warn!(error = %e, "cannot tell the source what was published");
                break;
            }
        }
    }
}

impl Puller {
    pub async fn pull(
        &self,
        job: &str,
        run_id: i64,
        pull: &PullTask,
        cancel: CancellationToken,
        bandwidth: impl Fn() -> Option<Option<u64>>,
        progress: impl Fn(Progress),
    ) -> Result<ReplicationStats, String> {
        let Some(root) = self.roots.get(&pull.root).cloned() else {
            return Err(format!(
                "root {:?} is not in the `roots:` of this agent's config ({}): an agent writes only under the roots its own config names",
                pull.root, self.config_file
            ));
        };
        let tz = dicops_core::schedule::parse_timezone(&pull.timezone).unwrap_or(chrono_tz::UTC);
        let stall = Duration::from_secs(pull.stall_timeout_seconds.max(5));
        let mut link = SourceLink::new(self.tls.clone(), &pull.source_agent, &pull.source_url, stall, run_id)?;
        progress(Progress {
            phase: "manifest",
            bytes: 0,
            remaining: 0,
            message: format!("reading the tree of {}", pull.source_agent),
        });
        let store = {
            let (root, job) = (root.clone(), job.to_string());
            Arc::new(blocking(move || JobStore::open(&root, &job)).await?)
        };
        let held = {
            let store = store.clone();
            blocking(move || Ok(store.latest_header())).await?
        };
        let unless = held.as_ref().and_then(|(_, h)| h.entries_blake3.clone());
        let (header, entries) = link.manifest(job, &cancel, unless.as_deref()).await?;
        if header.unchanged {
            if let Some((snapshot, _)) = held {
                let kept = apply_retention(&store, pull, tz, root.join(job), snapshot.clone()).await?;
                return Ok(unchanged(run_id, snapshot, &header, kept.len()));
            }
        }
        // Shared, not copied, with the blocking tasks: a manifest of a large
        // tree is the biggest thing a pull holds.
        let (header, entries) = (Arc::new(header), Arc::new(entries));
        progress(Progress {
            phase: "planning",
            bytes: 0,
            remaining: 0,
            message: format!("reusing what is already here for {} files", entries.len()),
        });
        let mut build = {
            let (store, header, entries) = (store.clone(), header.clone(), entries.clone());
            blocking(move || store.start_build(&header, entries)).await?
        };
        let total_missing = build.bytes_missing;
        tracing::info!(
            run = run_id,
            files = entries.len(),
            base = build.base().unwrap_or("none"),
            linked = build.files_linked,
            bytes_local = build.bytes_local,
            bytes_resumed = build.bytes_resumed,
            bytes_missing = total_missing,
            "replication planned"
        );
        let missing = std::mem::take(&mut build.missing);

        let mut fetched = 0u64;
        let mut on_wire = 0u64;
        let mut rate = pull.bandwidth;
        // The limiter measures from the last change of rate.
        let mut window = (Instant::now(), 0u64);
        let batch_bytes = pull
            .bandwidth
            .map_or(BATCH_BYTES, |rate| (rate / 2).clamp(MIN_BATCH_BYTES, BATCH_BYTES));
        // The build is written (chunks hashed, written in place) by a
        // blocking task while the next batch is fetched.
        type Storing = tokio::task::JoinHandle<(Build, Result<u64, String>)>;
        async fn stored(storing: Storing, fetched: &mut u64) -> Result<Build, String> {
            let (build, written) = storing.await.map_err(|e| format!("internal error: {e}"))?;
            *fetched += written?;
            Ok(build)
        }
        // Two chunk requests in flight on two connections when no rate
        // limits the run: the source reads and encrypts one batch while
        // this side decrypts the other (on two cores, about a third more
        // throughput than one request at a time).
        type Fetching = tokio::task::JoinHandle<(SourceLink, Result<(Vec<(String, Vec<u8>)>, u64), String>)>;
        let mut free_links = vec![link];
        let mut in_flight: std::collections::VecDeque<Fetching> = std::collections::VecDeque::new();
        let mut to_fetch = batches(&missing, batch_bytes).into_iter();
        let mut idle = Some(build);
        let mut storing: Option<Storing> = None;
        let transfer: Result<(), String> = async {
            loop {
                if let Some(new) = bandwidth().filter(|new| *new != rate) {
                    tracing::info!(run = run_id, from = ?rate, to = ?new, "bandwidth changed by the controller");
                    rate = new;
                    window = (Instant::now(), on_wire);
                }
                if cancel.is_cancelled() {
                    return Err("the run was cancelled (max_runtime passed, or the agent is stopping)".into());
                }
                let most = if rate.is_some_and(|r| r > 0) { 1 } else { 2 };
                while in_flight.len() < most {
                    let Some(batch) = to_fetch.next() else { break };
                    let mut link = match free_links.pop() {
                        Some(link) => link,
                        None => SourceLink::new(self.tls.clone(), &pull.source_agent, &pull.source_url, stall, run_id)?,
                    };
                    let (batch, compress) = (batch.to_vec(), pull.compress);
                    in_flight.push_back(tokio::spawn(async move {
                        let answer = link.chunks(&batch, compress).await;
                        (link, answer)
                    }));
                }
                let Some(next) = in_flight.pop_front() else { break };
                progress(Progress {
                    phase: "transferring",
                    bytes: fetched,
                    remaining: total_missing.saturating_sub(fetched),
                    message: format!(
                        "{} of {} fetched",
                        dicops_core::units::format_bytes(fetched),
                        dicops_core::units::format_bytes(total_missing)
                    ),
                });
                let (link, answer) = next.await.map_err(|e| format!("internal error: {e}"))?;
                free_links.push(link);
                let (chunks, wire) = answer?;
                on_wire += wire;
                // Checked against their ids on one core while the previous
                // batch is written on the other.
                let checking = tokio::task::spawn_blocking(move || {
                    chunks
                        .into_iter()
                        .map(|(id, bytes)| VerifiedChunk::check(id, bytes))
                        .collect::<Result<Vec<_>, String>>()
                });
                if let Some(previous) = storing.take() {
                    idle = Some(stored(previous, &mut fetched).await?);
                }
                let chunks = checking.await.map_err(|e| format!("internal error: {e}"))??;
                let mut build = idle.take().ok_or("internal error: the build is gone")?;
                storing = Some(tokio::task::spawn_blocking(move || {
                    let mut bytes = 0u64;
                    for chunk in &chunks {
                        match build.add_verified(chunk) {
                            Ok(n) => bytes += n,
                            Err(e) => return (build, Err(e)),
                        }
                    }
                    (build, Ok(bytes))
                }));
                if let Some(rate) = rate.filter(|r| *r > 0) {
                    // Stay under the rate on average since it was set.
                    let due = Duration::from_secs_f64((on_wire - window.1) as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(window.0.elapsed()) {
                        tokio::time::sleep(wait).await;
                    }
                }
            }
            Ok(())
        }
        .await;
        for fetching in in_flight {
            fetching.abort();
        }
        // Never leave a write into the build running past the run's end.
        if let Some(previous) = storing.take() {
            let last = stored(previous, &mut fetched).await;
            transfer.clone()?;
            idle = Some(last?);
        }
        transfer?;
        let build = idle.ok_or("internal error: the build is gone")?;
        progress(Progress {
            phase: "publishing",
            bytes: fetched,
            remaining: 0,
            message: format!("publishing {} files", entries.len()),
        });
        let published = {
            let store = store.clone();
            blocking(move || build.publish(&store)).await?
        };
        if pull.verify {
            progress(Progress {
                phase: "verifying",
                bytes: fetched,
                remaining: 0,
                message: format!("re-reading snapshot {}", published.name),
            });
            let dir = root.join(job).join("snapshots").join(&published.name);
            let entries = entries.clone();
            blocking(move || verify(&dir, &entries)).await?;
        }
        let snapshots = apply_retention(&store, pull, tz, root.join(job), published.name.clone()).await?;
        let mut link = match free_links.pop() {
            Some(link) => link,
            None => SourceLink::new(self.tls.clone(), &pull.source_agent, &pull.source_url, stall, run_id)?,
        };
        link.published(&entries).await;
        let bytes: u64 = entries.iter().map(|e| e.size).sum();
        Ok(ReplicationStats {
            snapshot: published.name,
            source_state_at: header.taken_at,
            files: entries.len() as u64,
            bytes,
            files_linked: published.files_linked,
            bytes_reused: bytes.saturating_sub(fetched),
            bytes_fetched: fetched,
            bytes_on_wire: on_wire,
            snapshots: snapshots.len() as u64,
        })
    }
}

/// Applies the job's retention to its snapshots, sparing `keep` (the
/// newest) and any snapshot a verify is reading (a reload may have changed
/// the policy: applied after every run, whether it published or not).
/// Returns the snapshots kept.
async fn apply_retention(
    store: &Arc<JobStore>,
    pull: &PullTask,
    tz: chrono_tz::Tz,
    job_dir: PathBuf,
    keep: String,
) -> Result<Vec<String>, String> {
    let (store, retention) = (store.clone(), super::snapshot_retention(&pull.retention));
    blocking(move || {
        let mut in_use = super::verify::in_use(&job_dir);
        in_use.push(keep);
        let deleted = store.apply_retention(&retention, tz, &in_use)?;
        if !deleted.is_empty() {
            tracing::info!(deleted = ?deleted, "snapshots deleted by retention");
        }
        store.snapshots()
    })
    .await
}

/// The source holds exactly the tree of the newest snapshot: nothing to
/// fetch or build, and no new snapshot (it would be that one again). The
/// run confirms that the other site is current as of now.
fn unchanged(run_id: i64, snapshot: String, header: &ManifestHeader, snapshots: usize) -> ReplicationStats {
    tracing::info!(run = run_id, snapshot = %snapshot, "the source's tree is unchanged since the newest snapshot");
    let bytes = header.bytes.unwrap_or(0);
    let files = header.files.unwrap_or(0);
    ReplicationStats {
        snapshot,
        source_state_at: header.taken_at,
        files,
        bytes,
        files_linked: files,
        bytes_reused: bytes,
        bytes_fetched: 0,
        bytes_on_wire: 0,
        snapshots: snapshots as u64,
    }
}

impl Puller {
    /// A verify run: the replication's snapshots re-read against their
    /// manifests; damaged chunks fetched again from the source when it
    /// still has them and written back; what cannot be repaired is lost.
    pub async fn verify(
        &self,
        job: &str,
        run_id: i64,
        task: &VerifyTask,
        cancel: CancellationToken,
        progress: impl Fn(Progress),
    ) -> Result<VerifyStats, String> {
        let Some(root) = self.roots.get(&task.root).cloned() else {
            return Err(format!(
                "root {:?} is not in the `roots:` of this agent's config ({})",
                task.root, self.config_file
            ));
        };
        // A job name is one path component: nothing outside the root.
        if !dicops_proto::is_valid_id(&task.replication) {
            return Err(format!("refused: {:?} is not a job name", task.replication));
        }
        let job_dir = root.join(&task.replication);
        if !job_dir.join("snapshots").is_dir() {
            return Err(format!(
                "no snapshot of {} under {} yet: nothing to verify",
                task.replication,
                root.display()
            ));
        }
        progress(Progress {
            phase: "verifying",
            bytes: 0,
            remaining: 0,
            message: format!("re-reading the snapshots of {}", task.replication),
        });
        let marker = super::verify::marker(&job_dir, run_id);
        let checked = {
            let (dir, marker, percent) = (job_dir.clone(), marker.clone(), task.sample_percent);
            blocking(move || {
                super::verify::check(&dir, run_id, percent, |name| {
                    let _ = std::fs::write(&marker, name);
                })
            })
            .await
        };
        let _ = std::fs::remove_file(&marker);
        let checked = checked?;
        let mut stats = VerifyStats {
            snapshots: checked.snapshots,
            files: checked.files,
            bytes: checked.bytes,
            damaged: checked.damaged.iter().map(|d| d.shown.clone()).collect(),
            ..VerifyStats::default()
        };
        if checked.damaged.is_empty() {
            return Ok(stats);
        }
        tracing::warn!(run = run_id, damaged = ?stats.damaged, "snapshot files differ from their manifests");
        let mut fetched: HashMap<String, Vec<u8>> = HashMap::new();
        if task.repair {
            progress(Progress {
                phase: "repairing",
                bytes: 0,
                remaining: 0,
                message: format!(
                    "{} damaged file(s): asking {} for their chunks",
                    checked.damaged.len(),
                    task.source_agent
                ),
            });
            match self
                .fetch_for_repair(job, run_id, task, &checked.damaged, &cancel)
                .await
            {
                Ok(chunks) => fetched = chunks,
                Err(e) => tracing::warn!(run = run_id, error = %e, "cannot fetch chunks to repair from the source"),
            }
        }
        for damage in checked.damaged {
            let complete = damage.chunks.iter().all(|(_, c)| fetched.contains_key(&c.id));
            let repaired = complete && {
                let (damage, chunks) = (damage.clone(), fetched.clone());
                blocking(move || super::verify::repair(&damage, &chunks)).await.is_ok()
            };
            if repaired {
                stats.repaired.push(damage.shown);
            } else {
                stats.lost.push(damage.shown);
            }
        }
        Ok(stats)
    }

    /// The chunks the damaged files need, among those the source still has.
    async fn fetch_for_repair(
        &self,
        job: &str,
        run_id: i64,
        task: &VerifyTask,
        damaged: &[super::verify::Damage],
        cancel: &CancellationToken,
    ) -> Result<HashMap<String, Vec<u8>>, String> {
        let mut link = SourceLink::new(
            self.tls.clone(),
            &task.source_agent,
            &task.source_url,
            Duration::from_secs(60),
            run_id,
        )?;
        let (_, entries) = link.manifest(job, cancel, None).await?;
        let at_source: HashSet<&str> = entries
            .iter()
            .flat_map(|e| e.chunks.iter().map(|c| c.id.as_str()))
            .collect();
        let mut wanted: Vec<ChunkRef> = Vec::new();
        for (_, chunk) in damaged.iter().flat_map(|d| d.chunks.iter()) {
            if at_source.contains(chunk.id.as_str()) && !wanted.iter().any(|w| w.id == chunk.id) {
                wanted.push(chunk.clone());
            }
        }
        let mut fetched = HashMap::new();
        for batch in batches(&wanted, BATCH_BYTES) {
            let (chunks, _) = link.chunks(batch, true).await?;
            for (id, bytes) in chunks {
                // A repair must not write bytes that are not what the id says.
                if blake3::hash(&bytes).to_hex().as_str() == id {
                    fetched.insert(id, bytes);
                }
            }
        }
        Ok(fetched)
    }
}

fn describe(source: &str, error: &ClientError, stall: Duration) -> String {
    match error {
        ClientError::Timeout { .. } => format!(
            "{source}: no data moved for {} s (stall_timeout): transfer aborted, to be retried",
            stall.as_secs()
        ),
        other => format!("{source}: {other}"),
    }
}

/// Splits the missing chunks into requests the source accepts.
fn batches(missing: &[ChunkRef], max_bytes: u64) -> Vec<&[ChunkRef]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut bytes = 0u64;
    for (i, chunk) in missing.iter().enumerate() {
        if i > start && (i - start >= BATCH_CHUNKS || bytes + u64::from(chunk.len) > max_bytes) {
            out.push(&missing[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += u64::from(chunk.len);
    }
    if start < missing.len() {
        out.push(&missing[start..]);
    }
    out
}

/// The manifest: a header line, then one entry per line.
pub(crate) fn parse_manifest(body: &[u8]) -> Result<(ManifestHeader, Vec<ManifestEntry>), String> {
    let mut lines = body.split(|b| *b == b'\n').filter(|l| !l.is_empty());
    let header: ManifestHeader = lines
        .next()
        .ok_or("the source sent an empty manifest")
        .and_then(|l| serde_json::from_slice(l).map_err(|_| "the source's manifest header is malformed"))?;
    if let Some(expected) = header.entries_blake3.as_ref().filter(|_| !header.unchanged) {
        let start = body.iter().position(|b| *b == b'\n').map_or(body.len(), |at| at + 1);
        let actual = blake3::hash(&body[start..]).to_hex();
        if actual.as_str() != expected {
            return Err(format!(
                "the source's manifest entries have BLAKE3 {actual}, its header says {expected}"
            ));
        }
    }
    let mut entries = Vec::new();
    for (i, line) in lines.enumerate() {
        let entry: ManifestEntry = serde_json::from_slice(line)
            .map_err(|e| format!("line {} of the source's manifest is malformed: {e}", i + 2))?;
        entries.push(entry);
        if header.files.is_some_and(|n| entries.len() as u64 > n) {
            return Err(format!(
                "the source's manifest holds more entries than the {} its header announced",
                header.files.unwrap_or(0)
            ));
        }
    }
    if let Some(n) = header.files.filter(|n| *n != entries.len() as u64 && !header.unchanged) {
        return Err(format!(
            "the source's manifest holds {} entries, its header announced {n}",
            entries.len()
        ));
    }
    Ok((header, entries))
}

/// The frames of a chunk answer: every chunk asked for, each decompressed
/// within its announced length. Whether its bytes match its id is checked
/// when it is stored.
pub(crate) fn parse_frames(body: &[u8], asked: &[ChunkRef]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let lengths: std::collections::HashMap<&str, u32> = asked.iter().map(|c| (c.id.as_str(), c.len)).collect();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut rest = body;
    // One context for the batch, made when the first compressed chunk comes.
    let mut decompressor: Option<zstd::bulk::Decompressor<'static>> = None;
    while !rest.is_empty() {
        if rest.len() < 37 {
            return Err("the source sent a truncated chunk frame".into());
        }
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&rest[..32]);
        let id = encode_hex32(&raw);
        let codec = rest[32];
        let len = u32::from_le_bytes([rest[33], rest[34], rest[35], rest[36]]) as usize;
        let Some(&expected) = lengths.get(id.as_str()) else {
            return Err(format!("the source sent chunk {id}, which was not asked for"));
        };
        let payload = rest.get(37..37 + len).ok_or("the source sent a truncated chunk")?;
        let bytes = match codec {
            CODEC_RAW => payload.to_vec(),
            CODEC_ZSTD => {
                let z = match &mut decompressor {
                    Some(z) => z,
                    None => decompressor
                        .insert(zstd::bulk::Decompressor::new().map_err(|e| format!("cannot start zstd: {e}"))?),
                };
                z.decompress(payload, expected as usize)
                    .map_err(|e| format!("chunk {id} does not decompress: {e}"))?
            }
            other => return Err(format!("chunk {id} has unknown codec {other}")),
        };
        if bytes.len() != expected as usize {
            return Err(format!(
                "chunk {id} is {} bytes, the manifest says {expected}",
                bytes.len()
            ));
        }
        seen.insert(id.clone());
        out.push((id, bytes));
        rest = &rest[37 + len..];
    }
    if let Some(missing) = asked.iter().find(|c| !seen.contains(&c.id)) {
        return Err(format!("the source did not send chunk {}", missing.id));
    }
    Ok(out)
}

/// Re-reads every file of a published snapshot and compares with the
/// manifest.
fn verify(dir: &Path, entries: &[ManifestEntry]) -> Result<(), String> {
    let mut bad = Vec::new();
    for entry in entries {
        let path = dir.join(&entry.path);
        match crate::backup::scan::hash_file(&path) {
            Ok(hash) if hash == entry.blake3 => {}
            Ok(_) => bad.push(entry.path.clone()),
            Err(e) => bad.push(format!("{} ({e})", entry.path)),
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "verify after publish: {} file(s) of {} differ from the manifest: {}",
            bad.len(),
            dir.display(),
            bad.iter().take(10).cloned().collect::<Vec<_>>().join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(len: u32) -> ChunkRef {
        ChunkRef {
            id: format!("{len:064x}"),
            len,
        }
    }

    #[test]
    fn batches_stay_within_the_source_limits() {
        let missing: Vec<ChunkRef> = (0..600).map(|_| chunk(64 << 10)).collect();
        let big = batches(&missing, BATCH_BYTES);
        assert!(big
            .iter()
            .all(|b| b.len() <= BATCH_CHUNKS && b.iter().map(|c| u64::from(c.len)).sum::<u64>() <= BATCH_BYTES));
        assert_eq!(big.iter().map(|b| b.len()).sum::<usize>(), 600);
        let small = batches(&missing, 256 << 10);
        assert!(
            small.iter().all(|b| b.len() == 4),
            "four 64 KiB chunks per 256 KiB request"
        );
        assert!(batches(&[], BATCH_BYTES).is_empty());
    }

    #[test]
    fn frames_must_answer_exactly_what_was_asked() {
        let data = b"hello chunk".to_vec();
        let id = blake3::hash(&data).to_hex().to_string();
        let asked = vec![ChunkRef {
            id: id.clone(),
            len: data.len() as u32,
        }];
        let mut raw = [0u8; 32];
        raw.copy_from_slice(blake3::hash(&data).as_bytes());
        let mut body = raw.to_vec();
        body.push(CODEC_RAW);
        body.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(&data);
        assert_eq!(parse_frames(&body, &asked).expect("frames"), vec![(id, data.clone())]);
        assert!(parse_frames(&body[..body.len() - 1], &asked)
            .unwrap_err()
            .contains("truncated"));
        assert!(parse_frames(&[], &asked).unwrap_err().contains("did not send chunk"));
        let other = vec![chunk(3)];
        assert!(parse_frames(&body, &other).unwrap_err().contains("not asked for"));
        // A zstd frame that claims to inflate beyond the chunk's length.
        let bomb = zstd::bulk::compress(&vec![0u8; 1 << 20], 3).expect("compress");
        let mut body = raw.to_vec();
        body.push(CODEC_ZSTD);
        body.extend_from_slice(&(bomb.len() as u32).to_le_bytes());
        body.extend_from_slice(&bomb);
        assert!(
            parse_frames(&body, &asked).is_err(),
            "decompression is bounded by the announced length"
        );
    }
}
