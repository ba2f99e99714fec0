//! The map layer against the real object (root): load with pins in a throw-away bpffs directory,
//! program a VIP through `Dataplane<AyaMaps>`, read it all back, reload over the same pins, and
//! check that a pin of the wrong size is refused. Also times full-ring writes.
//!
//! Run: `cargo test -p vpnlb-userspace -- --include-ignored --nocapture`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vpnlb::dataplane::loader::{self, LoadError, LoadOptions};
use vpnlb::dataplane::maps::{AyaMaps, MapReader, MapWriter, MemMaps};
use vpnlb::dataplane::{BackendSpec, Dataplane, VipSpec};
use vpnlb_common::maglev::SlotChange;
use vpnlb_common::*;

/// A unique directory under /sys/fs/bpf, removed (with its pins) on drop, also when a test fails.
struct PinDir(PathBuf);

/// Makes sure this thread sees a bpffs at /sys/fs/bpf. When the host has none mounted there, the
/// test thread moves into a private mount namespace and mounts one, invisible to anybody else
/// (a namespace is per thread, so every test calls this on its own thread).
fn ensure_bpffs() {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    let path = c"/sys/fs/bpf";
    // SAFETY: statfs on a NUL-terminated path into a zeroed, properly sized struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut st) } == 0 && st.f_type as i64 == BPF_FS_MAGIC {
        return;
    }
    // SAFETY: plain syscalls with valid NUL-terminated strings; failures are checked.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNS),
            0,
            "unshare(CLONE_NEWNS): {}",
            std::io::Error::last_os_error()
        );
        let r = libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        );
        assert_eq!(r, 0, "make / private: {}", std::io::Error::last_os_error());
        let r = libc::mount(
            c"bpf".as_ptr(),
            path.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        );
        assert_eq!(r, 0, "mount bpffs: {}", std::io::Error::last_os_error());
    }
}

