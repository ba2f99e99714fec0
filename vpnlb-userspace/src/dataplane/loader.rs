//! Finds the eBPF object, loads it with the load-time map sizes and pins every map under the
//! versioned pin directory; a reused pin is checked against the ABI so a stale one is refused.
//!
//! Nothing is attached here: attaching programs to interfaces is the agent's job.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use aya::maps::{MapInfo, MapType};
use aya::{Ebpf, EbpfLoader};
use aya_obj::generated::bpf_map_type;
use vpnlb_common::{
    ABI_VERSION, DEFAULT_MAX_SESSIONS, MAP_ABI, MAX_VIPS, PIN_ROOT, RING_SIZE_MAX, map_names,
};

/// Environment variable naming the eBPF object file to load.
pub const OBJ_ENV: &str = "VPNLB_EBPF_OBJ";

/// Where `cargo xtask build-ebpf` leaves the object in a source checkout.
const DEV_OBJECT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../vpnlb-ebpf/target/bpfel-unknown-none/release/vpnlb"
);

/// The object embedded by build.rs (`VPNLB_EMBED_EBPF`); empty when the build did not embed one.
static EMBEDDED: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/vpnlb-ebpf.o"));

/// Map flags the kernel adds on its own (devmap sets `BPF_F_RDONLY_PROG`); ignored when comparing.
const KERNEL_ADDED_FLAGS: u32 = (1 << 7) | (1 << 8);

/// Largest `ring_rows`: ring ids are `0..MAX_VIPS`, so more rows could never be addressed.
pub const MAX_RING_ROWS: u32 = MAX_VIPS;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("no eBPF object embedded, ${env} unset and {dev} missing: run `cargo xtask build-ebpf`", env = OBJ_ENV, dev = .tried.display())]
    NoObject { tried: PathBuf },
    #[error("cannot read eBPF object {path}")]
    ReadObject {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse eBPF object")]
    ParseObject {
        #[source]
        source: Box<aya_obj::ParseError>,
    },
    #[error("eBPF object has no map {map}")]
    MissingMap { map: &'static str },
    #[error("eBPF object map {map}: {what} is {object}, the ABI says {expected}")]
    ObjectMismatch {
        map: &'static str,
        what: &'static str,
        object: u64,
        expected: u64,
    },
    #[error("bad load option {what}={value}: {reason}")]
    BadOption {
        what: &'static str,
        value: u32,
        reason: &'static str,
    },
    #[error("cannot create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot inspect pinned map {path}")]
    PinInfo {
        path: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {map} is stale: {what} is {pinned}, expected {expected} (remove the pin or use another pin dir)"
    )]
    PinMismatch {
        map: &'static str,
        what: &'static str,
        pinned: u64,
        expected: u64,
    },
    #[error("{path} is not on a bpffs and mounting one at {mount} failed")]
    Bpffs {
        path: PathBuf,
        mount: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot count possible CPUs")]
    Cpus {
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load eBPF object")]
    Load {
        #[source]
        source: Box<aya::EbpfError>,
    },
}

/// The eBPF object: embedded at build time, else `$VPNLB_EBPF_OBJ`, else the development build.
pub fn object_bytes() -> Result<Cow<'static, [u8]>, LoadError> {
    if !EMBEDDED.is_empty() {
        return Ok(Cow::Borrowed(EMBEDDED));
    }
    let path = match std::env::var_os(OBJ_ENV).filter(|v| !v.is_empty()) {
        Some(p) => PathBuf::from(p),
        None => {
            let dev = PathBuf::from(DEV_OBJECT);
            if !dev.exists() {
                return Err(LoadError::NoObject { tried: dev });
            }
            dev
        }
    };
    std::fs::read(&path)
        .map(Cow::Owned)
        .map_err(|source| LoadError::ReadObject { path, source })
}

/// `/sys/fs/bpf/vpnlb/v{ABI_VERSION}`: a new ABI gets a new directory, never a live map.
/// The kernel's bpffs magic (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where pins live; mounted by [`ensure_bpffs`] when the host has not.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; c is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `dir` can hold pins: its nearest existing ancestor must be on a bpffs. Under
/// /sys/fs/bpf, a missing bpffs is mounted there (as Cilium's and Katran's agents do); elsewhere it
/// is an error, because pins on another filesystem cannot exist.
pub fn ensure_bpffs(dir: &Path) -> Result<(), LoadError> {
    let mut probe = dir;
    while !probe.exists() {
        match probe.parent() {
            Some(p) => probe = p,
            None => break,
        }
    }
    if is_bpffs(probe) {
        return Ok(());
    }
    let err = |source| LoadError::Bpffs {
        path: dir.to_path_buf(),
        mount: BPFFS_MOUNT,
        source,
    };
    if !dir.starts_with(BPFFS_MOUNT) {
        return Err(err(std::io::Error::other(
            "pin directory outside /sys/fs/bpf is not on a bpffs",
        )));
    }
    std::fs::create_dir_all(BPFFS_MOUNT).map_err(err)?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (src, target, fstype, data) = (c("bpf"), c(BPFFS_MOUNT), c("bpf"), c("mode=0700"));
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(err(std::io::Error::last_os_error()));
    }
    tracing::info!(mount = BPFFS_MOUNT, "mounted bpffs for pinned maps");
    Ok(())
}

