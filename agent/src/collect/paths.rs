//! statvfs of the paths named in the agent's config, each on a thread of
//! its own with a timeout. sysinfo skips NFS and CIFS mounts (statvfs on a
//! hard-mounted, unreachable server blocks forever), yet backups often land
//! there, so we measure them ourselves and report a hung mount as `hung`.
//! A probe that never returns keeps its thread; the next collection sees it
//! still in flight and reports `hung` again without starting another.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dicops_proto::{PathState, PathUsage};

struct Slot {
    path: PathBuf,
    in_flight: Arc<AtomicBool>,
}

type Probe = fn(&std::path::Path) -> ProbeResult;
type ProbeResult = Result<(u64, u64), String>;

pub struct PathProber {
    slots: Vec<Slot>,
    timeout: Duration,
    probe: Probe,
}

/// (size, available) in bytes.
pub(crate) fn statvfs(path: &std::path::Path) -> ProbeResult {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| "path contains a NUL byte".to_string())?;
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c_path is a valid NUL-terminated string and stat is a valid,
    // writable statvfs struct that outlives the call.
    let rc = unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let fragment = stat.f_frsize as u64;
    Ok((
        (stat.f_blocks as u64).saturating_mul(fragment),
        (stat.f_bavail as u64).saturating_mul(fragment),
    ))
}

impl PathProber {
    pub fn new(paths: Vec<PathBuf>, timeout: Duration) -> PathProber {
        Self::with_probe(paths, timeout, statvfs)
    }

    fn with_probe(paths: Vec<PathBuf>, timeout: Duration, probe: Probe) -> PathProber {
        PathProber {
            probe,
            slots: paths
                .into_iter()
                .map(|path| Slot {
                    path,
                    in_flight: Arc::new(AtomicBool::new(false)),
                })
                .collect(),
            timeout,
        }
    }

    /// Probes every path in parallel; returns within about `timeout`.
    pub fn probe(&self) -> Vec<PathUsage> {
        let deadline = Instant::now() + self.timeout;
        let pending: Vec<(&Slot, Option<mpsc::Receiver<ProbeResult>>)> = self
            .slots
            .iter()
            .map(|slot| {
                if slot.in_flight.swap(true, Ordering::AcqRel) {
                    return (slot, None);
                }
                let (tx, rx) = mpsc::channel();
                let path = slot.path.clone();
                let in_flight = slot.in_flight.clone();
                let probe = self.probe;
                let spawned = std::thread::Builder::new().name("statvfs".into()).spawn(move || {
                    let result = probe(&path);
                    in_flight.store(false, Ordering::Release);
                    let _ = tx.send(result);
                });
                match spawned {
                    Ok(_) => (slot, Some(rx)),
                    Err(_) => {
                        slot.in_flight.store(false, Ordering::Release);
                        (slot, None)
                    }
                }
            })
            .collect();
        pending
            .into_iter()
            .map(|(slot, rx)| {
                let path = slot.path.to_string_lossy().into_owned();
                let hung = |detail: &str| PathUsage {
                    path: path.clone(),
                    state: PathState::Hung,
                    size_bytes: 0,
                    avail_bytes: 0,
                    error: Some(detail.to_string()),
                };
                let Some(rx) = rx else {
                    return hung("an earlier statvfs of this path has not returned yet");
                };
                let wait = deadline.saturating_duration_since(Instant::now());
                match rx.recv_timeout(wait) {
                    Ok(Ok((size, avail))) => PathUsage {
                        path,
                        state: PathState::Ok,
                        size_bytes: size,
                        avail_bytes: avail,
                        error: None,
                    },
                    Ok(Err(e)) => PathUsage {
                        path,
                        state: PathState::Error,
                        size_bytes: 0,
                        avail_bytes: 0,
                        error: Some(e),
                    },
                    Err(_) => hung(&format!(
                        "statvfs did not return within {} ms",
                        self.timeout.as_millis()
                    )),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn measures_existing_and_reports_missing_paths() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prober = PathProber::new(
            vec![dir.path().to_path_buf(), dir.path().join("missing")],
            Duration::from_secs(5),
        );
        let usage = prober.probe();
        assert_eq!(usage[0].state, PathState::Ok);
        assert!(usage[0].size_bytes > 0);
        assert!(usage[0].avail_bytes <= usage[0].size_bytes);
        assert_eq!(usage[1].state, PathState::Error);
        assert!(usage[1].error.as_deref().unwrap_or("").contains("No such file"));
    }

    #[test]
    fn a_hung_probe_times_out_and_blocks_no_one() {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        // The first call hangs like a dead NFS server; later ones answer.
        fn hangs(_: &std::path::Path) -> Result<(u64, u64), String> {
            if CALLS.fetch_add(1, Ordering::SeqCst) == 0 {
                std::thread::sleep(Duration::from_millis(1200));
            }
            Ok((100, 40))
        }
        let prober = PathProber::with_probe(vec![PathBuf::from("/nfs/backup")], Duration::from_millis(200), hangs);
        let started = Instant::now();
        let usage = prober.probe();
        assert!(started.elapsed() < Duration::from_millis(1000));
        assert_eq!(usage[0].state, PathState::Hung);
        assert!(usage[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("did not return within 200 ms"));
        // Still stuck: reported hung again, no second thread piles up.
        let again = prober.probe();
        assert_eq!(again[0].state, PathState::Hung);
        assert!(again[0].error.as_deref().unwrap_or("").contains("has not returned yet"));
        // Once the kernel answers, the path is measured again.
        std::thread::sleep(Duration::from_millis(1500));
        let recovered = prober.probe();
        assert_eq!(recovered[0].state, PathState::Ok);
        assert_eq!((recovered[0].size_bytes, recovered[0].avail_bytes), (100, 40));
        assert_eq!(CALLS.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_probe_still_in_flight_is_reported_hung_without_a_new_thread() {
        let prober = PathProber::new(vec![PathBuf::from("/")], Duration::from_millis(100));
        // Pretend the previous probe is stuck in the kernel.
        prober.slots[0].in_flight.store(true, Ordering::Release);
        let usage = prober.probe();
        assert_eq!(usage[0].state, PathState::Hung);
        assert!(prober.slots[0].in_flight.load(Ordering::Acquire));
    }
}
