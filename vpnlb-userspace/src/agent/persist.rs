//! What the agent keeps between runs beside the pinned maps, as JSON files next to the control
//! socket (tmpfs, like bpffs: both are gone after a reboot, together): the stable name -> id
//! assignment and the admin overrides (a drained or disabled gateway stays so across a restart).
//! Writes go through a temporary file and a rename, so a crash leaves the old file or the new one.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::agent::state::Admin;
use crate::cluster::Service;
use crate::config::IdMap;

fn beside(control_socket: &Path, file: &str) -> PathBuf {
    control_socket
        .parent()
        .unwrap_or(Path::new("/run/vpnlb"))
        .join(file)
}

/// Where the stable name -> id assignment is kept.
pub fn ids_path(control_socket: &Path) -> PathBuf {
    beside(control_socket, "ids.json")
}

/// Where admin overrides (drain, disable) are kept.
pub fn admin_path(control_socket: &Path) -> PathBuf {
    beside(control_socket, "admin.json")
}

/// Where a member keeps the last service it applied.
pub fn service_path(control_socket: &Path) -> PathBuf {
    beside(control_socket, "cluster-service.json")
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedService {
    revision: i64,
    text: String,
    ids: Option<IdMap>,
}

/// The last service this member applied, if there is a readable one.
pub fn load_service(path: &Path) -> Option<Service> {
    let s: SavedService = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some(Service {
        revision: s.revision,
        text: s.text,
        ids: s.ids,
    })
}

/// Keeps `svc` (see [`load_service`]).
pub fn save_service(svc: &Service, path: &Path) {
    let s = SavedService {
        revision: svc.revision,
        text: svc.text.clone(),
        ids: svc.ids.clone(),
    };
    save_json(&s, path, "cluster service");
}

/// The saved id assignment, if there is a readable one.
pub fn load_ids(path: &Path) -> Option<IdMap> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The saved admin overrides (none when the file is missing or unreadable).
pub fn load_admin(path: &Path) -> BTreeMap<String, Admin> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// Writes `v` as JSON to `path` atomically; a failure is logged (the running agent is unaffected,
/// the next restart starts from the previous file).
pub fn save_json<T: serde::Serialize>(v: &T, path: &Path, what: &str) {
    let tmp = path.with_extension("json.tmp");
    let write = || -> std::io::Result<()> {
        if let Some(d) = path.parent() {
            std::fs::create_dir_all(d)?;
        }
        std::fs::write(
            &tmp,
            serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?,
        )?;
        std::fs::rename(&tmp, path)
    };
    if let Err(e) = write() {
        tracing::warn!(path = %path.display(), error = %e, "could not save {what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_sit_beside_the_socket_and_round_trip() {
        let dir = std::env::temp_dir().join(format!("vpnlb-persist-{}", std::process::id()));
        let sock = dir.join("control.sock");
        assert_eq!(ids_path(&sock), dir.join("ids.json"));
        let admin = BTreeMap::from([("gw2".to_string(), Admin::Drain)]);
        save_json(&admin, &admin_path(&sock), "admin overrides");
        assert_eq!(load_admin(&admin_path(&sock)), admin);
        std::fs::write(ids_path(&sock), b"{ broken").unwrap();
        assert!(load_ids(&ids_path(&sock)).is_none());
        assert!(load_admin(&dir.join("missing.json")).is_empty());
        std::fs::remove_dir_all(&dir).ok();
    }
}