impl PinDir {
    fn new(tag: &str) -> Self {
        ensure_bpffs();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let p = PathBuf::from(format!(
            "/sys/fs/bpf/vpnlb-test-{tag}-{}-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&p)
            .unwrap_or_else(|e| panic!("create {}: {e} (root and a bpffs needed)", p.display()));
        PinDir(p)
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: could not remove {}: {e}", self.0.display());
        }
    }
}

fn opts(dir: &Path, ring_rows: u32, max_sessions: u32) -> LoadOptions {
    LoadOptions {
        pin_dir: Some(dir.to_path_buf()),
        max_sessions: Some(max_sessions),
        ring_rows: Some(ring_rows),
    }
}

fn object() -> Vec<u8> {
    loader::object_bytes()
        .unwrap_or_else(|e| panic!("{e}"))
        .into_owned()
}

fn gw(id: u32, addr: &str, ifindex: u32) -> BackendSpec {
    BackendSpec {
        id,
        addr: addr.parse().unwrap(),
        mac: [2, 0, 0, 0, 0, id as u8],
        src_mac: [2, 0, 0, 0, 0, 1],
        ifindex,
        weight: id,
        state: BACKEND_UP,
    }
}

fn vip(port: u16, ring_id: u32, backends: Vec<u32>) -> VipSpec {
    VipSpec {
        key: VipKey::new("192.0.2.10".parse().unwrap(), port, PROTO_UDP),
        vip_id: 7,
        ring_id,
        ring_size: DEFAULT_RING_SIZE,
        flags: VIP_F_HASH_SRC_ONLY,
        fwd_mode: FWD_MODE_GUE,
        mtu: 9000,
        idle_timeout_ns: 120_000_000_000,
        gue_port: DEFAULT_GUE_PORT,
        backends,
        classes: Vec::new(),
    }
}

fn config() -> GlobalConfig {
    GlobalConfig {
        encap_src_v4: u32::from_ne_bytes([10, 9, 0, 1]),
        encap_src_v4_hash_mask: u32::from_ne_bytes([0, 0, 0, 0x0f]),
        flood_max_inserts_per_sec: 50_000,
        decap_gue_port: DEFAULT_GUE_PORT,
        ..Default::default()
    }
}

/// Programs the same state into any writer.
fn program<W: MapWriter>(dp: &mut Dataplane<W>) -> Duration {
    dp.set_config(config()).unwrap();
    // ifindex 1 (lo) exists in every namespace, so the DEVMAP accepts it.
    dp.upsert_backend(gw(1, "10.1.0.1", 1)).unwrap();
    dp.upsert_backend(gw(2, "2001:db8::2", 0)).unwrap();
    dp.upsert_backend(BackendSpec {
        state: BACKEND_DRAINING,
        ..gw(3, "10.1.0.3", 0)
    })
    .unwrap();
    let t = Instant::now();
    let r = dp.upsert_vip(vip(4500, 2, vec![1, 2, 3])).unwrap();
    let took = t.elapsed();
    assert_eq!(r.ring_slots_written, DEFAULT_RING_SIZE as usize);
    // A second key sharing the ring (IKE 500 + NAT-T 4500 of one address).
    dp.upsert_vip(VipSpec {
        vip_id: 8,
        ..vip(500, 2, vec![3, 2, 1])
    })
    .unwrap();
    took
}

/// Everything a reader shows, compared with the in-memory twin programmed the same way.
fn check_state(r: &impl MapReader, twin: &MemMaps, what: &str) {
    assert_eq!(r.config().unwrap(), twin.config, "{what}: config");
    let mut vips = r.vips().unwrap();
    vips.sort_by_key(|(k, _)| k.port_be);
    let mut want: Vec<_> = twin.vips.iter().map(|(k, v)| (*k, *v)).collect();
    want.sort_by_key(|(k, _)| k.port_be);
    assert_eq!(vips, want, "{what}: vips");
    assert_eq!(
        r.backends().unwrap(),
        twin.backends().unwrap(),
        "{what}: backends"
    );
    assert_eq!(r.backend(3).unwrap().state, BACKEND_DRAINING);
    assert_eq!(
        r.backend(9).unwrap(),
        Backend::default(),
        "{what}: never written = default"
    );
    let ring = r.ring(2, DEFAULT_RING_SIZE).unwrap();
    assert_eq!(
        ring,
        twin.ring(2, DEFAULT_RING_SIZE).unwrap(),
        "{what}: ring"
    );
    assert!(
        ring.iter().all(|id| *id == 1 || *id == 2),
        "{what}: draining backend 3 not in the ring"
    );
    assert_eq!(r.ring_slot(2, 12345).unwrap(), ring[12345]);
    assert_eq!(r.ring(1, 13).unwrap(), vec![0; 13], "{what}: untouched row");
    assert!(r.tx_port(1).unwrap(), "{what}: tx port of backend 1");
    assert!(!r.tx_port(2).unwrap());
    assert_eq!(r.counters().unwrap().len(), NUM_COUNTERS as usize);
    assert_eq!(r.vip_stats(7).unwrap(), PktBytes::default());
    assert_eq!(r.backend_stats(1).unwrap(), PktBytes::default());
    assert_eq!(r.ring_rows().unwrap(), 4);
}

#[test]
#[ignore = "needs root and the eBPF object"]
fn real_maps_program_read_back_reload_and_refuse_stale_pins() {
    let obj = object();
    let dir = PinDir::new("maps");
    // An odd capacity: the kernel rounds NO_COMMON_LRU maps up to a multiple of the possible CPUs,
    // and a reload over the pins must expect the rounded size.
    let o = opts(&dir.0, 4, 4095);

    let mut twin = Dataplane::with_ring_rows(MemMaps::new(), 4);
    program(&mut twin);
    let twin = twin.into_writer();

    // 1. Load, program through the dataplane API, read everything back.
    let mut ebpf = loader::load(&obj, &o).unwrap_or_else(|e| panic!("load: {e:?}"));
    for name in map_names::ALL {
        assert!(dir.0.join(name).exists(), "{name} pinned");
    }
    let maps = AyaMaps::from_ebpf(&mut ebpf).unwrap_or_else(|e| panic!("{e:?}"));
    let mut dp = Dataplane::with_ring_rows(maps, 4);
    let full_ring = program(&mut dp);
    eprintln!(
        "full {DEFAULT_RING_SIZE}-slot ring written through the dataplane (batch) in {full_ring:?}"
    );
    check_state(dp.writer(), &twin, "loaded");
    assert_eq!(
        dp.installed_ring(2).unwrap(),
        &twin.ring(2, DEFAULT_RING_SIZE).unwrap()[..]
    );

    // Sessions and TX ports through the raw writer.
    let maps = dp.writer_mut();
    let fk = FlowKey::new(
        "198.51.100.7".parse().unwrap(),
        "192.0.2.10".parse().unwrap(),
        4500,
        4500,
        PROTO_UDP,
    );
    assert_eq!(maps.session(&fk).unwrap(), None);
    let s = Session {
        backend_id: 2,
        hash: 0,
        last_seen_ns: 42,
    };
    maps.set_session(&fk, &s).unwrap();
    assert_eq!(maps.session(&fk).unwrap(), Some(s));
    assert_eq!(maps.sessions().unwrap(), vec![(fk, s)]);
    maps.remove_session(&fk).unwrap();
    maps.remove_session(&fk).unwrap(); // absent: not an error
    assert!(maps.sessions().unwrap().is_empty());
    maps.set_session(&fk, &s).unwrap();
    maps.remove_tx_port(1).unwrap();
    assert!(!maps.tx_port(1).unwrap());
    maps.remove_tx_port(1).unwrap();
    maps.set_tx_port(1).unwrap();
    assert_eq!(maps.flood().unwrap().len(), aya::util::nr_cpus().unwrap());

    // Out-of-range writes are refused, not truncated.
    assert!(
        maps.write_ring(
            4,
            &[SlotChange {
                slot: 0,
                backend_id: 1
            }]
        )
        .is_err()
    );
    assert!(maps.ring(0, RING_SIZE_MAX + 1).is_err());
    assert!(maps.set_backend(MAX_BACKENDS, &Backend::default()).is_err());

    // 2. Timing: a full ring, batched vs one syscall per slot, on a spare row.
    let full: Vec<SlotChange> = (0..RING_SIZE_MAX)
        .map(|slot| SlotChange {
            slot,
            backend_id: 1 + slot % 3,
        })
        .collect();
    let t = Instant::now();
    maps.write_ring(3, &full).unwrap();
    let batched = t.elapsed();
    let t = Instant::now();
    let read = maps.ring(3, RING_SIZE_MAX).unwrap();
    let batched_read = t.elapsed();
    assert!(
        read.iter()
            .enumerate()
            .all(|(i, id)| *id == 1 + i as u32 % 3)
    );
    maps.set_batch(false);
    let zero: Vec<SlotChange> = (0..RING_SIZE_MAX)
        .map(|slot| SlotChange {
            slot,
            backend_id: 0,
        })
        .collect();
    let t = Instant::now();
    maps.write_ring(3, &zero).unwrap();
    let per_slot = t.elapsed();
    let t = Instant::now();
    let read = maps.ring(3, RING_SIZE_MAX).unwrap();
    let per_slot_read = t.elapsed();
    assert!(read.iter().all(|id| *id == 0));
    maps.set_batch(true);
    eprintln!(
        "full {RING_SIZE_MAX}-slot ring: write batched {batched:?}, per slot {per_slot:?}; \
         read batched {batched_read:?}, per slot {per_slot_read:?}"
    );

    // The snapshot the model runs on equals the twin (plus the session set above).
    let snap = MemMaps::snapshot(dp.writer()).unwrap();
    assert_eq!(snap.rings[&2], twin.rings[&2]);
    assert_eq!(snap.backends, twin.backends);
    assert_eq!(snap.vips, twin.vips);
    assert_eq!(snap.tx_ports, twin.tx_ports);
    assert_eq!(snap.sessions.len(), 1);
    drop(dp);
    drop(ebpf);

    // 3. Reload over the same pins: the state survived; also readable without loading.
    let pinned = AyaMaps::open_pinned(&dir.0).unwrap_or_else(|e| panic!("{e:?}"));
    check_state(&pinned, &twin, "open_pinned");
    assert_eq!(pinned.session(&fk).unwrap(), Some(s));
    drop(pinned);
    let mut ebpf = loader::load(&obj, &o).unwrap_or_else(|e| panic!("reload: {e:?}"));
    let maps = AyaMaps::from_ebpf(&mut ebpf).unwrap();
    check_state(&maps, &twin, "reloaded");
    assert_eq!(
        maps.session(&fk).unwrap(),
        Some(s),
        "sessions survive a reload"
    );
    drop(maps);
    drop(ebpf);
    loader::check_pins(&obj, &dir.0, &o).unwrap();

    // 4. Stale pins are refused: RINGS with other rows, SESSIONS with another capacity.
    match loader::load(&obj, &opts(&dir.0, 5, 4096)) {
        Err(LoadError::PinMismatch {
            map,
            what,
            pinned,
            expected,
        }) => {
            assert_eq!((map, what), (map_names::RINGS, "max entries"));
            assert_eq!(
                (pinned, expected),
                (4 * u64::from(RING_SIZE_MAX), 5 * u64::from(RING_SIZE_MAX))
            );
        }
        other => panic!("expected PinMismatch, got {other:?}"),
    }
    let e = loader::load(&obj, &opts(&dir.0, 4, 8192)).unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::PinMismatch {
                map: map_names::SESSIONS,
                what: "max entries",
                pinned: 4096,
                expected: 8192
            }
        ),
        "{e}"
    );
    eprintln!("refused: {e}");
    // And the refusal left the live pins alone.
    check_state(
        &AyaMaps::open_pinned(&dir.0).unwrap(),
        &twin,
        "after refusal",
    );
}

