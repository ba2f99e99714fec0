//! The few raw bpf(2) commands aya 0.14 does not expose: batch update/lookup on arrays and hash
//! maps, and element delete on a DEVMAP (include/uapi/linux/bpf.h, `union bpf_attr`).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
/// The kernel's internal "operation not supported" (not in libc).
const ENOTSUPP: i32 = 524;

/// `bpf_attr.batch`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// The anonymous `bpf_attr` struct of the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is a valid, initialised `#[repr(C)]` prefix of `union bpf_attr` for `cmd`
    // and its size is passed; every pointer inside it refers to live buffers of the sizes the
    // kernel derives from the map's key/value sizes (checked by the callers).
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// True when the kernel does not offer batch operations for this map.
pub(super) fn batch_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP)
    )
}

/// `BPF_MAP_UPDATE_BATCH` of u32 keys to u32 values (an array of u32). On failure returns how
/// many elements were written first.
pub(super) fn update_batch(
    fd: BorrowedFd<'_>,
    keys: &[u32],
    values: &[u32],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        done += attr.count as usize;
        if let Err(e) = r {
            // EINTR-style partial progress is retried; anything else is reported.
            if e.raw_os_error() == Some(libc::EINTR) || e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err((done, e));
        }
        if attr.count == 0 {
            return Err((done, io::Error::from_raw_os_error(libc::EIO)));
        }
    }
    Ok(())
}

/// `BPF_MAP_LOOKUP_BATCH` of `n` consecutive u32 keys of an array starting at `start`.
pub(super) fn lookup_batch<V: Copy + Default>(
    fd: BorrowedFd<'_>,
    start: u32,
    n: u32,
) -> io::Result<Vec<V>> {
    let mut keys = vec![0u32; n as usize];
    let mut values = vec![V::default(); n as usize];
    let mut got = 0usize;
    // For arrays the batch cursor is the last key read: iteration resumes at cursor + 1.
    let mut cursor: u32 = start.wrapping_sub(1);
    let mut out: u32 = 0;
    while got < n as usize {
        let mut attr = BatchAttr {
            in_batch: if got == 0 && start == 0 {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut out as *mut u32 as u64,
            keys: keys[got..].as_mut_ptr() as u64,
            values: values[got..].as_mut_ptr() as u64,
            count: (n as usize - got) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        got += attr.count as usize;
        cursor = out;
        match r {
            Ok(()) => {}
            // ENOENT: the end of the array was reached.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => break,
            Err(e) => return Err(e),
        }
        if attr.count == 0 {
            break;
        }
    }
    if got != n as usize
        || keys
            .iter()
            .enumerate()
            .any(|(i, k)| *k != start.wrapping_add(i as u32))
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok(values)
}

/// Every (key, value) of a hash map (also LRU) by `BPF_MAP_LOOKUP_BATCH`, `chunk` entries per
/// call: one syscall per chunk instead of two per entry. The cursor is the kernel's bucket index
/// (a u32). A bucket with more entries than fit (ENOSPC) is retried with a bigger chunk. Entries
/// inserted or deleted meanwhile may or may not be seen, as with any iteration of a live map.
pub(super) fn dump_hash<K: Copy + Default, V: Copy + Default>(
    fd: BorrowedFd<'_>,
    chunk: usize,
) -> io::Result<Vec<(K, V)>> {
    let mut chunk = chunk.max(16);
    let mut out = Vec::new();
    let mut keys = vec![K::default(); chunk];
    let mut values = vec![V::default(); chunk];
    let mut cursor: u32 = 0;
    let mut next: u32 = 0;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                &cursor as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
        let n = attr.count as usize;
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match r {
            Ok(()) => {}
            // The last bucket was read.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            // A bucket does not fit: the same cursor again with room for it.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && n == 0 => {
                chunk *= 2;
                keys = vec![K::default(); chunk];
                values = vec![V::default(); chunk];
                continue;
            }
            Err(e) => return Err(e),
        }
        first = false;
        cursor = next;
    }
}

/// `BPF_MAP_UPDATE_BATCH` of `keys[i] -> values[i]` into a hash map (BPF_ANY). On failure
/// returns how many were written first.
pub(super) fn update_hash_batch<K, V>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len());
    let mut done = 0usize;
    while done < keys.len() {
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: (keys.len() - done) as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        let r = bpf(BPF_MAP_UPDATE_BATCH, &mut attr);
        done += attr.count as usize;
        match r {
            Ok(()) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINTR | libc::EAGAIN)) => continue,
            Err(e) => return Err((done, e)),
        }
        if attr.count == 0 {
            return Err((done, io::Error::from_raw_os_error(libc::EIO)));
        }
    }
    Ok(())
}

pub(super) fn delete_elem(fd: BorrowedFd<'_>, key: &u32) -> io::Result<()> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key as *const u32 as u64,
        ..Default::default()
    };
    bpf(BPF_MAP_DELETE_ELEM, &mut attr)
}
