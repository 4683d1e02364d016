//! Host health collection. Runs on its own thread: sysinfo and statvfs
//! calls block, and a hung NFS mount must never stall the async runtime.

mod diskstats;
mod mountinfo;
mod paths;
mod services;

use std::time::Duration;

use dicops_config::CollectConfig;
use dicops_core::filesystems::{is_ignored_mountpoint, is_pseudo_fstype};
use dicops_proto::{AgentInfo, Filesystem, HostHealth, NetworkIo};
use sysinfo::{DiskRefreshKind, Disks, Networks, System};

pub(crate) use paths::statvfs;
pub use paths::PathProber;

/// Keeps the sysinfo handles for the life of the process, refreshing only
/// what a report needs.
pub struct Collector {
    system: Option<System>,
    disks: Option<Disks>,
    networks: Option<Networks>,
    paths: PathProber,
    services: Vec<String>,
    service_timeout: Duration,
    /// systemd units are asked at most this often (a process start each
    /// time); between two asks the last answer is reported.
    services_interval: Duration,
    last_services: Option<(std::time::Instant, Vec<dicops_proto::ServiceState>)>,
}

impl Collector {
    /// Takes the first CPU reading. It is only a baseline: usage is the
    /// difference between two readings, so it is never reported itself.
    pub fn new(config: &CollectConfig) -> Collector {
        let mut system = match System::new() {
            Ok(system) => Some(system),
            Err(e) => {
                tracing::error!(error = %e, "cannot read system information; CPU and memory will be reported as 0");
                None
            }
        };
        if let Some(system) = system.as_mut() {
            system.refresh_cpu_usage();
        }
        let disks = Disks::new_with_refreshed_list_specifics(storage_only())
            .map_err(|e| tracing::error!(error = %e, "cannot list filesystems; none will be reported"))
            .ok();
        let networks = Networks::new_with_refreshed_list()
            .map_err(|e| tracing::error!(error = %e, "cannot list network interfaces; none will be reported"))
            .ok();
        Collector {
            system,
            disks,
            networks,
            paths: PathProber::new(config.paths.clone(), config.path_timeout),
            services: config.services.clone(),
            service_timeout: Duration::from_secs(5),
            services_interval: config.services_interval,
            last_services: None,
        }
    }

    /// One collection. Blocking: call it from a thread of its own.
    pub fn collect(&mut self) -> HostHealth {
        let mut health = HostHealth::default();
        if let Some(system) = self.system.as_mut() {
            system.refresh_cpu_usage();
            system.refresh_memory();
            health.cpu_usage_ratio = f64::from(system.global_cpu_usage() / 100.0).clamp(0.0, 1.0);
            health.memory_total_bytes = system.total_memory();
            health.memory_available_bytes = system.available_memory();
            health.swap_total_bytes = system.total_swap();
            health.swap_free_bytes = system.free_swap();
        }
        if let Ok(load) = System::load_average() {
            health.load1 = load.one;
            health.load5 = load.five;
            health.load15 = load.fifteen;
        }
        health.uptime_seconds = System::uptime().unwrap_or(0);
        health.boot_time_seconds = System::boot_time().unwrap_or(0);

        // Re-list: filesystems get mounted and unmounted while we run.
        if let Some(disks) = self.disks.as_mut() {
            disks.refresh_specifics(true, storage_only());
        }
        // The mount flags sysinfo reads are the agent's own view: in a
        // systemd sandbox they say read-only for filesystems that are not.
        let mounts = mountinfo::read();
        health.filesystems = self
            .disks
            .iter()
            .flat_map(|disks| disks.iter())
            .filter_map(|disk| {
                let fstype = disk.file_system().to_string_lossy().into_owned();
                let mountpoint = disk.mount_point().to_string_lossy().into_owned();
                if is_pseudo_fstype(&fstype) || is_ignored_mountpoint(&mountpoint) {
                    return None;
                }
                if mountinfo::is_duplicate_view(&mounts, &mountpoint) {
                    return None;
                }
                let facts = mounts.get(&mountpoint);
                Some(Filesystem {
                    mountpoint,
                    device: disk.name().to_string_lossy().into_owned(),
                    fstype,
                    size_bytes: disk.total_space(),
                    avail_bytes: disk.available_space(),
                    read_only: facts.map_or(disk.is_read_only(), |f| f.filesystem_read_only),
                })
            })
            .collect();
        health.filesystems.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        health.filesystems.dedup_by(|a, b| a.mountpoint == b.mountpoint);

        if let Some(networks) = self.networks.as_mut() {
            networks.refresh(true);
        }
        health.networks = self
            .networks
            .iter()
            .flat_map(|networks| networks.iter())
            .filter(|(name, _)| name.as_os_str() != "lo")
            .map(|(name, data)| NetworkIo {
                device: name.to_string_lossy().into_owned(),
                receive_bytes_total: data.total_received(),
                transmit_bytes_total: data.total_transmitted(),
                receive_errors_total: data.total_errors_on_received(),
                transmit_errors_total: data.total_errors_on_transmitted(),
            })
            .collect();
        health.networks.sort_by(|a, b| a.device.cmp(&b.device));

        health.disks = diskstats::read();
        health.services = match &self.last_services {
            Some((at, states)) if at.elapsed() < self.services_interval => states.clone(),
            _ => {
                let states = services::query(&self.services, self.service_timeout);
                self.last_services = Some((std::time::Instant::now(), states.clone()));
                states
            }
        };
        health.paths = self.paths.probe();
        health
    }
}

fn storage_only() -> DiskRefreshKind {
    DiskRefreshKind::nothing().with_storage()
}

/// What the agent tells about itself.
pub fn agent_info() -> AgentInfo {
    AgentInfo {
        version: env!("CARGO_PKG_VERSION").to_string(),
        hostname: System::host_name().unwrap_or_default(),
        os: System::long_os_version().unwrap_or_default(),
        kernel: System::kernel_version().unwrap_or_default(),
    }
}
