//! Block device I/O counters from /proc/diskstats, the same source and the
//! same device filter as node_exporter.

use dicops_core::filesystems::is_reported_block_device;
use dicops_proto::DiskIo;

/// /proc/diskstats counts in 512-byte sectors whatever the device's own
/// sector size.
const SECTOR_BYTES: u64 = 512;

pub fn read() -> Vec<DiskIo> {
    match std::fs::read_to_string("/proc/diskstats") {
        Ok(text) => parse(&text),
        Err(_) => Vec::new(),
    }
}

pub fn parse(text: &str) -> Vec<DiskIo> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 14 {
                return None;
            }
            let name = fields[2];
            if !is_reported_block_device(name) {
                return None;
            }
            let n = |i: usize| fields[i].parse::<u64>().unwrap_or(0);
            Some(DiskIo {
                device: name.to_string(),
                reads_completed_total: n(3),
                read_bytes_total: n(5).saturating_mul(SECTOR_BYTES),
                writes_completed_total: n(7),
                written_bytes_total: n(9).saturating_mul(SECTOR_BYTES),
                io_time_seconds_total: n(12) as f64 / 1000.0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_whole_disks_and_skips_partitions() {
        let text = "\
 254       0 vda 75020 2203 6513254 30620 349431 276418 18029186 453012 0 263956 488664 0 0 0 0 2839 5030
 254       1 vda1 74805 2203 6505862 30582 349431 276418 18029186 453012 0 263920 483594 0 0 0 0 0 0
   7       0 loop0 5 0 10 0 0 0 0 0 0 4 0 0 0 0 0 0 0
 garbage line
";
        let disks = parse(text);
        assert_eq!(disks.len(), 1);
        let vda = &disks[0];
        assert_eq!(vda.device, "vda");
        assert_eq!(vda.reads_completed_total, 75020);
        assert_eq!(vda.read_bytes_total, 6513254 * 512);
        assert_eq!(vda.writes_completed_total, 349431);
        assert_eq!(vda.written_bytes_total, 18029186 * 512);
        assert_eq!(vda.io_time_seconds_total, 263.956);
    }
}
