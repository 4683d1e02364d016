//! What `/proc/self/mountinfo` says about each mount that `/proc/self/mounts`
//! (which sysinfo reads) does not: whether the filesystem itself is
//! read-only, and whether the mount shows a whole filesystem or a bind mount
//! of a folder inside one.
//!
//! Under systemd's `ProtectSystem=strict` every mount is remounted read-only
//! for the agent alone: the per-mount flag says `ro` while the filesystem
//! stays writable for everyone else, and the disk-full alerts (which skip
//! read-only filesystems) would never fire. The superblock options, the
//! field after the mount source, are the filesystem's own. The sandbox's
//! `ReadWritePaths=`, `PrivateTmp=` and state directories are bind mounts of
//! folders (their root field is not `/`): the filesystem holding them is
//! measured at its own mount point already.

use std::collections::HashMap;

/// One mount point's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountFacts {
    /// The filesystem (superblock) is mounted read-only.
    pub filesystem_read_only: bool,
    /// The mount shows a folder of a filesystem, not its root.
    pub bind_of_folder: bool,
    /// The filesystem's device number, `major:minor`.
    pub device: String,
}

/// A bind mount of a folder whose filesystem is also mounted whole, where
/// it is measured already (a sandbox's ReadWritePaths=, PrivateTmp=). A
/// folder whose filesystem is not mounted whole here (a container's
/// volume) is the only view of it and stays.
pub fn is_duplicate_view(mounts: &HashMap<String, MountFacts>, mountpoint: &str) -> bool {
    mounts.get(mountpoint).is_some_and(|facts| {
        facts.bind_of_folder
            && mounts
                .values()
                .any(|other| !other.bind_of_folder && other.device == facts.device)
    })
}

/// The facts of every mount point in `text` (the format of
/// /proc/self/mountinfo). A later mount on the same point wins, as it hides
/// the earlier one. Lines that do not parse are skipped.
pub fn parse(text: &str) -> HashMap<String, MountFacts> {
    let mut mounts = HashMap::new();
    for line in text.lines() {
        // id parent major:minor root mountpoint options [optional...] - fstype source superoptions
        let Some((before, after)) = line.split_once(" - ") else {
            continue;
        };
        let fields: Vec<&str> = before.split(' ').collect();
        let (Some(device), Some(root), Some(mountpoint)) = (fields.get(2), fields.get(3), fields.get(4)) else {
            continue;
        };
        let Some(super_options) = after.split(' ').nth(2) else {
            continue;
        };
        mounts.insert(
            unescape(mountpoint),
            MountFacts {
                filesystem_read_only: super_options.split(',').any(|o| o == "ro"),
                bind_of_folder: *root != "/",
                device: device.to_string(),
            },
        );
    }
    mounts
}

/// The kernel writes space, tab, newline and backslash in paths as octal
/// escapes (`\040`).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'\\' && i + 3 < bytes.len())
            .then(|| &bytes[i + 1..i + 4])
            .filter(|digits| digits.iter().all(|b| (b'0'..=b'7').contains(b)))
            // \400 and above are not a byte: kept as written.
            .and_then(|d| {
                u8::try_from(u32::from(d[0] - b'0') * 64 + u32::from(d[1] - b'0') * 8 + u32::from(d[2] - b'0')).ok()
            });
        if let Some(value) = escaped {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The agent's own view, or nothing when it cannot be read.
pub fn read() -> HashMap<String, MountFacts> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|text| parse(&text))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as a ProtectSystem=strict sandbox shows them: `/` remounted
    /// read-only for the service only (rw superblock), a ReadWritePaths=
    /// bind mount, a PrivateTmp= bind mount, and a filesystem that is
    /// read-only for real.
    const SANDBOX: &str = "\
24 1 254:0 / / ro,relatime shared:1 - ext4 /dev/vda rw,discard
25 24 254:0 /srv/dicops/replicas /srv/dicops/replicas rw,relatime shared:1 - ext4 /dev/vda rw,discard
26 24 254:0 /tmp/systemd-private-abc-dicops-agent.service-x/tmp /tmp rw,relatime - ext4 /dev/vda rw,discard
27 24 7:0 / /mnt/iso ro,relatime - iso9660 /dev/loop0 ro,nojoliet
28 24 254:1 / /srv/with\\040space rw - xfs /dev/vdb rw
";

    #[test]
    fn the_sandbox_s_read_only_remount_is_not_a_read_only_filesystem() {
        let mounts = parse(SANDBOX);
        assert!(!mounts["/"].filesystem_read_only);
        assert!(mounts["/mnt/iso"].filesystem_read_only);
        assert!(!mounts["/srv/with space"].bind_of_folder);
        assert_eq!(unescape("a\\777b\\134"), "a\\777b\\");
        // The sandbox's bind mounts repeat `/`, which is measured already.
        assert!(is_duplicate_view(&mounts, "/srv/dicops/replicas"));
        assert!(is_duplicate_view(&mounts, "/tmp"));
        assert!(!is_duplicate_view(&mounts, "/"));
        assert!(!is_duplicate_view(&mounts, "/mnt/iso"));
    }

    /// In a container, a volume is a folder of the host's filesystem, which
    /// is not mounted whole: it is the only view of that filesystem.
    #[test]
    fn a_container_volume_is_kept() {
        let text = "1 0 0:50 / / rw - overlay overlay rw\n2 1 254:0 /var/lib/docker/volumes/backups/_data /backups rw - ext4 /dev/vda rw\n";
        let mounts = parse(text);
        assert!(mounts["/backups"].bind_of_folder);
        assert!(!is_duplicate_view(&mounts, "/backups"));
    }

    #[test]
    fn a_later_mount_on_the_same_point_wins_and_garbage_is_skipped() {
        let text = "1 0 1:1 / /data rw - ext4 /dev/a rw\nnot a mountinfo line\n2 0 1:2 / /data rw - ext4 /dev/b ro\n";
        let mounts = parse(text);
        assert_eq!(mounts.len(), 1);
        assert!(mounts["/data"].filesystem_read_only);
    }
}
