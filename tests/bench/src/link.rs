//! The link between source and destination: two network namespaces the
//! suite creates, joined by a veth pair, shaped with `tc tbf` each way, and
//! the veth's byte counters for what crossed it.
//!
//! Addresses come from 198.18.0.0/15, the range reserved for network
//! benchmarks, and never leave the two namespaces. [`TestLink::create`]
//! first removes what a killed earlier run left (its namespaces, and the
//! processes still in them); dropping the link removes it.

use std::process::Command;

use freehint_demo::NetnsPair;
use serde_json::Value;

use crate::record::Link;

/// The source's namespace.
pub const SRC_NS: &str = "fhbench-src";
/// The destination's namespace.
pub const DST_NS: &str = "fhbench-dst";
/// The source's end of the veth pair.
pub const SRC_IF: &str = "fhb0";
/// The destination's end.
pub const DST_IF: &str = "fhb1";
/// The source's address.
pub const SRC_IP: &str = "198.18.0.1";
/// The destination's address.
pub const DST_IP: &str = "198.18.0.2";

/// Errors setting up or reading the link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// A command could not run or failed.
    #[error("`{command}` failed: {detail} (the suite needs root, iproute2 and tc)")]
    Command {
        /// The command line.
        command: String,
        /// Its error output or the OS error.
        detail: String,
    },
    /// `ip -j -s link` gave something unexpected.
    #[error("unreadable counters of {interface}: {detail}")]
    Counters {
        /// The interface.
        interface: String,
        /// What was wrong.
        detail: String,
    },
}

fn run(args: &[&str]) -> Result<String, LinkError> {
    let command = args.join(" ");
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| LinkError::Command {
            command: command.clone(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LinkError::Command {
            command,
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bytes an interface has sent and received.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Transmitted bytes.
    pub tx_bytes: u64,
    /// Received bytes.
    pub rx_bytes: u64,
}

/// The two namespaces and their veth pair; removed when dropped.
pub struct TestLink {
    shaped: Option<Link>,
}

impl TestLink {
    /// Removes the leftovers of an earlier run, then creates the
    /// namespaces and the veth pair (1500-byte MTU, unshaped).
    pub fn create() -> Result<TestLink, LinkError> {
        remove_leftovers();
        for ns in [SRC_NS, DST_NS] {
            run(&["ip", "netns", "add", ns])?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        }
        let link = TestLink { shaped: None };
        run(&[
            "ip", "link", "add", SRC_IF, "netns", SRC_NS, "type", "veth", "peer", "name", DST_IF,
            "netns", DST_NS,
        ])?;
        for (ns, interface, ip) in [(SRC_NS, SRC_IF, SRC_IP), (DST_NS, DST_IF, DST_IP)] {
            run(&[
                "ip",
                "-n",
                ns,
                "addr",
                "add",
                &format!("{ip}/30"),
                "dev",
                interface,
            ])?;
            run(&["ip", "-n", ns, "link", "set", interface, "up"])?;
        }
        Ok(link)
    }

    /// Shapes both directions to `link` (`tbf`; a burst of 10 ms at the
    /// rate), or removes the shaping for [`Link::Unlimited`].
    pub fn shape(&mut self, link: Link) -> Result<(), LinkError> {
        for (ns, interface) in [(SRC_NS, SRC_IF), (DST_NS, DST_IF)] {
            // Removing a qdisc that is not there fails; that is fine.
            let _ = run(&["tc", "-n", ns, "qdisc", "del", "dev", interface, "root"]);
            if let Some(rate) = link.rate_bits_per_s() {
                let burst_bytes = (rate / 8 / 100).max(64 << 10);
                run(&[
                    "tc",
                    "-n",
                    ns,
                    "qdisc",
                    "add",
                    "dev",
                    interface,
                    "root",
                    "tbf",
                    "rate",
                    &format!("{rate}bit"),
                    "burst",
                    &burst_bytes.to_string(),
                    "latency",
                    "50ms",
                ])?;
            }
        }
        self.shaped = Some(link);
        Ok(())
    }

    /// The namespaces, for the testbed.
    pub fn netns(&self) -> NetnsPair {
        NetnsPair {
            src_ns: SRC_NS.into(),
            dst_ns: DST_NS.into(),
            dst_ip: DST_IP.into(),
        }
    }

    /// The source end's counters (its tx is what went to the destination).
    pub fn counters(&self) -> Result<Counters, LinkError> {
        let out = run(&[
            "ip", "-n", SRC_NS, "-j", "-s", "link", "show", "dev", SRC_IF,
        ])?;
        parse_counters(SRC_IF, &out)
    }
}

impl Drop for TestLink {
    fn drop(&mut self) {
        remove_leftovers();
    }
}

/// Kills what still runs in the suite's namespaces and deletes them.
pub fn remove_leftovers() {
    for ns in [SRC_NS, DST_NS] {
        if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill() has no memory effects; these are processes
                // in the suite's own namespace, left by an earlier run.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = run(&["ip", "netns", "del", ns]);
    }
}

/// The counters in `ip -j -s link show` output.
pub fn parse_counters(interface: &str, json: &str) -> Result<Counters, LinkError> {
    let bad = |detail: String| LinkError::Counters {
        interface: interface.into(),
        detail,
    };
    let v: Value = serde_json::from_str(json).map_err(|e| bad(e.to_string()))?;
    let stats = &v[0]["stats64"];
    match (stats["tx"]["bytes"].as_u64(), stats["rx"]["bytes"].as_u64()) {
        (Some(tx_bytes), Some(rx_bytes)) => Ok(Counters { tx_bytes, rx_bytes }),
        _ => Err(bad(format!("no stats64 tx/rx bytes in {json:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_read_from_ip_json() {
        let json = r#"[{"ifname":"fhb0","stats64":{"rx":{"bytes":120,"packets":2},"tx":{"bytes":9000,"packets":7}}}]"#;
        assert_eq!(
            parse_counters("fhb0", json).unwrap(),
            Counters {
                tx_bytes: 9000,
                rx_bytes: 120
            }
        );
        let err = parse_counters("fhb0", "[{}]").unwrap_err().to_string();
        assert!(err.contains("fhb0"), "{err}");
    }
}