/// `n` rounded up to a multiple of the number of possible CPUs.
fn round_to_cpus(n: u32) -> Result<u32, LoadError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, source)| LoadError::Cpus { source })? as u32;
    Ok(n.div_ceil(cpus) * cpus)
}

pub fn default_pin_dir() -> PathBuf {
    Path::new(PIN_ROOT).join(format!("v{ABI_VERSION}"))
}

/// Load-time choices. `None` means the default.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Pin every map under this directory (reusing existing pins); `None` = no pinning.
    pub pin_dir: Option<PathBuf>,
    /// Capacity of the `SESSIONS` LRU (default `DEFAULT_MAX_SESSIONS`).
    pub max_sessions: Option<u32>,
    /// VIP ring rows to allocate: `RINGS` gets `ring_rows * RING_SIZE_MAX` entries (default
    /// `MAX_VIPS`).
    pub ring_rows: Option<u32>,
}

impl LoadOptions {
    pub fn ring_rows(&self) -> u32 {
        self.ring_rows.unwrap_or(MAX_VIPS)
    }
    pub fn max_sessions(&self) -> u32 {
        self.max_sessions.unwrap_or(DEFAULT_MAX_SESSIONS)
    }
}

/// One map as this load creates it (the object's definition with the load-time sizes applied).
#[derive(Clone, Copy, Debug)]
struct Expected {
    name: &'static str,
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    flags: u32,
}

