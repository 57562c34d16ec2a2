//! A lean reader of the process table in `/proc`, for process watches.
//!
//! Owns one reusable read buffer; every read is one `open` + `read` of a small file (the
//! `stat` of processes read every cycle stays open: one `pread`). It
//! reads only what watches need: `/proc/PID/stat` (name, state, start time, CPU time,
//! RSS) for every process during discovery, and the executable link or the command line
//! only for the few processes whose name could match (or for command-line patterns,
//! cached per process identity). A node with 20 000 processes is scanned in a small
//! fraction of a second. It does not decide what matches (see `sample`).

use std::ffi::OsString;
use std::io::Read;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// Longest command line read, bytes; the rest is ignored.
pub const MAX_CMDLINE: usize = 64 * 1024;

/// One process's `/proc/PID/stat`, the fields watches use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    /// Process ID.
    pub pid: u32,
    /// The kernel's name of the process (`comm`, at most 15 bytes; not always UTF-8).
    pub comm: Vec<u8>,
    /// State letter: `R`, `S`, `D`, `Z` (zombie), `X` (dead), …
    pub state: u8,
    /// Start time, clock ticks since boot: with the PID, the process identity.
    pub start_ticks: u64,
    /// CPU time in user and kernel mode, clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, pages.
    pub rss_pages: u64,
}

