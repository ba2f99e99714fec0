//! Attaching `vpnlb_ingress` through pinned bpf_links, so the data plane keeps forwarding with no
//! agent alive. A link already pinned for an interface is adopted: the freshly loaded program
//! replaces the old one in place (BPF_LINK_UPDATE, no packet lost), keeping the pinned maps. A link
//! whose device is gone ("severed") is unpinned and replaced.

use std::path::{Path, PathBuf};

use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::xdp::XdpLink;
use aya::programs::{Xdp, XdpMode};
use vpnlb_common::{ABI_VERSION, PIN_ROOT};

use serde::{Deserialize, Serialize};

/// Why attaching, adopting or detaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error(
        "pinned state of map ABI v{found} at {path} is in use; this agent understands v{ours}: run the matching vpnlb version, or detach and remove those pins"
    )]
    Abi {
        found: u32,
        path: PathBuf,
        ours: u32,
    },
    #[error("attaching to {iface}: {reason}")]
    Attach { iface: String, reason: String },
}

/// `interface.mode`: how the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttachMode {
    /// Driver mode; falls back to generic (with a warning) when the driver has no XDP support.
    #[default]
    Native,
    /// Generic (skb) mode.
    Generic,
    /// Driver mode or fail.
    NativeOnly,
}

/// Where the link of `ifname` is pinned: `<pin_dir>/links/<ifname>`.
pub fn link_pin(pin_dir: &Path, ifname: &str) -> PathBuf {
    pin_dir.join("links").join(ifname)
}

/// How an interface ended up attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// New link in driver (native) mode.
    Native,
    /// New link in generic (skb) mode.
    Generic,
    /// A pinned link was adopted and now runs this program (mode unchanged).
    Replaced,
}

/// Refuses to run over pinned state of another map ABI: its program would keep running on maps
/// this agent cannot read, and replacing it would drop every session.
pub fn check_abi(pin_dir: &Path) -> Result<(), AttachError> {
    check_abi_under(Path::new(PIN_ROOT), pin_dir)
}

/// [`check_abi`] for pins rooted at `root` (`<root>/v<N>/links/...`); only applies when `pin_dir`
/// is under `root`.
pub fn check_abi_under(root: &Path, pin_dir: &Path) -> Result<(), AttachError> {
    if !pin_dir.starts_with(root) {
        return Ok(());
    }
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(v) = name.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let links = e.path().join("links");
        let live = std::fs::read_dir(&links)
            .map(|mut d| d.next().is_some())
            .unwrap_or(false);
        if v != ABI_VERSION && live {
            return Err(AttachError::Abi {
                found: v,
                path: e.path(),
                ours: ABI_VERSION,
            });
        }
    }
    Ok(())
}

fn take_and_pin(
    prog: &mut Xdp,
    id: aya::programs::xdp::XdpLinkId,
    pin: &Path,
) -> Result<(), AttachError> {
    let link = prog.take_link(id).map_err(|e| AttachError::Attach {
        iface: pin.display().to_string(),
        reason: e.to_string(),
    })?;
    let fd: FdLink = link
        .try_into()
        .map_err(|e: aya::programs::links::LinkError| AttachError::Attach {
            iface: pin.display().to_string(),
            reason: format!("not a bpf_link (kernel without XDP links?): {e}"),
        })?;
    fd.pin(pin).map_err(|e| AttachError::Attach {
        iface: pin.display().to_string(),
        reason: format!("pin: {e}"),
    })?;
    Ok(())
}

/// Attaches (or adopts) `prog` on `ifname` and leaves the link pinned.
pub fn attach(
    prog: &mut Xdp,
    ifname: &str,
    mode: AttachMode,
    pin_dir: &Path,
) -> Result<Attached, AttachError> {
    let pin = link_pin(pin_dir, ifname);
    let err = |reason: String| AttachError::Attach {
        iface: ifname.to_string(),
        reason,
    };
    std::fs::create_dir_all(pin.parent().expect("has parent"))
        .map_err(|e| err(format!("create {}: {e}", pin.display())))?;
    if pin.exists() {
        match PinnedLink::from_pin(&pin) {
            Ok(pinned) => {
                let fd: FdLink = pinned.into();
                let link = XdpLink::try_from(fd)
                    .map_err(|e| err(format!("pinned link is not XDP: {e}")))?;
                match prog.attach_to_link(link) {
                    Ok(id) => {
                        // The link now runs this program; keep it pinned, not owned by `prog`.
                        let l = prog.take_link(id).map_err(|e| err(e.to_string()))?;
                        drop(l);
                        return Ok(Attached::Replaced);
                    }
                    Err(e) => {
                        // ENOLINK: the device of the pinned link is gone. Replace the pin.
                        tracing::warn!(iface = ifname, error = %e, "pinned link unusable, re-attaching");
                        std::fs::remove_file(&pin)
                            .map_err(|e| err(format!("unpin {}: {e}", pin.display())))?;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(iface = ifname, error = %e, "stale link pin, re-attaching");
                std::fs::remove_file(&pin)
                    .map_err(|e| err(format!("unpin {}: {e}", pin.display())))?;
            }
        }
    }
    let (first, fallback) = match mode {
        AttachMode::Native => (XdpMode::Driver, Some(XdpMode::Skb)),
        AttachMode::NativeOnly => (XdpMode::Driver, None),
        AttachMode::Generic => (XdpMode::Skb, None),
    };
    let (id, how) = match prog.attach(ifname, first) {
        Ok(id) => (
            id,
            if first == XdpMode::Driver {
                Attached::Native
            } else {
                Attached::Generic
            },
        ),
        Err(e) => match fallback {
            Some(fb) => {
                tracing::warn!(iface = ifname, error = %e, "native XDP refused, falling back to generic (skb) mode: slower");
                (
                    prog.attach(ifname, fb).map_err(|e| err(e.to_string()))?,
                    Attached::Generic,
                )
            }
            None => return Err(err(e.to_string())),
        },
    };
    take_and_pin(prog, id, &pin)?;
    Ok(how)
}

/// Detaches `ifname`: removing the pin drops the last reference to the link.
pub fn detach(pin_dir: &Path, ifname: &str) -> Result<(), AttachError> {
    let pin = link_pin(pin_dir, ifname);
    match std::fs::remove_file(&pin) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(AttachError::Attach {
            iface: ifname.to_string(),
            reason: format!("unpin: {e}"),
        }),
    }
}