/// Loads `obj`, sizing `RINGS` and `SESSIONS` from `opts` and pinning every map under
/// `opts.pin_dir`. Existing pins are reused only when their type, key/value size, max_entries and
/// flags are exactly what this load would create; otherwise [`LoadError::PinMismatch`].
pub fn load(obj: &[u8], opts: &LoadOptions) -> Result<Ebpf, LoadError> {
    let ring_rows = opts.ring_rows();
    if ring_rows == 0 || ring_rows > MAX_RING_ROWS {
        return Err(LoadError::BadOption {
            what: "ring_rows",
            value: ring_rows,
            reason: "must be 1..=128 (MAX_VIPS)",
        });
    }
    let max_sessions = opts.max_sessions();
    if max_sessions == 0 {
        return Err(LoadError::BadOption {
            what: "max_sessions",
            value: 0,
            reason: "must be > 0",
        });
    }
    // SESSIONS is an LRU with BPF_F_NO_COMMON_LRU: the kernel rounds its size up to a multiple of
    // the possible CPUs (htab_map_alloc), so ask for that size and expect it on a reused pin.
    let max_sessions = round_to_cpus(max_sessions)?;
    let expected = expected_maps(obj, ring_rows * RING_SIZE_MAX, max_sessions)?;

    // Check pins that already exist before loading: a stale pin must be reported as such, not as
    // a verifier error from a program relocated against a map of the wrong shape.
    if let Some(dir) = &opts.pin_dir {
        ensure_bpffs(dir)?;
        std::fs::create_dir_all(dir).map_err(|source| LoadError::PinDir {
            path: dir.clone(),
            source,
        })?;
        for exp in &expected {
            let path = dir.join(exp.name);
            if path.exists() {
                check_pin(&path, exp)?;
            }
        }
    }

    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::RINGS, ring_rows * RING_SIZE_MAX)
        .map_max_entries(map_names::SESSIONS, max_sessions);
    if let Some(dir) = &opts.pin_dir {
        for name in map_names::ALL {
            loader.map_pin_path(name, dir.join(name));
        }
    }
    let ebpf = loader.load(obj).map_err(|e| LoadError::Load {
        source: Box::new(e),
    })?;

    // And again after: aya opened whatever was pinned at load time without looking at it.
    if let Some(dir) = &opts.pin_dir {
        for exp in &expected {
            check_pin(&dir.join(exp.name), exp)?;
        }
    }
    Ok(ebpf)
}

/// Checks the pinned maps in `dir` against `obj` loaded with `opts` without loading anything
/// (the CLI uses this before trusting a pin directory).
pub fn check_pins(obj: &[u8], dir: &Path, opts: &LoadOptions) -> Result<(), LoadError> {
    let max_sessions = round_to_cpus(opts.max_sessions())?;
    let expected = expected_maps(obj, opts.ring_rows() * RING_SIZE_MAX, max_sessions)?;
    for exp in &expected {
        check_pin(&dir.join(exp.name), exp)?;
    }
    Ok(())
}

fn expected_maps(
    obj: &[u8],
    ring_entries: u32,
    max_sessions: u32,
) -> Result<Vec<Expected>, LoadError> {
    let parsed = aya_obj::Object::parse(obj).map_err(|e| LoadError::ParseObject {
        source: Box::new(e),
    })?;
    let mut out = Vec::with_capacity(MAP_ABI.len());
    for abi in MAP_ABI {
        let m = parsed
            .maps
            .get(abi.name)
            .ok_or(LoadError::MissingMap { map: abi.name })?;
        let max_entries = match abi.name {
            map_names::RINGS => ring_entries,
            map_names::SESSIONS => max_sessions,
            _ => m.max_entries(),
        };
        let mismatch = |what, object: u32, expected: u32| LoadError::ObjectMismatch {
            map: abi.name,
            what,
            object: object.into(),
            expected: expected.into(),
        };
        if m.key_size() != abi.key_size {
            return Err(mismatch("key size", m.key_size(), abi.key_size));
        }
        if m.value_size() != abi.value_size {
            return Err(mismatch("value size", m.value_size(), abi.value_size));
        }
        if max_entries < abi.min_entries {
            return Err(mismatch("max entries", max_entries, abi.min_entries));
        }
        out.push(Expected {
            name: abi.name,
            map_type: m.map_type(),
            key_size: m.key_size(),
            value_size: m.value_size(),
            max_entries,
            flags: m.map_flags(),
        });
    }
    Ok(out)
}

