//! Which mounts are real filesystems worth reporting.
//!
//! The lists follow node_exporter's defaults so that operators who know its
//! dashboards see the same set of filesystems.

const PSEUDO_FSTYPES: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "debugfs",
    "devpts",
    "devtmpfs",
    "erofs",
    "fuse.lxcfs",
    "fusectl",
    "hugetlbfs",
    "iso9660",
    "mqueue",
    "nsfs",
    "overlay",
    "proc",
    "procfs",
    "pstore",
    "ramfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "squashfs",
    "sysfs",
    "tracefs",
];

const IGNORED_MOUNT_PREFIXES: &[&str] = &[
    "/dev",
    "/proc",
    "/sys",
    "/run/credentials/",
    "/var/lib/docker/",
    "/var/lib/containers/storage/",
];

/// True for filesystems that hold no data an operator cares about.
pub fn is_pseudo_fstype(fstype: &str) -> bool {
    PSEUDO_FSTYPES.contains(&fstype)
}

/// True for mountpoints under kernel or container trees.
pub fn is_ignored_mountpoint(mountpoint: &str) -> bool {
    IGNORED_MOUNT_PREFIXES.iter().any(|prefix| {
        if let Some(dir) = prefix.strip_suffix('/') {
            mountpoint.starts_with(prefix) && mountpoint.len() > dir.len() + 1
        } else {
            mountpoint == *prefix || mountpoint.starts_with(&format!("{prefix}/"))
        }
    })
}

/// Block devices whose I/O counters are reported: whole disks, not
/// partitions, loop or ram devices (node_exporter's default).
pub fn is_reported_block_device(name: &str) -> bool {
    let strip_digits = |s: &str| s.trim_end_matches(|c: char| c.is_ascii_digit()).to_string();
    if name.starts_with("loop") || name.starts_with("ram") || name.starts_with("zram") || name.starts_with("fd") {
        return false;
    }
    // sda1, vdb2, xvda1: a letter disk name followed by a partition number.
    for prefix in ["sd", "vd", "hd", "xvd"] {
        if let Some(rest) = name.strip_prefix(prefix) {
            let base = strip_digits(rest);
            return base.len() == rest.len();
        }
    }
    // nvme0n1p2, mmcblk0p1: partitions carry a 'p' and a number.
    if name.starts_with("nvme") || name.starts_with("mmcblk") {
        let base = strip_digits(name);
        return !base.ends_with('p');
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_filesystems_are_skipped() {
        for fs in ["proc", "sysfs", "cgroup2", "overlay", "tmpfs_not"] {
            assert_eq!(is_pseudo_fstype(fs), fs != "tmpfs_not", "{fs}");
        }
        assert!(!is_pseudo_fstype("ext4"));
        assert!(!is_pseudo_fstype("nfs4"));
        assert!(!is_pseudo_fstype("tmpfs"));
    }

    #[test]
    fn kernel_and_container_mounts_are_skipped() {
        assert!(is_ignored_mountpoint("/proc"));
        assert!(is_ignored_mountpoint("/sys/fs/cgroup"));
        assert!(is_ignored_mountpoint("/dev/shm"));
        assert!(is_ignored_mountpoint("/var/lib/docker/overlay2/abc"));
        assert!(!is_ignored_mountpoint("/"));
        assert!(!is_ignored_mountpoint("/devices"));
        assert!(!is_ignored_mountpoint("/srv/backup"));
        assert!(!is_ignored_mountpoint("/var/lib/docker"));
    }

    #[test]
    fn whole_disks_only() {
        for (dev, want) in [
            ("sda", true),
            ("sda1", false),
            ("vda", true),
            ("vdb3", false),
            ("nvme0n1", true),
            ("nvme0n1p2", false),
            ("mmcblk0", true),
            ("mmcblk0p1", false),
            ("loop3", false),
            ("dm-0", true),
            ("md0", true),
        ] {
            assert_eq!(is_reported_block_device(dev), want, "{dev}");
        }
    }
}