impl ProcStat {
    /// Zombies and dead processes are not running.
    pub fn is_live(&self) -> bool {
        !matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses the text of `/proc/PID/stat`. The name is between the first `(` and the last
/// `)` (it may itself contain spaces and parentheses); fields after it are numbered as in
/// proc(5) from field 3 (state).
pub fn parse_stat(pid: u32, text: &[u8]) -> Option<ProcStat> {
    let open = text.iter().position(|&b| b == b'(')?;
    let close = text.iter().rposition(|&b| b == b')')?;
    let comm = text.get(open + 1..close)?.to_vec();
    let rest = std::str::from_utf8(text.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.bytes().next()?;
    // Fields 4.. : ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt
    // utime(14) stime(15) cutime cstime priority nice num_threads itrealvalue
    // starttime(22) vsize(23) rss(24).
    let mut nth = |skip: usize| -> Option<u64> { fields.nth(skip)?.parse().ok() };
    let utime = nth(10)?;
    let stime = nth(0)?;
    let start_ticks = nth(6)?;
    let rss_pages = u64::try_from(fields_rss(&mut fields)?).unwrap_or(0);
    Some(ProcStat {
        pid,
        comm,
        state,
        start_ticks,
        cpu_ticks: utime.saturating_add(stime),
        rss_pages,
    })
}

fn fields_rss<'a>(fields: &mut impl Iterator<Item = &'a str>) -> Option<i64> {
    // After starttime: vsize, then rss (signed in the kernel's format).
    fields.next()?;
    fields.next()?.parse().ok()
}

/// Most `/proc/PID/stat` files a [`ProcReader`] keeps open for [`ProcReader::stat_kept`]
/// (well under the usual 1024 open files); PIDs beyond it are opened at each read.
pub const MAX_KEPT_STATS: usize = 256;

/// Reads `/proc`; see the module docs.
#[derive(Debug)]
pub struct ProcReader {
    root: PathBuf,
    buf: Vec<u8>,
    /// `/proc/PID/stat` of the processes read every cycle, kept open (see
    /// [`ProcReader::stat_kept`]).
    kept: std::collections::HashMap<u32, std::fs::File>,
}

impl Default for ProcReader {
    fn default() -> Self {
        Self::new(PathBuf::from("/proc"))
    }
}

impl ProcReader {
    /// A reader of the proc filesystem mounted at `root`.
    pub fn new(root: PathBuf) -> Self {
        ProcReader {
            root,
            buf: Vec::with_capacity(4096),
            kept: std::collections::HashMap::new(),
        }
    }

    /// Every process ID listed now (threads are not listed at the top level).
    pub fn pids(&self) -> Vec<u32> {
        let Ok(dir) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        dir.flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .collect()
    }

    fn read(&mut self, pid: u32, file: &str, limit: usize) -> Option<&[u8]> {
        self.buf.clear();
        let f = std::fs::File::open(self.root.join(pid.to_string()).join(file)).ok()?;
        f.take(limit as u64).read_to_end(&mut self.buf).ok()?;
        Some(&self.buf)
    }

    /// `/proc/PID/stat`, parsed; `None` when the process is gone.
    pub fn stat(&mut self, pid: u32) -> Option<ProcStat> {
        // One read(2): the kernel generates the whole line (well under 4 KiB) at once, where
        // read_to_end would ask a second time for the end of file (watched processes are
        // read every cycle).
        let mut f = std::fs::File::open(self.root.join(pid.to_string()).join("stat")).ok()?;
        self.buf.resize(4096, 0);
        let n = f.read(&mut self.buf).ok()?;
        parse_stat(pid, &self.buf[..n])
    }

    /// [`stat`](Self::stat) for a process read every cycle: its `/proc/PID/stat` stays
    /// open and is read again from offset 0 (one `pread` instead of `open` + `read` +
    /// `close`; up to [`MAX_KEPT_STATS`] processes). An open file stays bound to its
    /// process: once that process is gone the read fails, and the PID is opened afresh,
    /// so a new process that reuses the PID is read as itself.
    pub fn stat_kept(&mut self, pid: u32) -> Option<ProcStat> {
        use std::os::unix::fs::FileExt;
        self.buf.resize(4096, 0);
        if let Some(f) = self.kept.get(&pid) {
            match f.read_at(&mut self.buf, 0) {
                Ok(n) if n > 0 => return parse_stat(pid, &self.buf[..n]),
                _ => {
                    self.kept.remove(&pid);
                }
            }
        }
        let f = std::fs::File::open(self.root.join(pid.to_string()).join("stat")).ok()?;
        let n = f.read_at(&mut self.buf, 0).ok()?;
        let stat = parse_stat(pid, &self.buf[..n]);
        if stat.is_some() && self.kept.len() < MAX_KEPT_STATS {
            self.kept.insert(pid, f);
        }
        stat
    }

    /// Closes the kept `/proc/PID/stat` of every process not in `pids` (sorted).
    pub fn keep_only(&mut self, pids: &[u32]) {
        self.kept.retain(|pid, _| pids.binary_search(pid).is_ok());
    }

    /// File name of the process's executable (`/proc/PID/exe`); `None` for kernel
    /// threads, gone processes, or without permission.
    pub fn exe_name(&self, pid: u32) -> Option<OsString> {
        let target = std::fs::read_link(self.root.join(pid.to_string()).join("exe")).ok()?;
        target.file_name().map(std::ffi::OsStr::to_os_string)
    }

    /// The arguments (`/proc/PID/cmdline`, at most [`MAX_CMDLINE`] bytes).
    pub fn cmdline(&mut self, pid: u32) -> Option<Vec<OsString>> {
        let raw = self.read(pid, "cmdline", MAX_CMDLINE)?;
        let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
        if raw.is_empty() {
            return Some(Vec::new());
        }
        Some(
            raw.split(|&b| b == 0)
                .map(|a| OsString::from_vec(a.to_vec()))
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parentheses_in_the_name() {
        let text = b"4242 (we (ird) name) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                     7 3 0 0 20 0 1 0 123456 10000000 250 18446744073709551615";
        let s = parse_stat(4242, text).expect("parses");
        assert_eq!(s.comm, b"we (ird) name");
        assert_eq!(s.state, b'S');
        assert_eq!(s.cpu_ticks, 10);
        assert_eq!(s.start_ticks, 123_456);
        assert_eq!(s.rss_pages, 250);
        assert!(s.is_live());
        let z =
            parse_stat(1, b"1 (x) Z 0 0 0 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 9 0 0").expect("parses");
        assert!(!z.is_live());
        assert_eq!(parse_stat(1, b"garbage"), None);
        assert_eq!(parse_stat(1, b"1 (x) S 1 2"), None);
    }

    #[test]
    fn reads_this_process() {
        let mut r = ProcReader::default();
        let me = std::process::id();
        assert!(r.pids().contains(&me));
        let s = r.stat(me).expect("own stat");
        assert!(s.is_live() && s.rss_pages > 0 && s.start_ticks > 0);
        let args = r.cmdline(me).expect("own cmdline");
        assert!(!args.is_empty());
        assert!(r.exe_name(me).is_some());
        assert_eq!(r.stat(u32::MAX), None);
    }

    #[test]
    fn a_kept_stat_follows_its_process_and_not_a_reused_pid() {
        let mut r = ProcReader::default();
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let first = r.stat_kept(pid).expect("child stat");
        assert!(first.is_live());
        // Read again through the kept file: the same process.
        let again = r.stat_kept(pid).expect("kept stat");
        assert_eq!(again.start_ticks, first.start_ticks);
        child.kill().expect("kill");
        child.wait().expect("reap");
        // Gone and reaped: the kept file fails and the fresh open finds nothing.
        assert_eq!(r.stat_kept(pid), None);
        assert!(r.kept.is_empty());
        let me = std::process::id();
        assert!(r.stat_kept(me).is_some());
        r.keep_only(&[]);
        assert!(r.kept.is_empty());
    }
}