fn check_pin(path: &Path, exp: &Expected) -> Result<(), LoadError> {
    let info = MapInfo::from_pin(path).map_err(|source| LoadError::PinInfo {
        path: path.to_path_buf(),
        source,
    })?;
    let mismatch = |what, pinned: u32, expected: u32| {
        Err(LoadError::PinMismatch {
            map: exp.name,
            what,
            pinned: pinned.into(),
            expected: expected.into(),
        })
    };
    let pinned_type = info.map_type().ok();
    let expected_type = bpf_map_type::try_from(exp.map_type)
        .ok()
        .and_then(|t| MapType::try_from(t).ok());
    if pinned_type.is_none() || pinned_type != expected_type {
        return mismatch("map type", map_type_id(pinned_type), exp.map_type);
    }
    if info.key_size() != exp.key_size {
        return mismatch("key size", info.key_size(), exp.key_size);
    }
    if info.value_size() != exp.value_size {
        return mismatch("value size", info.value_size(), exp.value_size);
    }
    if info.max_entries() != exp.max_entries {
        return mismatch("max entries", info.max_entries(), exp.max_entries);
    }
    if info.map_flags() & !KERNEL_ADDED_FLAGS != exp.flags & !KERNEL_ADDED_FLAGS {
        return mismatch("flags", info.map_flags(), exp.flags);
    }
    Ok(())
}

/// The kernel's numeric id of a map type, for error messages (`u32::MAX` when unknown).
fn map_type_id(t: Option<MapType>) -> u32 {
    (0..64u32)
        .find(|id| {
            bpf_map_type::try_from(*id)
                .ok()
                .and_then(|b| MapType::try_from(b).ok())
                == t
        })
        .unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_pin_dir_is_versioned() {
        assert_eq!(
            default_pin_dir(),
            PathBuf::from(format!("/sys/fs/bpf/vpnlb/v{ABI_VERSION}"))
        );
    }

    #[test]
    fn bad_options_are_refused_before_parsing() {
        let e = load(
            &[],
            &LoadOptions {
                ring_rows: Some(0),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::BadOption {
                    what: "ring_rows",
                    ..
                }
            ),
            "{e}"
        );
        let e = load(
            &[],
            &LoadOptions {
                ring_rows: Some(MAX_VIPS + 1),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::BadOption {
                    what: "ring_rows",
                    ..
                }
            ),
            "{e}"
        );
        let e = load(
            &[],
            &LoadOptions {
                max_sessions: Some(0),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::BadOption {
                    what: "max_sessions",
                    ..
                }
            ),
            "{e}"
        );
        let e = load(b"not an elf", &LoadOptions::default()).unwrap_err();
        assert!(matches!(e, LoadError::ParseObject { .. }), "{e}");
    }

    #[test]
    fn object_bytes_prefers_embedded_then_env() {
        if !EMBEDDED.is_empty() {
            // Built with VPNLB_EMBED_EBPF: the environment is not consulted.
            assert!(matches!(object_bytes().unwrap(), Cow::Borrowed(b) if b == EMBEDDED));
            return;
        }
        let path = std::env::temp_dir().join(format!("vpnlb-obj-test-{}", std::process::id()));
        std::fs::write(&path, b"\x7fELF-ish").unwrap();
        // SAFETY: no other test in this binary reads or writes VPNLB_EBPF_OBJ.
        unsafe { std::env::set_var(OBJ_ENV, &path) };
        assert_eq!(&*object_bytes().unwrap(), b"\x7fELF-ish");
        std::fs::remove_file(&path).unwrap();
        let e = object_bytes().unwrap_err();
        assert!(matches!(e, LoadError::ReadObject { .. }), "{e}");
        // SAFETY: as above.
        unsafe { std::env::remove_var(OBJ_ENV) };
        match object_bytes() {
            Ok(b) => assert!(Path::new(DEV_OBJECT).exists() && !b.is_empty()),
            Err(e) => {
                assert!(matches!(e, LoadError::NoObject { .. }));
                assert!(e.to_string().contains("cargo xtask build-ebpf"), "{e}");
            }
        }
    }

    #[test]
    fn abi_table_covers_every_map() {
        let names: Vec<_> = MAP_ABI.iter().map(|a| a.name).collect();
        for n in map_names::ALL {
            assert!(names.contains(&n), "{n} missing from MAP_ABI");
        }
        assert_eq!(
            map_type_id(MapType::try_from(bpf_map_type::BPF_MAP_TYPE_LRU_HASH).ok()),
            9
        );
    }
}
