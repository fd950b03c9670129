//! The link between source and destination: two network namespaces the
//! suite creates, joined by a veth pair, shaped with `tc` each way (a
//! rate, and a priority queue for DSCP-marked traffic), and
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

/// The `tc` commands that shape `interface` in namespace `ns` to
/// `rate_bits_per_s` (see [`TestLink::shape`]).
fn shaping_commands(ns: &str, interface: &str, rate_bits_per_s: u64) -> Vec<Vec<String>> {
    let burst_bytes = (rate_bits_per_s / 8 / 100).max(64 << 10);
    // 50 ms at the rate, plus the burst: what `tbf ... latency 50ms` holds.
    let queue_bytes = rate_bits_per_s / 8 / 20 + burst_bytes;
    let tc = |args: &str| -> Vec<String> {
        ["tc", "-n", ns]
            .into_iter()
            .map(str::to_string)
            .chain(args.split_whitespace().map(str::to_string))
            .collect()
    };
    vec![
        tc(&format!(
            "qdisc add dev {interface} root handle 1: tbf rate {rate_bits_per_s}bit \
             burst {burst_bytes} latency 50ms"
        )),
        tc(&format!(
            "qdisc add dev {interface} parent 1:1 handle 10: htb default 20"
        )),
        // Never the limit (the tbf is): rates far above any link here.
        tc(&format!(
            "class add dev {interface} parent 10: classid 10:10 htb rate 400gbit quantum 200000 prio 0"
        )),
        tc(&format!(
            "class add dev {interface} parent 10: classid 10:20 htb rate 400gbit quantum 200000 prio 1"
        )),
        tc(&format!(
            "qdisc add dev {interface} parent 10:10 bfifo limit {queue_bytes}"
        )),
        tc(&format!(
            "qdisc add dev {interface} parent 10:20 bfifo limit {queue_bytes}"
        )),
        // DSCP 46 in the upper six bits of the TOS byte (0xb8).
        tc(&format!(
            "filter add dev {interface} parent 10: protocol ip prio 1 u32 \
             match ip dsfield 0xb8 0xfc flowid 10:10"
        )),
    ]
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

    /// Shapes both directions to `link`, or removes the shaping for
    /// [`Link::Unlimited`].
    ///
    /// The rate is a `tbf` (a burst of 10 ms at the rate). What waits for
    /// it queues as on a network with a DiffServ priority queue: packets
    /// marked Expedited Forwarding (DSCP 46, what freehint marks its
    /// postcopy page requests and their answers with) in a first class,
    /// everything else in a second, each a byte FIFO as deep as `tbf`'s own
    /// (50 ms at the rate). An `htb` under the `tbf`, its classes never
    /// limiting, serves the first class ahead of the second: this host's
    /// kernel has `tbf`, `htb`, the FIFOs and the `u32` filter, not `prio`
    /// or `fq_codel`. Unmarked traffic (every other mode's, QEMU's included)
    /// sees one FIFO, as with a plain `tbf`.
    pub fn shape(&mut self, link: Link) -> Result<(), LinkError> {
        for (ns, interface) in [(SRC_NS, SRC_IF), (DST_NS, DST_IF)] {
            // Removing a qdisc that is not there fails; that is fine.
            let _ = run(&["tc", "-n", ns, "qdisc", "del", "dev", interface, "root"]);
            if let Some(rate) = link.rate_bits_per_s() {
                for command in shaping_commands(ns, interface, rate) {
                    let args: Vec<&str> = command.iter().map(String::as_str).collect();
                    run(&args)?;
                }
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
