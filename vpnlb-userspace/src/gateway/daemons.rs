//! The VPN daemons running in this network namespace, from /proc: which one it is and its command
//! line, so `vpnlb gateway-check` can say what each needs to reply from the VIP (see the DSR notes
//! in docs/gateways.md) even when no active probe can reach it.

use std::path::Path;

/// A known VPN daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    WireguardGo,
    Boringtun,
    Charon,
    Openvpn,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::WireguardGo => "wireguard-go",
            Kind::Boringtun => "boringtun",
            Kind::Charon => "strongSwan charon",
            Kind::Openvpn => "openvpn",
        }
    }

    /// From a process's `comm` (at most 15 characters).
    fn from_comm(comm: &str) -> Option<Kind> {
        match comm {
            "wireguard-go" => Some(Kind::WireguardGo),
            c if c.starts_with("boringtun") => Some(Kind::Boringtun),
            "charon" | "charon-systemd" => Some(Kind::Charon),
            "openvpn" => Some(Kind::Openvpn),
            _ => None,
        }
    }
}

/// One running daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Daemon {
    pub kind: Kind,
    pub pid: u32,
    pub args: Vec<String>,
}

impl Daemon {
    /// The value of `--flag VALUE` on the command line.
    pub fn arg(&self, flag: &str) -> Option<&str> {
        let i = self.args.iter().position(|a| a == flag)?;
        self.args.get(i + 1).map(String::as_str)
    }

    pub fn has(&self, flag: &str) -> bool {
        self.args.iter().any(|a| a == flag)
    }
}

fn netns_of(pid: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()
}

/// Known daemons whose network namespace is ours.
pub fn running() -> Vec<Daemon> {
    let ours = netns_of("self");
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut v: Vec<Daemon> = entries
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().into_owned();
            let n: u32 = pid.parse().ok()?;
            let comm = std::fs::read_to_string(Path::new("/proc").join(&pid).join("comm")).ok()?;
            let kind = Kind::from_comm(comm.trim())?;
            if netns_of(&pid) != ours {
                return None;
            }
            let raw = std::fs::read(Path::new("/proc").join(&pid).join("cmdline")).ok()?;
            let args = raw
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            Some(Daemon { kind, pid: n, args })
        })
        .collect();
    v.sort_by_key(|d| d.pid);
    v
}

/// OpenVPN options that make it reply from the address it was reached at: `--multihome`, or
/// `--local VIP`, on the command line or in its `--config` file.
pub fn openvpn_replies_from(d: &Daemon, vip: &str) -> bool {
    if d.has("--multihome") || d.arg("--local") == Some(vip) {
        return true;
    }
    let Some(conf) = d.arg("--config") else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(conf) else {
        return false;
    };
    text.lines().any(|l| {
        let w: Vec<&str> = l.split_whitespace().collect();
        matches!(w.as_slice(), ["multihome", ..])
            || matches!(w.as_slice(), ["local", a, ..] if *a == vip)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(args: &[&str]) -> Daemon {
        Daemon {
            kind: Kind::Openvpn,
            pid: 1,
            args: args.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn openvpn_multihome_or_local_vip() {
        let vip = "10.77.0.100";
        assert!(openvpn_replies_from(&d(&["openvpn", "--multihome"]), vip));
        assert!(openvpn_replies_from(&d(&["openvpn", "--local", vip]), vip));
        assert!(!openvpn_replies_from(
            &d(&["openvpn", "--local", "10.0.0.1"]),
            vip
        ));
        assert!(!openvpn_replies_from(
            &d(&["openvpn", "--port", "1194"]),
            vip
        ));
        let f = std::env::temp_dir().join(format!("vpnlb-ovpn-{}.conf", std::process::id()));
        std::fs::write(&f, "dev tun\n# multihome\nmultihome\n").unwrap();
        let p = f.to_string_lossy().into_owned();
        assert!(openvpn_replies_from(&d(&["openvpn", "--config", &p]), vip));
        std::fs::write(&f, "dev tun\n# multihome\n").unwrap();
        assert!(!openvpn_replies_from(&d(&["openvpn", "--config", &p]), vip));
        let _ = std::fs::remove_file(&f);
    }

    #[test]
    fn kinds_by_comm() {
        assert_eq!(Kind::from_comm("boringtun-cli"), Some(Kind::Boringtun));
        assert_eq!(Kind::from_comm("charon"), Some(Kind::Charon));
        assert_eq!(Kind::from_comm("sshd"), None);
    }
}
