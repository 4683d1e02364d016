//! Two sites on one machine: network namespaces dc1 and dc2 joined by a
//! veth pair (the inter-site link) shaped with `tc qdisc tbf`, every
//! process with its own address, and a management link from the test's own
//! namespace to dc2, where this test reaches the controller from (as an
//! operator or Prometheus would).
//!
//! Needs root (CAP_NET_ADMIN) and iproute2. Without them the tests that use
//! it fail and say why; they do not pass silently.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use super::{Deployment, Pki};

/// Every process and its address on the inter-site network 10.201.0.0/24.
pub const ADDRESSES: [(&str, &str, &str); 5] = [
    ("controller", "dc2", "10.201.0.2"),
    ("db01", "dc1", "10.201.0.11"),
    ("app01", "dc1", "10.201.0.12"),
    ("backup01", "dc2", "10.201.0.21"),
    ("app02", "dc2", "10.201.0.22"),
];

pub fn address(process: &str) -> &'static str {
    ADDRESSES
        .iter()
        .find(|(p, _, _)| *p == process)
        .map(|(_, _, a)| *a)
        .unwrap_or_else(|| panic!("{process} has no address in the two-site network"))
}

/// The namespaces and links of one test; removed on drop.
pub struct TwoSites {
    /// Namespace names of dc1 and dc2.
    pub dc1: String,
    pub dc2: String,
    /// The inter-site link's end in dc1 (taken down for a partition).
    link_dc1: String,
    link_dc2: String,
    /// The controller's address on the management link, reached from here.
    pub controller_mgmt: String,
    /// The management link's subnet (a /30).
    mgmt_subnet: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl TwoSites {
    /// Builds the two sites with the inter-site link shaped to `rate`
    /// (tc's syntax: `100mbit`).
    pub fn new(rate: &str) -> TwoSites {
        Self::try_new(rate).unwrap_or_else(|e| {
            panic!(
                "cannot build the two-site network ({e}). These tests need root \
                 (CAP_NET_ADMIN) and iproute2 to create network namespaces; run them \
                 as root (CI does), or leave them out with `cargo test -- --skip two_sites`"
            )
        })
    }

    fn try_new(rate: &str) -> Result<TwoSites, String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        // Unique across the tests of this run and other runs on the machine:
        // interface names are global to a namespace and at most 15 bytes.
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = (std::process::id() % 100_000) * 8 + n % 8;
        let net = TwoSites {
            dc1: format!("dicops-{id}-dc1"),
            dc2: format!("dicops-{id}-dc2"),
            link_dc1: format!("d{id}a"),
            link_dc2: format!("d{id}b"),
            controller_mgmt: String::new(),
            mgmt_subnet: String::new(),
        };
        run(&["ip", "netns", "add", &net.dc1])?;
        // From here on, drop removes what was made.
        let mut net = net;
        run(&["ip", "netns", "add", &net.dc2])?;
        run(&[
            "ip",
            "link",
            "add",
            &net.link_dc1,
            "type",
            "veth",
            "peer",
            "name",
            &net.link_dc2,
        ])?;
        run(&["ip", "link", "set", &net.link_dc1, "netns", &net.dc1])?;
        run(&["ip", "link", "set", &net.link_dc2, "netns", &net.dc2])?;
        for (_, site, addr) in ADDRESSES {
            let (ns, dev) = if site == "dc1" {
                (&net.dc1, &net.link_dc1)
            } else {
                (&net.dc2, &net.link_dc2)
            };
            run(&["ip", "-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
        }
        for (ns, dev) in [(&net.dc1, &net.link_dc1), (&net.dc2, &net.link_dc2)] {
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            run(&["ip", "-n", ns, "link", "set", dev, "up"])?;
            // Both directions shaped: a token bucket at the link's rate.
            run(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst",
                "256kb", "latency", "100ms",
            ])?;
        }
        // Management link: this namespace <-> dc2, a /30 of its own.
        let subnet = id % 16_000;
        let (a, b) = (subnet / 64, (subnet % 64) * 4);
        let host_addr = format!("10.202.{a}.{}", b + 1);
        net.controller_mgmt = format!("10.202.{a}.{}", b + 2);
        net.mgmt_subnet = format!("10.202.{a}.{b}/30");
        let (mgmt_host, mgmt_dc2) = (format!("d{id}m"), format!("d{id}n"));
        run(&[
            "ip", "link", "add", &mgmt_host, "type", "veth", "peer", "name", &mgmt_dc2,
        ])?;
        run(&["ip", "link", "set", &mgmt_dc2, "netns", &net.dc2])?;
        run(&["ip", "addr", "add", &format!("{host_addr}/30"), "dev", &mgmt_host])?;
        run(&[
            "ip",
            "-n",
            &net.dc2,
            "addr",
            "add",
            &format!("{}/30", net.controller_mgmt),
            "dev",
            &mgmt_dc2,
        ])?;
        run(&["ip", "link", "set", &mgmt_host, "up"])?;
        run(&["ip", "-n", &net.dc2, "link", "set", &mgmt_dc2, "up"])?;
        Ok(net)
    }

    /// Routes this namespace to every address of both sites through dc2
    /// (which forwards), as an intruder on the management network would
    /// reach them. The routes go with the namespaces.
    pub fn reach_sites_from_here(&self) {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.dc2,
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
        ])
        .expect("forwarding");
        run(&["ip", "route", "add", "10.201.0.0/24", "via", &self.controller_mgmt]).expect("route to the sites");
        run(&[
            "ip",
            "-n",
            &self.dc1,
            "route",
            "add",
            &self.mgmt_subnet,
            "via",
            address("controller"),
        ])
        .expect("route back from dc1");
    }

    /// Cuts the inter-site link (both directions), as a failed line would.
    pub fn partition(&self) {
        run(&["ip", "-n", &self.dc1, "link", "set", &self.link_dc1, "down"]).expect("link down");
    }

    pub fn heal(&self) {
        run(&["ip", "-n", &self.dc1, "link", "set", &self.link_dc1, "up"]).expect("link up");
    }

    /// Bytes sent by dc1 on the inter-site link so far.
    pub fn dc1_bytes_sent(&self) -> u64 {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.dc1, "cat"])
            .arg(format!("/sys/class/net/{}/statistics/tx_bytes", self.link_dc1))
            .output()
            .expect("read tx_bytes");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("tx_bytes")
    }

    /// A deployment whose processes run in these namespaces at their
    /// addresses, with certificates naming those addresses.
    pub fn deployment(&self, sites: &[(&str, &[&str])]) -> Deployment {
        let mut d = Deployment::new(sites);
        reissue(
            &d.pki,
            &["--controller"],
            &[address("controller"), &self.controller_mgmt],
        );
        d.namespaces.push(("controller".into(), self.dc2.clone()));
        for (site, agents) in sites {
            let ns = if *site == "dc1" { &self.dc1 } else { &self.dc2 };
            for agent in *agents {
                reissue(&d.pki, &["--agent", agent], &[address(agent)]);
                d.namespaces.push((agent.to_string(), ns.clone()));
            }
        }
        d.controller_listen = "0.0.0.0".into();
        d.controller_host = address("controller").into();
        d.operator_host = self.controller_mgmt.clone();
        d
    }
}

fn reissue(pki: &Pki, who: &[&str], sans: &[&str]) {
    let mut args = who.to_vec();
    for san in sans {
        args.extend(["--san", san]);
    }
    pki.issue(&args);
}

impl Drop for TwoSites {
    fn drop(&mut self) {
        // Deleting a namespace destroys its veth ends, and with them their
        // peers (the management link's end in this namespace too).
        let _ = run(&["ip", "netns", "del", &self.dc1]);
        let _ = run(&["ip", "netns", "del", &self.dc2]);
    }
}
