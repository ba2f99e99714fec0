//! Output helpers shared by the CLI commands: plain aligned tables and the names of map values
//! (states, protocols, forwarding modes, addresses).

use std::net::IpAddr;

use vpnlb_common::{
    BACKEND_DOWN, BACKEND_DRAINING, BACKEND_UNUSED, BACKEND_UP, FAMILY_V4, FAMILY_V6, FWD_MODE_GUE,
    FWD_MODE_IPIP, FWD_MODE_L2DSR, PROTO_ESP, PROTO_TCP, PROTO_UDP, words_addr,
};

/// A plain text table: a header row and left-aligned columns separated by two spaces.
#[derive(Debug, Default)]
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let n = self.header.len();
        let mut width = vec![0usize; n];
        for r in std::iter::once(&self.header).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                if i + 1 == n {
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    let pad = width[i] - c.chars().count() + 2;
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

pub fn state_name(state: u32) -> &'static str {
    match state {
        BACKEND_UNUSED => "unused",
        BACKEND_UP => "up",
        BACKEND_DRAINING => "draining",
        BACKEND_DOWN => "down",
        _ => "invalid",
    }
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_UDP => "udp".into(),
        PROTO_TCP => "tcp".into(),
        PROTO_ESP => "esp".into(),
        p => format!("proto{p}"),
    }
}

pub fn fwd_name(mode: u32) -> String {
    match mode {
        FWD_MODE_L2DSR => "l2dsr".into(),
        FWD_MODE_IPIP => "ipip".into(),
        FWD_MODE_GUE => "gue".into(),
        m => format!("mode{m}"),
    }
}

/// The address held in wire-order words, or None for an unknown family.
pub fn addr(words: [u32; 4], family: u8) -> Option<IpAddr> {
    (family == FAMILY_V4 || family == FAMILY_V6).then(|| words_addr(words, family))
}

pub fn addr_str(words: [u32; 4], family: u8) -> String {
    addr(words, family)
        .map(|a| a.to_string())
        .unwrap_or_else(|| format!("family{family}"))
}

/// `203.0.113.10:51820`, `[2001:db8::1]:500`.
pub fn sockaddr(ip: &str, port: u16, v6: bool) -> String {
    if v6 {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

pub fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// 1234567 -> "1.23M" style for tables.
pub fn human(n: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1_000_000_000, "G"), (1_000_000, "M"), (1_000, "k")];
    for (div, u) in UNITS {
        if n >= div * 10 {
            return format!("{:.1}{u}", n as f64 / div as f64);
        }
    }
    n.to_string()
}

/// CLOCK_MONOTONIC_COARSE in ns: the clock `bpf_ktime_get_coarse_ns` reads (session ages).
pub fn now_coarse_ns() -> u64 {
    // SAFETY: clock_gettime writes into the timespec we pass.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Percent with one decimal.
pub fn pct(x: f64) -> String {
    format!("{:.1}%", x * 100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["xyz".into(), "1".into()]);
        assert_eq!(t.render(), "A    LONGER\nxyz  1\n");
        assert_eq!(human(999), "999");
        assert_eq!(human(12_345), "12.3k");
    }
}
