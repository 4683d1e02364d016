//! Numbered schema migrations. `PRAGMA user_version` holds the number of
//! migrations applied; each runs once, in one transaction with its bump.
//! Never edit a released migration: add the next one.

pub const MIGRATIONS: &[&str] = &[
    // 1: inventory, jobs, runs, audit log.
    "
    CREATE TABLE inventory (
        agent TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        last_report_at REAL,
        info TEXT
    );
    CREATE TABLE jobs (
        name TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_fire REAL,
        paused INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job TEXT NOT NULL,
        kind TEXT NOT NULL,
        agents TEXT NOT NULL,
        trigger TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'timed_out')),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        error TEXT,
        exit_code INTEGER,
        output_tail TEXT,
        bytes INTEGER,
        files INTEGER
    );
    CREATE INDEX runs_by_job ON runs (job, id DESC);
    CREATE INDEX runs_open ON runs (status) WHERE status IN ('queued', 'running');
    CREATE TABLE audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        at REAL NOT NULL,
        who TEXT NOT NULL,
        certificate TEXT,
        action TEXT NOT NULL,
        target TEXT,
        detail TEXT
    );
    ",
    // 2: runs may end "interrupted" (the agent stopped during the run), and
    // backup runs keep their manifest. SQLite cannot change a CHECK
    // constraint in place: the table is rebuilt, its rows kept.
    "
    CREATE TABLE runs_v2 (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job TEXT NOT NULL,
        kind TEXT NOT NULL,
        agents TEXT NOT NULL,
        trigger TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'timed_out', 'interrupted')),
        created_at REAL NOT NULL,
        started_at REAL,
        finished_at REAL,
        error TEXT,
        exit_code INTEGER,
        output_tail TEXT,
        bytes INTEGER,
        files INTEGER,
        manifest TEXT
    );
    INSERT INTO runs_v2 (id, job, kind, agents, trigger, attempt, status, created_at, started_at, finished_at, error, exit_code, output_tail, bytes, files)
        SELECT id, job, kind, agents, trigger, attempt, status, created_at, started_at, finished_at, error, exit_code, output_tail, bytes, files FROM runs;
    DROP TABLE runs;
    ALTER TABLE runs_v2 RENAME TO runs;
    CREATE INDEX runs_by_job ON runs (job, id DESC);
    CREATE INDEX runs_open ON runs (status) WHERE status IN ('queued', 'running');
    ",
    // 3: what a replication run did (JSON of ReplicationStats).
    "ALTER TABLE runs ADD COLUMN replication TEXT;",
];
