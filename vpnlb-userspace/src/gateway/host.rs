//! What a gateway host looks like from inside its network namespace: interfaces and addresses
//! (`ip -j`, as the agent's neighbour watcher reads neighbours), IPv4 sysctls (/proc/sys/net
//! follows the reader's namespace), routes and policy rules.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{Context, bail};
use serde_json::Value;

/// Runs `ip -j ARGS` and parses its JSON (an empty output is an empty list).
pub fn ip_json(args: &[&str]) -> anyhow::Result<Value> {
    let out = Command::new("ip")
        .arg("-j")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Ok(Value::Array(Vec::new()));
    }
    serde_json::from_str(&text).with_context(|| format!("parsing `ip -j {}`", args.join(" ")))
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One interface with its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Iface {
    pub name: String,
    /// `link_type` (`ether`, `loopback`, `none` for tun, ...).
    pub link_type: String,
    /// `linkinfo.info_kind` (`dummy`, `veth`, `wireguard`, ...), empty for plain devices.
    pub kind: String,
    pub up: bool,
    pub addrs: Vec<IpAddr>,
}

/// Every interface of this namespace (`ip -d -j addr show`).
pub fn interfaces() -> anyhow::Result<Vec<Iface>> {
    let v = ip_json(&["-d", "addr", "show"])?;
    let list = v.as_array().cloned().unwrap_or_default();
    Ok(list
        .iter()
        .map(|l| Iface {
            name: l["ifname"].as_str().unwrap_or("").to_string(),
            link_type: l["link_type"].as_str().unwrap_or("").to_string(),
            kind: l["linkinfo"]["info_kind"]
                .as_str()
                .unwrap_or("")
                .to_string(),
            up: l["flags"]
                .as_array()
                .is_some_and(|f| f.iter().any(|x| x == "UP")),
            addrs: l["addr_info"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x["local"].as_str()?.parse().ok())
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect())
}

/// The name of the XDP program on `ifname` (None: none attached).
pub fn xdp_prog(ifname: &str) -> anyhow::Result<Option<String>> {
    let v = ip_json(&["-d", "link", "show", "dev", ifname])?;
    let xdp = &v[0]["xdp"];
    let prog = if xdp["prog"].is_object() {
        &xdp["prog"]
    } else {
        &xdp["attached"][0]["prog"]
    };
    Ok(prog["name"].as_str().map(str::to_string))
}

/// `net.ipv4.conf.<scope>.<key>` (None when the interface or key does not exist).
pub fn conf(scope: &str, key: &str) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{scope}/{key}"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// The preferred source of the route this host would use towards `dst` (None: no route).
pub fn route_src(dst: IpAddr) -> Option<IpAddr> {
    let v = ip_json(&["route", "get", &dst.to_string()]).ok()?;
    v[0]["prefsrc"].as_str()?.parse().ok()
}

/// Policy rules (`ip -j rule show`).
pub fn rules() -> anyhow::Result<Vec<Value>> {
    Ok(ip_json(&["rule", "show"])?
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// Routes of `table` (`ip -j route show table T`).
pub fn routes(table: &str) -> anyhow::Result<Vec<Value>> {
    Ok(ip_json(&["route", "show", "table", table])?
        .as_array()
        .cloned()
        .unwrap_or_default())
}
