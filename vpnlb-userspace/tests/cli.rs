//! The `vpnlb` binary's commands that need no root: `check-config` on every example under
//! docs/examples (accepted) and on broken files (rejected with file, line and reason, exit 1).

use std::path::PathBuf;
use std::process::Command;

fn vpnlb(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vpnlb"))
        .args(args)
        .output()
        .expect("run vpnlb");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_accepts_every_example() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/examples");
    let mut n = 0;
    for e in std::fs::read_dir(&dir).expect("docs/examples") {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "toml") {
            let (code, out, err) = vpnlb(&["check-config", p.to_str().unwrap()]);
            assert_eq!(code, 0, "{}: {err}", p.display());
            assert!(out.contains(": ok ("), "{out}");
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} examples found in {}", dir.display());
}

#[test]
fn check_config_rejects_with_file_line_and_reason() {
    let dir = std::env::temp_dir().join(format!("vpnlb-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "[[interface]]\nname = \"eth0\"\n\n[[backend]]\nname = \"gw1\"\naddress = \"10.0.0.11\"\n\n\
         [[vip]]\nname = \"wg\"\naddress = \"192.0.2.1\"\nport = 51820\nprotocol = \"udp\"\n\
         [[vip.pool]]\nname = \"p\"\nbackends = [\"gw1\", \"gw9\"]\n",
    )
    .unwrap();
    let (code, _, err) = vpnlb(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("bad.toml:15:") && err.contains("unknown backend \"gw9\""),
        "{err}"
    );
    std::fs::write(&bad, "[agent]\nmax_sessions = \"many\"\nbogus = 1\n").unwrap();
    let (code, _, err) = vpnlb(&["check-config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml:"), "{err}");
    let (code, _, err) = vpnlb(&["check-config", "/nonexistent/vpnlb.toml"]);
    assert_eq!(code, 1);
    assert!(err.contains("/nonexistent/vpnlb.toml"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
