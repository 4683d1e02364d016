//! The ledger of a backup command: which files each successful run
//! produced, with their checksums, and whether each is already in the other
//! site. Retention deletes only what the ledger names, so files that dicops
//! did not produce are never touched.

use std::path::{Path, PathBuf};

use dicops_proto::Artifact;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ledger {
    pub runs: Vec<LedgerRun>,
}

/// The artifacts of one successful run: one backup, kept or deleted whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRun {
    pub run_id: i64,
    pub started_at: f64,
    pub files: Vec<LedgerFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerFile {
    pub path: String,
    pub size: u64,
    pub blake3: String,
    /// When a replication published this exact content in the other site.
    #[serde(default)]
    pub replicated_at: Option<f64>,
}

impl LedgerRun {
    pub fn new(run_id: i64, started_at: f64, artifacts: &[Artifact]) -> LedgerRun {
        LedgerRun {
            run_id,
            started_at,
            files: artifacts
                .iter()
                .map(|a| LedgerFile {
                    path: a.path.clone(),
                    size: a.size,
                    blake3: a.blake3.clone(),
                    replicated_at: None,
                })
                .collect(),
        }
    }

    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    pub fn replicated(&self) -> bool {
        self.files.iter().all(|f| f.replicated_at.is_some())
    }
}

fn ledger_path(dir: &Path, command: &str) -> PathBuf {
    dir.join(format!("{command}.json"))
}

impl Ledger {
    /// The ledger of `command` in `dir`; empty when there is none yet.
    pub fn load(dir: &Path, command: &str) -> Result<Ledger, String> {
        let path = ledger_path(dir, command);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|e| format!("backup ledger {} is corrupt: {e}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger::default()),
            Err(e) => Err(format!("cannot read backup ledger {}: {e}", path.display())),
        }
    }

    /// Written atomically (temp file, fsync, rename).
    pub fn save(&self, dir: &Path, command: &str) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| e.to_string())?;
        crate::spool::write_atomically(dir, &format!("{command}.json"), &bytes).map_err(|e| {
            format!(
                "cannot write backup ledger {}: {e}",
                ledger_path(dir, command).display()
            )
        })
    }

    /// Marks the files whose path and checksum match as present in the
    /// other site. Returns how many changed.
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn mark_replicated(&mut self, path: &str, blake3: &str, at: f64) -> usize {
        let mut changed = 0;
        for file in self.runs.iter_mut().flat_map(|r| r.files.iter_mut()) {
            if file.path == path && file.blake3 == blake3 && file.replicated_at.is_none() {
                file.replicated_at = Some(at);
                changed += 1;
            }
        }
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_a_reload_and_marks_only_matching_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Ledger::load(dir.path(), "pg").expect("empty"), Ledger::default());
        let artifact = Artifact {
            path: "db.dump".into(),
            size: 3,
            blake3: "aa".into(),
        };
        let mut ledger = Ledger {
            runs: vec![LedgerRun::new(1, 10.0, &[artifact])],
        };
        assert_eq!(ledger.mark_replicated("db.dump", "bb", 20.0), 0, "other content");
        assert!(!ledger.runs[0].replicated());
        assert_eq!(ledger.mark_replicated("db.dump", "aa", 20.0), 1);
        ledger.save(dir.path(), "pg").expect("save");
        let again = Ledger::load(dir.path(), "pg").expect("load");
        assert!(again.runs[0].replicated());
        std::fs::write(dir.path().join("pg.json"), b"{oops").expect("corrupt");
        assert!(Ledger::load(dir.path(), "pg").unwrap_err().contains("corrupt"));
    }
}
