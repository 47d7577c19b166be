//! Fault injection for tests, from the environment variable `MUSCLE_FAULT` (read once):
//! `disk@BYTES` makes the run-folder writes fail with ENOSPC once BYTES bytes have been written in
//! all, as a disk that fills mid-run does; `alloc@STEP` makes the batch of step STEP (counting
//! from 1, as metrics.jsonl does) fail to allocate; `kill@STEP` makes the last process of a
//! data-parallel run SIGKILL itself after step STEP (a rank that dies); `allreduce@STEP` skips the
//! gradients' all-reduce of step STEP (the replicas then part, which the run must notice).
//! Several may be given, comma-separated. Unset, the writes and batches behave normally; the real
//! error paths run either way.

use crate::error::{Error, Result};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The environment variable read.
pub const VAR: &str = "MUSCLE_FAULT";

/// The faults asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// Bytes the run-folder writes may write in all before the disk is "full".
    pub disk: Option<u64>,
    /// The step (from 1) whose batch cannot be allocated.
    pub alloc: Option<u64>,
    /// The step (from 1) after which the last process of the run kills itself.
    pub kill: Option<u64>,
    /// The step (from 1) whose gradients are not all-reduced.
    pub allreduce: Option<u64>,
}

impl Faults {
    /// Parses `disk@BYTES`, `alloc@STEP` or both, comma-separated; anything else is a usage error.
    pub fn parse(s: &str) -> Result<Faults> {
        let bad = |part: &str| {
            Error::usage(format!(
                "{VAR}={s}: '{part}' is not disk@BYTES, alloc@STEP, kill@STEP or allreduce@STEP (comma-separated)"
            ))
        };
        let mut f = Faults::default();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (kind, n) = part.split_once('@').ok_or_else(|| bad(part))?;
            let n: u64 = n.parse().map_err(|_| bad(part))?;
            match kind {
                "disk" => f.disk = Some(n),
                "alloc" if n > 0 => f.alloc = Some(n),
                "kill" if n > 0 => f.kill = Some(n),
                "allreduce" if n > 0 => f.allreduce = Some(n),
                _ => return Err(bad(part)),
            }
        }
        Ok(f)
    }
}

/// `MUSCLE_FAULT`, parsed on first use.
fn env() -> &'static Result<Faults> {
    static FAULTS: OnceLock<Result<Faults>> = OnceLock::new();
    FAULTS.get_or_init(|| match std::env::var(VAR) {
        Ok(s) => Faults::parse(&s),
        Err(std::env::VarError::NotPresent) => Ok(Faults::default()),
        Err(std::env::VarError::NotUnicode(_)) => Err(Error::usage(format!("{VAR} is not valid UTF-8"))),
    })
}

/// A malformed `MUSCLE_FAULT` as a usage error; main calls it before any command runs, so the
/// hooks below can treat a malformed value as no fault.
pub fn check_env() -> Result<()> {
    env().as_ref().map(|_| ()).map_err(Clone::clone)
}

/// The faults in effect (none when `MUSCLE_FAULT` is unset or malformed).
fn faults() -> Faults {
    env().as_ref().copied().unwrap_or_default()
}

/// Whether the batch of step `step` (from 1) is to fail as if it could not be allocated.
pub fn alloc_fails_at(step: u64) -> bool {
    faults().alloc == Some(step)
}

/// Whether the last process of a data-parallel run is to die after step `step` (from 1).
pub fn kill_after(step: u64) -> bool {
    faults().kill == Some(step)
}

/// Whether the gradients of step `step` (from 1) are to skip the all-reduce.
pub fn allreduce_skipped_at(step: u64) -> bool {
    faults().allreduce == Some(step)
}

/// SIGKILL to this process, as the kernel's OOM killer or a lost node delivers it: no unwinding,
/// no flush, nothing after it runs.
pub fn kill_self() -> ! {
    let pid = std::process::id().to_string();
    let _ = std::process::Command::new("kill").args(["-KILL", &pid]).status();
    // The signal is on its way; never return into the run.
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Bytes written so far by the run-folder writes of this process.
static WRITTEN: AtomicU64 = AtomicU64::new(0);

/// `w.write_all(bytes)` for a file of a run folder: under `disk@BYTES` it writes only what is left
/// of the budget and then fails with ENOSPC, as a full disk does.
pub fn write_all(w: &mut impl Write, bytes: &[u8]) -> std::io::Result<()> {
    match faults().disk {
        None => w.write_all(bytes),
        Some(budget) => write_within(w, bytes, budget, &WRITTEN),
    }
}

/// Writes what `budget` leaves after the `written` bytes counted so far, then ENOSPC if that was
/// not all of `bytes`; every later write fails too (the disk stays full).
fn write_within(w: &mut impl Write, bytes: &[u8], budget: u64, written: &AtomicU64) -> std::io::Result<()> {
    let before = written.fetch_add(bytes.len() as u64, Ordering::SeqCst);
    let room = usize::try_from(budget.saturating_sub(before)).unwrap_or(usize::MAX);
    if room >= bytes.len() {
        return w.write_all(bytes);
    }
    w.write_all(&bytes[..room])?;
    Err(std::io::Error::from_raw_os_error(28))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds_and_rejects_the_rest() {
        assert_eq!(Faults::parse("").expect("empty"), Faults::default());
        assert_eq!(Faults::parse("disk@100").expect("disk"), Faults { disk: Some(100), ..Faults::default() });
        assert_eq!(
            Faults::parse("alloc@3, disk@0, kill@5").expect("all three"),
            Faults { disk: Some(0), alloc: Some(3), kill: Some(5), allreduce: None }
        );
        for bad in ["disk", "disk@", "disk@x", "disk@-1", "alloc@0", "kill@0", "mem@3", "disk@1,oops"] {
            let e = Faults::parse(bad).expect_err(bad);
            assert_eq!(e.kind(), crate::error::ErrorKind::Usage, "{bad}");
            assert!(e.message().contains("MUSCLE_FAULT"), "{e}");
        }
    }

    #[test]
    fn a_write_past_the_budget_writes_up_to_it_then_fails_with_enospc() {
        let written = AtomicU64::new(0);
        let mut out = Vec::new();
        write_within(&mut out, b"abcd", 6, &written).expect("within budget");
        let e = write_within(&mut out, b"efgh", 6, &written).expect_err("past the budget");
        assert_eq!(e.raw_os_error(), Some(28));
        assert_eq!(out, b"abcdef");
        // The disk stays full: later writes fail too.
        assert!(write_within(&mut out, b"i", 6, &written).is_err());
        assert_eq!(out, b"abcdef");
        // Exactly filling the budget succeeds.
        let mut exact = Vec::new();
        write_within(&mut exact, b"xyz", 3, &AtomicU64::new(0)).expect("exact fit");
        assert_eq!(exact, b"xyz");
    }
}
