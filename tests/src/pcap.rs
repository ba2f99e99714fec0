//! Minimal classic-pcap reader and writer (Ethernet link type): reads the real VPN captures under
//! ../shared/captures (beside the repository) and writes input/expected/actual frames of a failing fixture.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

const MAGIC_US: u32 = 0xa1b2_c3d4;
const MAGIC_NS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;

/// One captured frame.
#[derive(Clone, Debug)]
pub struct Record {
    pub ts_sec: u32,
    pub ts_frac: u32,
    pub data: Vec<u8>,
}

/// Parses a classic pcap file (either byte order, µs or ns timestamps).
pub fn parse(buf: &[u8]) -> Result<Vec<Record>, String> {
    if buf.len() < 24 {
        return Err("pcap shorter than its global header".into());
    }
    let le = u32::from_le_bytes(buf[0..4].try_into().unwrap());
    let be = u32::from_be_bytes(buf[0..4].try_into().unwrap());
    let little = match (le, be) {
        (MAGIC_US | MAGIC_NS, _) => true,
        (_, MAGIC_US | MAGIC_NS) => false,
        _ => return Err(format!("not a classic pcap (magic {le:#x})")),
    };
    let rd = |b: &[u8]| {
        let a: [u8; 4] = b.try_into().unwrap();
        if little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let linktype = rd(&buf[20..24]);
    if linktype != LINKTYPE_ETHERNET {
        return Err(format!("link type {linktype}, want 1 (Ethernet)"));
    }
    let mut out = Vec::new();
    let mut off = 24;
    while off + 16 <= buf.len() {
        let ts_sec = rd(&buf[off..off + 4]);
        let ts_frac = rd(&buf[off + 4..off + 8]);
        let incl = rd(&buf[off + 8..off + 12]) as usize;
        off += 16;
        let data = buf
            .get(off..off + incl)
            .ok_or_else(|| format!("record at {off} runs past the end"))?;
        out.push(Record {
            ts_sec,
            ts_frac,
            data: data.to_vec(),
        });
        off += incl;
    }
    if off != buf.len() {
        return Err(format!("{} trailing bytes", buf.len() - off));
    }
    Ok(out)
}

/// Reads a pcap file, panicking with the path on error (fixtures use real captures as input).
pub fn read(path: impl AsRef<Path>) -> Vec<Record> {
    let path = path.as_ref();
    let buf = std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    parse(&buf).unwrap_or_else(|e| panic!("parsing {}: {e}", path.display()))
}

/// Serialises frames as a little-endian µs pcap; frame i gets timestamp i seconds.
pub fn to_bytes(frames: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC_US.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&65535u32.to_le_bytes());
    out.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    for (i, f) in frames.iter().enumerate() {
        out.extend_from_slice(&(i as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(&(f.len() as u32).to_le_bytes());
        out.extend_from_slice(f);
    }
    out
}

pub fn write(path: impl AsRef<Path>, frames: &[&[u8]]) -> io::Result<()> {
    let path = path.as_ref();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::File::create(path)?.write_all(&to_bytes(frames))
}

/// Directory of the shared real-traffic captures: `VPNLB_CAPTURES`, else `shared/captures` beside
/// the repository (where CI and the developers' machines have it).
pub fn captures_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("VPNLB_CAPTURES") {
        return PathBuf::from(d);
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/captures")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let a = [1u8, 2, 3];
        let b = [9u8; 70];
        let recs = parse(&to_bytes(&[&a, &b])).unwrap();
        assert_eq!(recs.len(), 2);
        assert_eq!(recs[0].data, a);
        assert_eq!(recs[1].data, b);
        assert_eq!(recs[1].ts_sec, 1);
    }
}