#[test]
#[ignore = "needs root and the eBPF object"]
fn a_foreign_map_under_a_pin_name_is_refused() {
    let obj = object();
    let dir = PinDir::new("foreign");
    // Pin a map of another shape where VIPS should be: CONFIG from a load in another directory.
    let other = PinDir::new("foreign-src");
    let ebpf = loader::load(&obj, &opts(&other.0, 1, 16)).unwrap_or_else(|e| panic!("{e:?}"));
    std::fs::hard_link(other.0.join(map_names::CONFIG), dir.0.join(map_names::VIPS))
        .or_else(|_| {
            // bpffs does not support hard links everywhere: re-pin the map object instead.
            let m = aya::maps::MapData::from_pin(other.0.join(map_names::CONFIG)).unwrap();
            m.pin(dir.0.join(map_names::VIPS))
                .map_err(std::io::Error::other)
        })
        .unwrap();
    drop(ebpf);
    let e = loader::load(&obj, &opts(&dir.0, 1, 16)).unwrap_err();
    assert!(
        matches!(
            e,
            LoadError::PinMismatch {
                map: map_names::VIPS,
                what: "map type",
                ..
            }
        ),
        "{e}"
    );
    eprintln!("refused: {e}");
}

#[test]
#[ignore = "needs root and the eBPF object"]
fn pinned_state_of_another_abi_is_refused() {
    use vpnlb::dataplane::attach::{AttachError, check_abi_under};
    let obj = object();
    let root = PinDir::new("abi");
    let ours = root.0.join(format!("v{}", vpnlb_common::ABI_VERSION));
    // Nothing pinned yet, and our own version's links: fine.
    check_abi_under(&root.0, &ours).unwrap();
    let _ours_live = loader::load(&obj, &opts(&ours.join("links"), 1, 1024)).unwrap();
    check_abi_under(&root.0, &ours).unwrap();
    // A v9 set with live pins under links/ (any BPF object pinned there counts).
    let theirs = root.0.join("v9");
    let _theirs_live = loader::load(&obj, &opts(&theirs.join("links"), 1, 1024)).unwrap();
    match check_abi_under(&root.0, &ours) {
        Err(e @ AttachError::Abi { found: 9, .. }) => {
            let msg = e.to_string();
            assert!(
                msg.contains("ABI v9") && msg.contains(&theirs.display().to_string()),
                "{msg}"
            );
        }
        other => panic!("expected an ABI refusal, got {other:?}"),
    }
    // A pin dir outside the root is not concerned.
    check_abi_under(&root.0, std::path::Path::new("/sys/fs/bpf/elsewhere/v1")).unwrap();
}
