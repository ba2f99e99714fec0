//! The environment of a backend's `exec` checks: which backend, its address and the VIPs it
//! serves, from the config the check starts under (a check keeps it until it is restarted, as on
//! a reload that changes the backend's checks).

use crate::config::{BackendConfig, Config};
use crate::health::CheckSpec;

/// `spec` ready to start for backend `b`: exec checks get their environment; others unchanged.
pub fn bind(spec: &CheckSpec, cfg: &Config, b: &BackendConfig) -> CheckSpec {
    match spec {
        CheckSpec::Exec { .. } => spec.with_env(env(cfg, b)),
        _ => spec.clone(),
    }
}

/// `VPNLB_BACKEND`, `VPNLB_BACKEND_ADDRESS`, the first VIP whose pools list the backend
/// (`VPNLB_VIP`, `VPNLB_VIP_NAME`, `VPNLB_VIP_PORT`, `VPNLB_VIP_PROTOCOL`; empty when none does) and
/// every such VIP as `name=protocol:address:port`, space-separated (`VPNLB_VIPS`).
pub fn env(cfg: &Config, b: &BackendConfig) -> Vec<(String, String)> {
    let vips: Vec<_> = cfg
        .vips
        .iter()
        .filter(|v| v.pools.iter().any(|p| p.backends.contains(&b.name)))
        .collect();
    let first = vips.first();
    let all: Vec<String> = vips
        .iter()
        .map(|v| {
            format!(
                "{}={}:{}:{}",
                v.name,
                v.protocol.as_str(),
                v.address,
                v.port.unwrap_or(0)
            )
        })
        .collect();
    let var = |k: &str, v: String| (k.to_string(), v);
    vec![
        var("VPNLB_BACKEND", b.name.clone()),
        var("VPNLB_BACKEND_ADDRESS", b.address.to_string()),
        var(
            "VPNLB_VIP",
            first.map(|v| v.address.to_string()).unwrap_or_default(),
        ),
        var(
            "VPNLB_VIP_NAME",
            first.map(|v| v.name.clone()).unwrap_or_default(),
        ),
        var(
            "VPNLB_VIP_PORT",
            first
                .and_then(|v| v.port)
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ),
        var(
            "VPNLB_VIP_PROTOCOL",
            first
                .map(|v| v.protocol.as_str().to_string())
                .unwrap_or_default(),
        ),
        var("VPNLB_VIPS", all.join(" ")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_backend_and_the_vips_that_list_it() {
        let cfg = crate::config::parse(
            r#"
[[interface]]
name = "eth0"
[[backend]]
name = "gw1"
address = "10.0.0.1"
[[backend.check]]
type = "exec"
command = ["/usr/local/lib/vpnlb/ipsec-inside", "10.96.0.1"]
[[backend]]
name = "gw2"
address = "10.0.0.2"
[[vip]]
name = "wg"
address = "203.0.113.10"
port = 51820
protocol = "udp"
[[vip.pool]]
name = "all"
backends = ["gw2"]
[[vip]]
name = "esp"
address = "203.0.113.20"
protocol = "esp"
[[vip.pool]]
name = "all"
backends = ["gw1", "gw2"]
"#,
            "test.toml",
        )
        .expect("config");
        let get = |b: &str, k: &str| {
            env(&cfg, cfg.backend(b).unwrap())
                .into_iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v)
                .unwrap_or_else(|| panic!("{k} missing"))
        };
        assert_eq!(get("gw1", "VPNLB_BACKEND"), "gw1");
        assert_eq!(get("gw1", "VPNLB_BACKEND_ADDRESS"), "10.0.0.1");
        assert_eq!(get("gw1", "VPNLB_VIP"), "203.0.113.20");
        assert_eq!(get("gw1", "VPNLB_VIP_PORT"), "");
        assert_eq!(get("gw1", "VPNLB_VIP_PROTOCOL"), "esp");
        assert_eq!(get("gw2", "VPNLB_VIP_NAME"), "wg");
        assert_eq!(
            get("gw2", "VPNLB_VIPS"),
            "wg=udp:203.0.113.10:51820 esp=esp:203.0.113.20:0"
        );
        let gw1 = cfg.backend("gw1").unwrap();
        match bind(&gw1.checks[0], &cfg, gw1) {
            CheckSpec::Exec { env, command, .. } => {
                assert_eq!(command[1], "10.96.0.1");
                assert!(env.iter().any(|(k, v)| k == "VPNLB_BACKEND" && v == "gw1"));
            }
            other => panic!("{other:?}"),
        }
    }
}
