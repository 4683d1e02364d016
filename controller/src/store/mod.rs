//! The controller's durable state in SQLite (WAL). This module is the only
//! code that speaks SQL.
//!
//! Every write that acknowledges something to an agent or an operator is
//! committed with `synchronous = FULL` first: once the controller has said
//! "recorded", a crash or power cut does not take it back.

mod migrations;

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use dicops_proto::RunInfo;
use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {message}")]
    Open { path: String, message: String },
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error(
        "database {path} has schema version {found}, newer than this controller knows ({known}); refusing to touch it"
    )]
    TooNew { path: String, found: usize, known: usize },
}

/// How a run ended, or where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    TimedOut,
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Succeeded => "succeeded",
            RunStatus::Failed => "failed",
            RunStatus::TimedOut => "timed_out",
            RunStatus::Interrupted => "interrupted",
        }
    }
}

/// What the scheduler remembers of a job across restarts.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub first_seen: f64,
    pub last_fire: Option<f64>,
    pub paused: bool,
}

/// The end of a run, as recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunEnd {
    pub error: Option<String>,
    pub exit_code: Option<i32>,
    pub output_tail: Option<String>,
    pub bytes: Option<u64>,
    pub files: Option<u64>,
    pub started_at: Option<f64>,
    /// A backup run's manifest, as JSON.
    pub manifest: Option<String>,
    /// A replication run's statistics, as JSON.
    pub replication: Option<String>,
}

/// Per job: its last run and its last success, as the metrics show them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobSummary {
    pub job: String,
    /// When the last run and the last success started.
    pub last_run: Option<f64>,
    pub last_success: Option<f64>,
    /// The last finished run: how it ended, why, and how long it took.
    pub last_status: Option<String>,
    pub last_error: Option<String>,
    pub last_duration: Option<f64>,
    /// What the last successful run produced.
    pub last_success_bytes: Option<u64>,
    /// The statistics of the last successful replication run, as JSON.
    pub last_success_replication: Option<String>,
}

/// One agent as last seen.
#[derive(Debug, Clone, PartialEq)]
pub struct InventoryRow {
    pub agent: String,
    pub site: String,
    pub last_report_at: Option<f64>,
    /// The agent's info as JSON.
    pub info: Option<String>,
}

/// A run to create.
#[derive(Debug, Clone, PartialEq)]
pub struct NewRun<'a> {
    pub job: &'a str,
    pub kind: &'a str,
    pub agents: &'a str,
    pub trigger: &'a str,
    pub attempt: u32,
}

pub struct Store {
    conn: Mutex<Connection>,
}

const RUN_COLUMNS: &str =
    "id, job, kind, agents, trigger, attempt, status, created_at, started_at, finished_at, error, exit_code, output_tail, bytes, files";

/// A row of `runs` as the API shows it.
fn run_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RunInfo> {
    Ok(RunInfo {
        id: row.get(0)?,
        job: row.get(1)?,
        kind: row.get(2)?,
        agents: row.get(3)?,
        trigger: row.get(4)?,
        attempt: row.get(5)?,
        status: row.get(6)?,
        created_at: row.get(7)?,
        started_at: row.get(8)?,
        finished_at: row.get(9)?,
        error: row.get(10)?,
        exit_code: row.get(11)?,
        output_tail: row.get(12)?,
        bytes: row.get::<_, Option<i64>>(13)?.map(|b| b.max(0) as u64),
        files: row.get::<_, Option<i64>>(14)?.map(|f| f.max(0) as u64),
        progress: None,
        artifacts: Vec::new(),
    })
}

