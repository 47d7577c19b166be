//! Host memory: what this process holds and may hold (MUSCLE_MEMORY_LIMIT, the cgroup's
//! memory.max, MemAvailable), and allocation that checks a size from the user or a file against
//! it before trying, so that too large is an error naming what, not an abort.

use crate::error::{Error, Result};

/// Bytes as people read them: 1.5 GiB, 640.0 MiB, 12.0 KiB, 300 B.
pub fn human(bytes: f64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024.0 {
        return format!("{bytes:.0} B");
    }
    let mut v = bytes / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// A size from the environment: bytes, or with a K, M, G or T suffix (powers of 1024).
pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (digits, shift) = match v.char_indices().last()? {
        (i, 'K' | 'k') => (&v[..i], 10),
        (i, 'M' | 'm') => (&v[..i], 20),
        (i, 'G' | 'g') => (&v[..i], 30),
        (i, 'T' | 't') => (&v[..i], 40),
        _ => (v, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1 << shift)
}

/// A field of /proc/self/status (VmRSS, VmHWM) in bytes.
fn proc_status(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..].trim_start_matches(':').trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// Resident memory of this process now.
pub fn resident_bytes() -> Option<u64> {
    proc_status("VmRSS")
}

/// The most resident memory this process has had (VmHWM).
pub fn peak_resident_bytes() -> Option<u64> {
    proc_status("VmHWM")
}

/// Starts a new peak resident memory (VmHWM) at the current resident memory (Linux's
/// `clear_refs` 5); false where the system does not offer it.
pub fn reset_peak_resident() -> bool {
    std::fs::write("/proc/self/clear_refs", b"5").is_ok()
}

/// A field of /proc/meminfo in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with(field))?;
    let kib: u64 = line[field.len()..].trim_start_matches(':').trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// A number in a cgroup file ("max" means none).
fn cgroup_value(path: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The bytes this process may hold in all, and where that figure comes from.
#[derive(Clone, Debug, PartialEq)]
pub struct Limit {
    /// Bytes the whole process may hold.
    pub bytes: u64,
    /// Where the limit comes from, for messages.
    pub source: String,
}

/// The host memory this process may hold in all (None: no limit known, or `MUSCLE_MEMORY_LIMIT=off`).
pub fn host_limit() -> Result<Option<Limit>> {
    if let Ok(v) = std::env::var("MUSCLE_MEMORY_LIMIT") {
        if v.trim() == "off" {
            return Ok(None);
        }
        let bytes = parse_size(&v).ok_or_else(|| {
            Error::usage(format!("MUSCLE_MEMORY_LIMIT={v:?}: expected a size such as 512M or 8G, or off"))
        })?;
        return Ok(Some(Limit { bytes, source: "MUSCLE_MEMORY_LIMIT".into() }));
    }
    let held = resident_bytes().unwrap_or(0);
    // cgroup v2, then v1 (v1 says "no limit" with a huge number).
    let cgroup = [
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ]
    .iter()
    .find_map(|(max, current)| {
        let max = cgroup_value(max).filter(|&m| m < 1 << 60)?;
        Some((max, max.saturating_sub(cgroup_value(current)?)))
    });
    let available = meminfo("MemAvailable");
    Ok(match (cgroup, available) {
        (Some((max, free)), Some(a)) if free <= a => {
            Some(Limit { bytes: held + free, source: format!("the cgroup's memory.max of {}", human(max as f64)) })
        }
        (_, Some(a)) => Some(Limit { bytes: held + a, source: "MemAvailable".into() }),
        (Some((max, free)), None) => {
            Some(Limit { bytes: held + free, source: format!("the cgroup's memory.max of {}", human(max as f64)) })
        }
        (None, None) => None,
    })
}

/// Checks that `bytes` more fit in host memory before allocating them (a data set to decode, a
/// checkpoint to read): an out-of-memory error naming `what` and the limit otherwise.
pub fn check_host_alloc(bytes: u64, what: impl FnOnce() -> String) -> Result<()> {
    let Some(limit) = host_limit()? else { return Ok(()) };
    let held = resident_bytes().unwrap_or(0);
    if held.saturating_add(bytes) > limit.bytes {
        return Err(Error::out_of_memory(format!(
            "{}: {} does not fit: this process holds {} and may hold {} ({})",
            what(),
            human(bytes as f64),
            human(held as f64),
            human(limit.bytes as f64),
            limit.source
        )));
    }
    Ok(())
}

/// An empty vector with room for `len` elements, or an out-of-memory error naming `what` when
/// the allocator refuses (callers check the limit first with [`check_host_alloc`]).
pub fn try_with_capacity<T>(len: usize, what: impl FnOnce() -> String) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| {
        let bytes = (len as f64) * std::mem::size_of::<T>() as f64;
        Error::out_of_memory(format!("{}: {} could not be allocated", what(), human(bytes)))
    })?;
    Ok(v)
}

/// Reads a whole file into memory, after checking that its size fits (a data set, a checkpoint).
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let len = f.metadata().map_err(|e| Error::io(path, e))?.len();
    let what = || format!("reading {}", path.display());
    check_host_alloc(len, what)?;
    let mut bytes = try_with_capacity(usize::try_from(len).unwrap_or(usize::MAX), what)?;
    f.read_to_end(&mut bytes).map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_and_print() {
        assert_eq!(parse_size("512M"), Some(512 << 20));
        assert_eq!(parse_size("3g"), Some(3 << 30));
        assert_eq!(parse_size("1000"), Some(1000));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("99999999999T"), None);
        assert_eq!(human(300.0), "300 B");
        assert_eq!(human(1536.0), "1.5 KiB");
        assert_eq!(human(2.5 * (1u64 << 40) as f64), "2.5 TiB");
    }

    #[test]
    fn this_process_reports_its_resident_memory() {
        let rss = resident_bytes().expect("VmRSS");
        let peak = peak_resident_bytes().expect("VmHWM");
        assert!(rss > 1 << 20 && peak >= rss, "rss {rss}, peak {peak}");
    }

    #[test]
    fn fallible_allocation_refuses_what_cannot_exist() {
        let e = try_with_capacity::<u8>(usize::MAX / 2, || "a test buffer".into()).expect_err("too large");
        assert_eq!(e.kind(), crate::error::ErrorKind::OutOfMemory);
        assert!(e.to_string().contains("a test buffer"), "{e}");
        if host_limit().ok().flatten().is_some() {
            let e = check_host_alloc(u64::MAX / 2, || "a test buffer".into()).expect_err("over any limit");
            assert_eq!(e.kind(), crate::error::ErrorKind::OutOfMemory);
            assert!(e.to_string().contains("a test buffer"), "{e}");
        }
        let v = try_with_capacity::<u16>(5, || "small".into()).expect("fits");
        assert!(v.is_empty() && v.capacity() >= 5);
    }
}
