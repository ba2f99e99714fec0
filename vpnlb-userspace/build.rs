//! Embeds the eBPF object when the build names one in `VPNLB_EMBED_EBPF` (the xtask release build
//! does); otherwise writes an empty placeholder so `cargo check` never needs the eBPF toolchain.

use std::path::PathBuf;
use std::{env, fs};

fn main() {
    println!("cargo:rerun-if-env-changed=VPNLB_EMBED_EBPF");
    let out =
        PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("vpnlb-ebpf.o");
    match env::var_os("VPNLB_EMBED_EBPF").filter(|v| !v.is_empty()) {
        Some(src) => {
            let src = PathBuf::from(src);
            println!("cargo:rerun-if-changed={}", src.display());
            fs::copy(&src, &out)
                .unwrap_or_else(|e| panic!("VPNLB_EMBED_EBPF={}: {e}", src.display()));
        }
        None => fs::write(&out, []).expect("write empty placeholder object"),
    }
}
