//! `vpnlb-drill`: run by `cargo xtask drill`.
fn main() {
    eprintln!("vpnlb-drill: not implemented yet");
    std::process::exit(2);
}