impl Store {
    /// Opens (creating it and its folder on first start) and migrates.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let shown = path.display().to_string();
        let open_err = |message: String| StoreError::Open {
            path: shown.clone(),
            message,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| open_err(format!("cannot create {}: {e}", parent.display())))?;
        }
        let conn = Connection::open(path).map_err(|e| open_err(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = Store { conn: Mutex::new(conn) };
        store.migrate(&shown)?;
        Ok(store)
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn migrate(&self, shown: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let version: usize = conn
            .pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))?
            .max(0) as usize;
        let known = migrations::MIGRATIONS.len();
        if version > known {
            return Err(StoreError::TooNew {
                path: shown.to_string(),
                found: version,
                known,
            });
        }
        for (i, sql) in migrations::MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
            tracing::info!(version = i + 1, "database schema migrated");
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<i64, StoreError> {
        Ok(self.conn().pragma_query_value(None, "user_version", |row| row.get(0))?)
    }

    /// The remembered state of a job, created (with `now` as its baseline
    /// for catch-up) on first sight.
    pub fn job(&self, name: &str, kind: &str, now: f64) -> Result<JobRow, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO jobs (name, kind, first_seen, last_fire) VALUES (?1, ?2, ?3, ?3) ON CONFLICT (name) DO NOTHING",
            params![name, kind, now],
        )?;
        Ok(conn.query_row(
            "SELECT first_seen, last_fire, paused FROM jobs WHERE name = ?1",
            [name],
            |row| {
                Ok(JobRow {
                    first_seen: row.get(0)?,
                    last_fire: row.get(1)?,
                    paused: row.get::<_, i64>(2)? != 0,
                })
            },
        )?)
    }

    pub fn set_last_fire(&self, name: &str, fire: f64) -> Result<(), StoreError> {
        self.conn()
            .execute("UPDATE jobs SET last_fire = ?2 WHERE name = ?1", params![name, fire])?;
        Ok(())
    }

    pub fn set_paused(&self, name: &str, paused: bool) -> Result<(), StoreError> {
        self.conn().execute(
            "UPDATE jobs SET paused = ?2 WHERE name = ?1",
            params![name, paused as i64],
        )?;
        Ok(())
    }

    pub fn create_run(
        &self,
        job: &str,
        kind: &str,
        agents: &str,
        trigger: &str,
        attempt: u32,
        now: f64,
    ) -> Result<i64, StoreError> {
        let conn = self.conn();
        conn.execute(
            "INSERT INTO runs (job, kind, agents, trigger, attempt, status, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
            params![job, kind, agents, trigger, attempt, now],
        )?;
        Ok(conn.last_insert_rowid())
    }

    /// The run was handed to its agent.
    pub fn mark_running(&self, id: i64, now: f64) -> Result<(), StoreError> {
        self.mark_running_many(&[(id, now)])
    }

    /// Several runs handed out at once, in one transaction.
    pub fn mark_running_many(&self, taken: &[(i64, f64)]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE runs SET status = 'running', started_at = ?2 WHERE id = ?1 AND status = 'queued'",
            )?;
            for (id, at) in taken {
                stmt.execute(params![id, at])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Creates runs and records fires in one transaction: one fsync for a
    /// whole tick of the scheduler, however many jobs fired in it.
    pub fn record_tick(&self, runs: &[NewRun<'_>], fires: &[(&str, f64)], now: f64) -> Result<Vec<i64>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let mut ids = Vec::with_capacity(runs.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO runs (job, kind, agents, trigger, attempt, status, created_at) VALUES (?1, ?2, ?3, ?4, ?5, 'queued', ?6)",
            )?;
            for run in runs {
                insert.execute(params![run.job, run.kind, run.agents, run.trigger, run.attempt, now])?;
                ids.push(tx.last_insert_rowid());
            }
            let mut fire = tx.prepare_cached("UPDATE jobs SET last_fire = ?2 WHERE name = ?1")?;
            for (job, at) in fires {
                fire.execute(params![job, at])?;
            }
        }
        tx.commit()?;
        Ok(ids)
    }

    /// Records the end of a run exactly once: returns false (and changes
    /// nothing) if the run had already ended.
    pub fn finish_run(&self, id: i64, status: RunStatus, end: &RunEnd, now: f64) -> Result<bool, StoreError> {
        let changed = self.conn().execute(
            "UPDATE runs SET status = ?2, finished_at = ?3, error = ?4, exit_code = ?5, output_tail = ?6, bytes = ?7, files = ?8,
                 started_at = COALESCE(?9, started_at), manifest = ?10, replication = ?11
             WHERE id = ?1 AND status IN ('queued', 'running')",
            params![
                id,
                status.as_str(),
                now,
                end.error,
                end.exit_code,
                end.output_tail,
                end.bytes.map(|b| b as i64),
                end.files.map(|f| f as i64),
                end.started_at,
                end.manifest,
                end.replication,
            ],
        )?;
        Ok(changed == 1)
    }

    /// Runs not ended yet (at start: those a previous controller process
    /// left open), oldest first.
    pub fn open_runs(&self) -> Result<Vec<RunInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status IN ('queued', 'running') ORDER BY id"
        ))?;
        let rows = stmt.query_map([], run_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// One run, with its manifest.
    pub fn run(&self, id: i64) -> Result<Option<RunInfo>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("SELECT {RUN_COLUMNS}, manifest FROM runs WHERE id = ?1"),
                [id],
                |row| {
                    let mut run = run_from_row(row)?;
                    let manifest: Option<String> = row.get(15)?;
                    run.artifacts = manifest.and_then(|m| serde_json::from_str(&m).ok()).unwrap_or_default();
                    Ok(run)
                },
            )
            .optional()?)
    }

    /// The newest runs of a job, newest first.
    pub fn runs_of(&self, job: &str, limit: u32) -> Result<Vec<RunInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE job = ?1 ORDER BY id DESC LIMIT ?2"
        ))?;
        let rows = stmt.query_map(params![job, limit], run_from_row)?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Per job: its last run, last finished run and last success.
    pub fn job_summaries(&self) -> Result<Vec<JobSummary>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT j.job, j.last_run, s.started, s.bytes, f.status, f.error, f.finished_at - f.started_at, s.replication
             FROM (SELECT job, MAX(COALESCE(started_at, created_at)) AS last_run,
                          MAX(CASE WHEN status = 'succeeded' THEN id END) AS success_id,
                          MAX(CASE WHEN finished_at IS NOT NULL THEN id END) AS finished_id
                   FROM runs GROUP BY job) j
             LEFT JOIN (SELECT id, COALESCE(started_at, created_at) AS started, bytes, replication FROM runs) s ON s.id = j.success_id
             LEFT JOIN runs f ON f.id = j.finished_id",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok(JobSummary {
                job: row.get(0)?,
                last_run: row.get(1)?,
                last_success: row.get(2)?,
                last_success_bytes: row.get::<_, Option<i64>>(3)?.map(|b| b.max(0) as u64),
                last_status: row.get(4)?,
                last_error: row.get(5)?,
                last_duration: row.get::<_, Option<f64>>(6)?.map(|d| d.max(0.0)),
                last_success_replication: row.get(7)?,
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn audit(
        &self,
        who: &str,
        certificate: Option<&str>,
        action: &str,
        target: &str,
        detail: &str,
        now: f64,
    ) -> Result<(), StoreError> {
        self.conn().execute(
            "INSERT INTO audit (at, who, certificate, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now, who, certificate, action, target, detail],
        )?;
        Ok(())
    }

    /// Saves the inventory as last seen: (agent, site, last report, info JSON).
    pub fn save_inventory(&self, rows: &[InventoryRow]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        tx.execute("DELETE FROM inventory", [])?;
        {
            let mut stmt =
                tx.prepare("INSERT INTO inventory (agent, site, last_report_at, info) VALUES (?1, ?2, ?3, ?4)")?;
            for row in rows {
                stmt.execute(params![row.agent, row.site, row.last_report_at, row.info])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes finished runs and audit entries older than `before`.
    pub fn prune(&self, before: f64) -> Result<usize, StoreError> {
        let conn = self.conn();
        let runs = conn.execute(
            "DELETE FROM runs WHERE finished_at IS NOT NULL AND finished_at < ?1",
            [before],
        )?;
        let audit = conn.execute("DELETE FROM audit WHERE at < ?1", [before])?;
        Ok(runs + audit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("state/controller.db")).expect("open");
        (dir, store)
    }

    #[test]
    fn creates_and_migrates_once() {
        let (dir, store) = store();
        assert_eq!(
            store.schema_version().expect("version"),
            migrations::MIGRATIONS.len() as i64
        );
        drop(store);
        // Reopening applies nothing twice.
        let again = Store::open(&dir.path().join("state/controller.db")).expect("reopen");
        assert_eq!(
            again.schema_version().expect("version"),
            migrations::MIGRATIONS.len() as i64
        );
    }

    #[test]
    fn refuses_a_database_from_the_future() {
        let (dir, store) = store();
        store.conn().pragma_update(None, "user_version", 99).expect("bump");
        drop(store);
        let err = Store::open(&dir.path().join("state/controller.db"))
            .err()
            .expect("refused");
        assert!(err.to_string().contains("schema version 99, newer"), "{err}");
    }

    #[test]
    fn a_run_ends_exactly_once() {
        let (_dir, store) = store();
        let id = store
            .create_run("dump", "command", "db01", "schedule", 0, 100.0)
            .expect("create");
        store.mark_running(id, 101.0).expect("running");
        let end = RunEnd {
            exit_code: Some(0),
            bytes: Some(42),
            ..RunEnd::default()
        };
        assert!(store.finish_run(id, RunStatus::Succeeded, &end, 110.0).expect("finish"));
        // The same result again (an agent resending after a lost ack).
        assert!(!store
            .finish_run(id, RunStatus::Failed, &RunEnd::default(), 111.0)
            .expect("again"));
        let run = store.run(id).expect("read").expect("exists");
        assert_eq!(run.status, RunStatus::Succeeded.as_str());
        assert_eq!(
            (run.started_at, run.finished_at, run.bytes),
            (Some(101.0), Some(110.0), Some(42))
        );
        assert_eq!(store.runs_of("dump", 10).expect("history").len(), 1);
    }

    #[test]
    fn an_upgrade_keeps_the_history_of_the_previous_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("controller.db");
        {
            let conn = Connection::open(&path).expect("open");
            conn.execute_batch(migrations::MIGRATIONS[0]).expect("v1");
            conn.pragma_update(None, "user_version", 1).expect("version");
            conn.execute(
                "INSERT INTO runs (job, kind, agents, trigger, attempt, status, created_at, finished_at, bytes) VALUES ('pg', 'command', 'db01', 'schedule', 0, 'succeeded', 1.0, 2.0, 42)",
                [],
            )
            .expect("old run");
        }
        let store = Store::open(&path).expect("migrate");
        let runs = store.runs_of("pg", 10).expect("history");
        assert_eq!((runs.len(), runs[0].bytes), (1, Some(42)));
        let id = store.create_run("pg", "backup", "db01", "manual", 0, 3.0).expect("new");
        assert!(store
            .finish_run(id, RunStatus::Interrupted, &RunEnd::default(), 4.0)
            .expect("the new status is allowed"));
    }

    #[test]
    fn open_runs_are_listed_for_a_restarted_controller() {
        let (_dir, store) = store();
        let a = store.create_run("a", "command", "db01", "schedule", 0, 1.0).expect("a");
        let b = store.create_run("b", "command", "db01", "manual", 0, 2.0).expect("b");
        store.mark_running(b, 3.0).expect("running");
        let done = store.create_run("c", "command", "db01", "manual", 0, 2.0).expect("c");
        store
            .finish_run(done, RunStatus::Succeeded, &RunEnd::default(), 4.0)
            .expect("finish");
        let open = store.open_runs().expect("open");
        assert_eq!(open.iter().map(|r| r.id).collect::<Vec<_>>(), [a, b]);
        assert_eq!(open[1].status, "running");
    }

    #[test]
    fn summaries_give_the_last_finished_run_and_the_last_success() {
        let (_dir, store) = store();
        let good = store
            .create_run("pg", "backup", "db01", "schedule", 0, 10.0)
            .expect("good");
        store.mark_running(good, 11.0).expect("running");
        let end = RunEnd {
            bytes: Some(4096),
            manifest: Some(r#"[{"path":"db.dump","size":4096,"blake3":"ab"}]"#.into()),
            ..RunEnd::default()
        };
        store
            .finish_run(good, RunStatus::Succeeded, &end, 20.0)
            .expect("finish");
        let bad = store
            .create_run("pg", "backup", "db01", "schedule", 0, 30.0)
            .expect("bad");
        store.mark_running(bad, 31.0).expect("running");
        let end = RunEnd {
            error: Some("disk full".into()),
            started_at: Some(32.0),
            ..RunEnd::default()
        };
        store
            .finish_run(bad, RunStatus::Interrupted, &end, 35.0)
            .expect("finish");
        let summary = store.job_summaries().expect("summaries").remove(0);
        assert_eq!(
            summary,
            JobSummary {
                job: "pg".into(),
                last_run: Some(32.0),
                last_success: Some(11.0),
                last_status: Some("interrupted".into()),
                last_error: Some("disk full".into()),
                last_duration: Some(3.0),
                last_success_bytes: Some(4096),
                last_success_replication: None,
            }
        );
        let run = store.run(good).expect("read").expect("exists");
        assert_eq!(run.artifacts.len(), 1);
        assert_eq!(run.artifacts[0].path, "db.dump");
    }

    #[test]
    fn jobs_remember_fires_and_pauses() {
        let (_dir, store) = store();
        let row = store.job("dump", "command", 50.0).expect("job");
        assert_eq!(
            row,
            JobRow {
                first_seen: 50.0,
                last_fire: Some(50.0),
                paused: false
            }
        );
        store.set_last_fire("dump", 60.0).expect("fire");
        store.set_paused("dump", true).expect("pause");
        let row = store.job("dump", "command", 99.0).expect("job");
        assert_eq!(
            row,
            JobRow {
                first_seen: 50.0,
                last_fire: Some(60.0),
                paused: true
            }
        );
    }

    #[test]
    fn prunes_old_history_only() {
        let (_dir, store) = store();
        let old = store
            .create_run("a", "command", "db01", "schedule", 0, 1.0)
            .expect("old");
        store
            .finish_run(old, RunStatus::Succeeded, &RunEnd::default(), 2.0)
            .expect("finish");
        let open = store
            .create_run("a", "command", "db01", "schedule", 0, 1.0)
            .expect("open");
        let new = store
            .create_run("a", "command", "db01", "schedule", 0, 100.0)
            .expect("new");
        store
            .finish_run(new, RunStatus::Failed, &RunEnd::default(), 101.0)
            .expect("finish");
        store
            .audit("operator alice", None, "pause", "a", "", 1.0)
            .expect("audit");
        assert_eq!(store.prune(50.0).expect("prune"), 2);
        assert!(store.run(old).expect("read").is_none());
        assert!(store.run(open).expect("read").is_some(), "open runs are never pruned");
        assert!(store.run(new).expect("read").is_some());
    }
}
