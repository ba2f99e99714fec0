//! What the CLI reads: the pinned maps (read-only, works with the agent down), the names the agent
//! gave to backend/VIP ids (`ids.json` next to the control socket), and, when the agent runs, its
//! `status`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::control::{self, ControlError, Request};
use crate::config::IdMap;
use crate::dataplane::maps::{AyaMaps, MapError};

/// Where to look; the defaults are the agent's defaults.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub pin_dir: PathBuf,
    pub control_socket: PathBuf,
}

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            pin_dir: crate::dataplane::loader::default_pin_dir(),
            control_socket: PathBuf::from(control::DEFAULT_SOCKET),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "no vpnlb maps pinned at {pin_dir} (is the agent configured with another pin_dir? use --pin-dir)"
    )]
    NoPins {
        pin_dir: PathBuf,
        #[source]
        source: Box<MapError>,
    },
    #[error("cannot open the vpnlb maps pinned at {pin_dir} (reading BPF maps needs root)")]
    Denied {
        pin_dir: PathBuf,
        #[source]
        source: Box<MapError>,
    },
}

/// Names of ids, from the agent's id assignment (empty when unknown: ids are shown instead).
#[derive(Clone, Debug, Default)]
pub struct Names {
    pub backends: BTreeMap<u32, String>,
    pub vips: BTreeMap<u32, String>,
    /// Ring id -> (VIP name, class name; None for the VIP's default pool order).
    pub rings: BTreeMap<u32, (String, Option<String>)>,
}

impl Names {
    pub fn from_ids(ids: &IdMap) -> Names {
        Names {
            backends: ids
                .backends
                .iter()
                .map(|(n, id)| (*id, n.clone()))
                .collect(),
            vips: ids.vips.iter().map(|(n, id)| (*id, n.clone())).collect(),
            rings: ids
                .rings
                .iter()
                .map(|(k, id)| (*id, (k.vip.clone(), k.class.clone())))
                .collect(),
        }
    }

    /// Reads `ids.json` next to the control socket; empty names when absent or unreadable.
    pub fn load(control_socket: &Path) -> Names {
        let path = crate::agent::persist::ids_path(control_socket);
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<IdMap>(&b).ok())
            .map(|ids| Names::from_ids(&ids))
            .unwrap_or_default()
    }

    /// `gw1`, or `#7` for an id without a name.
    pub fn backend(&self, id: u32) -> String {
        self.backends
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    }

    pub fn vip(&self, id: u32) -> String {
        self.vips
            .get(&id)
            .cloned()
            .unwrap_or_else(|| format!("#{id}"))
    }

    /// The id of a backend given by name or as `#7` / `7`.
    pub fn backend_id(&self, name: &str) -> Option<u32> {
        self.backends
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
            .or_else(|| name.trim_start_matches('#').parse().ok())
    }

    pub fn vip_id(&self, name: &str) -> Option<u32> {
        self.vips
            .iter()
            .find(|(_, n)| n.as_str() == name)
            .map(|(id, _)| *id)
            .or_else(|| name.trim_start_matches('#').parse().ok())
    }
}

/// Whether opening a pin failed for lack of privilege (EPERM/EACCES) rather than absence.
fn is_denied(e: &MapError) -> bool {
    let mut cur: Option<&dyn std::error::Error> = Some(e);
    while let Some(c) = cur {
        if let Some(io) = c.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::EPERM) | Some(libc::EACCES))
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// The maps (read through their pins), the names, and the agent's status when it answers.
pub struct Source {
    pub maps: AyaMaps,
    pub names: Names,
    pub opts: SourceOptions,
}

impl Source {
    pub fn open(opts: &SourceOptions) -> Result<Source, SourceError> {
        let maps = AyaMaps::open_pinned(&opts.pin_dir).map_err(|source| {
            let pin_dir = opts.pin_dir.clone();
            let source = Box::new(source);
            if is_denied(&source) {
                SourceError::Denied { pin_dir, source }
            } else {
                SourceError::NoPins { pin_dir, source }
            }
        })?;
        Ok(Source {
            maps,
            names: Names::load(&opts.control_socket),
            opts: opts.clone(),
        })
    }

    /// The agent's `status` result, or why there is none (not running, error).
    pub fn agent_status(&self) -> Result<serde_json::Value, ControlError> {
        let r = control::request(
            &self.opts.control_socket,
            &Request::Status {},
            Duration::from_secs(2),
        )?;
        if r.ok {
            Ok(r.result)
        } else {
            Err(ControlError::BadAnswer {
                reason: r.error.unwrap_or_default(),
            })
        }
    }
}
