//! Host-level metrics read directly from the kernel: CPU, memory, load average and disks.
//!
//! Owns the parsing of `/proc/stat`, `/proc/meminfo`, `/proc/loadavg` and
//! `/proc/self/mountinfo`, the `statvfs(2)` of each reported filesystem, and the previous
//! `/proc/stat` counters that CPU percentages are differences of. It does not evaluate
//! thresholds, schedule itself nor know about config files: the caller builds a
//! [`HostSampler`] once and calls [`HostSampler::sample`] every cycle on a blocking thread.
//!
//! It is built to be cheap at a 1 s interval: each `/proc` file is kept open and re-read
//! from offset 0 with one `pread` into a buffer that is reused across cycles (the kernel
//! regenerates a `/proc` file's text on every read at offset 0); parsing works on that
//! buffer without copying, and only the values that leave the sampler allocate.
//!
//! | value | unit | source |
//! |---|---|---|
//! | [`CpuUsage::busy_pct`] | % 0–100 of all online cores | `/proc/stat` `cpu` line, Δ between two samples (or over a sliding window: [`HostSampler::set_cpu_window`]) |
//! | [`CpuUsage::iowait_pct`] | % 0–100 of all cores' time | `/proc/stat` `cpu` line, iowait field |
//! | [`CpuUsage::steal_pct`] | % 0–100 of all cores' time | `/proc/stat` `cpu` line, steal field |
//! | [`CpuUsage::per_core_busy_pct`] | % 0–100 of one core, indexed by CPU number | `/proc/stat` `cpuN` lines |
//! | [`MemoryUsage::used_pct`] | % 0–100 of RAM | `/proc/meminfo` (MemTotal − MemAvailable) / MemTotal |
//! | [`MemoryUsage::total_bytes`], [`MemoryUsage::available_bytes`] | bytes | `/proc/meminfo` MemTotal, MemAvailable |
//! | [`MemoryUsage::swap_used_pct`] | % 0–100 of swap | `/proc/meminfo` (SwapTotal − SwapFree) / SwapTotal |
//! | [`MemoryUsage::swap_total_bytes`] | bytes | `/proc/meminfo` SwapTotal |
//! | [`LoadAverage::one`], `five`, `fifteen` | runnable + uninterruptible tasks (not %) | `/proc/loadavg` |
//! | [`LoadAverage::cores`] | online CPUs | number of `cpuN` lines in `/proc/stat` |
//! | [`DiskUsage::mount`], `device`, `fstype` | text | `/proc/self/mountinfo` |
//! | [`DiskUsage::used_pct`] | % 0–100 of the space non-root users can use (as `df`) | `statvfs(2)` |
//! | [`DiskUsage::inodes_used_pct`] | % 0–100 of inodes | `statvfs(2)` |
//! | [`DiskUsage::total_bytes`], [`DiskUsage::avail_bytes`] | bytes | `statvfs(2)` blocks × fragment size |
//!
//! Every path is read under a configurable root (normally `/`), so the parsers run on
//! fixture files in tests, and an agent in a container can read the host's `/proc` and
//! filesystems mounted at, say, `/host`.

mod cpu;
mod disk;
mod load;
mod memory;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use cpu::CpuUsage;
pub use disk::{DiskOptions, DiskUsage, IMAGE_FSTYPES, NETWORK_FSTYPES, PSEUDO_FSTYPES};
pub use load::LoadAverage;
pub use memory::MemoryUsage;

/// One sampling cycle's host values.
///
/// Each source fails on its own: a value that could not be read is `None` (or a disk is
/// missing from `disks`) and the reason is in `errors`; the other values are still there.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostSample {
    /// CPU usage since the previous sample, or — with
    /// [`set_cpu_window`](HostSampler::set_cpu_window) — busy, iowait and steal over the
    /// last window (per core: since the previous sample). `None` on the first cycle, or
    /// until a reading one window old exists (a usage needs two readings — never a fake
    /// 0), when `/proc/stat` could not be read, or when its total
    /// counters went backwards (CPU hotplug, counter wrap) or did not move.
    pub cpu: Option<CpuUsage>,
    /// RAM and swap; `None` when `/proc/meminfo` could not be read or has no MemTotal.
    pub memory: Option<MemoryUsage>,
    /// Load averages; `None` when `/proc/loadavg` could not be read.
    pub load: Option<LoadAverage>,
    /// One entry per reported filesystem (see [`DiskOptions`] for which ones), in
    /// mountinfo order, or in `include_mounts` order when that list is set.
    pub disks: Vec<DiskUsage>,
    /// Human-readable reasons for what is missing above, each naming its source, e.g.
    /// `"statvfs /mnt/x: Permission denied (os error 13)"`. Empty when all went well.
    pub errors: Vec<String>,
}

/// Reads host metrics from the kernel; see the module docs.
///
/// Holds the open `/proc` files with their reused buffers, the previous `/proc/stat`
/// counters and the disk selection.
#[derive(Debug)]
pub struct HostSampler {
    stat: ProcFile,
    meminfo: ProcFile,
    loadavg: ProcFile,
    cpu: cpu::CpuTracker,
    disks: disk::DiskScanner,
    /// Origin of the monotonic times of the CPU readings.
    epoch: std::time::Instant,
}

impl HostSampler {
    /// A sampler reading `ROOT/proc/stat`, `ROOT/proc/meminfo`, `ROOT/proc/loadavg` and
    /// `ROOT/proc/self/mountinfo`, and calling `statvfs` on `ROOT` + each mount point.
    /// `root` is `/` normally. Opens nothing yet: files are opened by the first
    /// [`sample`](Self::sample) (and reopened after a read error).
    pub fn new(root: PathBuf, disk: DiskOptions) -> Self {
        let proc = root.join("proc");
        HostSampler {
            stat: ProcFile::new(proc.join("stat")),
            meminfo: ProcFile::new(proc.join("meminfo")),
            loadavg: ProcFile::new(proc.join("loadavg")),
            cpu: cpu::CpuTracker::default(),
            disks: disk::DiskScanner::new(&root, proc.join("self").join("mountinfo"), disk),
            epoch: std::time::Instant::now(),
        }
    }

    /// Makes [`HostSample::cpu`]'s busy, iowait and steal percentages (and
    /// [`cpu_busy`](Self::cpu_busy)) cover the last `window` of monotonic time instead of
    /// the time since the previous reading, with `step` the time between readings
    /// (a baseline may be up to half a step younger than `window`: timer jitter). Per-core
    /// values still cover the time since the previous [`sample`](Self::sample).
    pub fn set_cpu_window(&mut self, window: Duration, step: Duration) {
        self.cpu.set_window(window, step / 2);
    }

    /// A sub-interval CPU reading: one `pread` of `/proc/stat`, only its aggregate `cpu`
    /// line parsed, kept in the window's ring. Returns the busy percent 0–100 over the
    /// window set by [`set_cpu_window`](Self::set_cpu_window); `None` during warm-up (no
    /// reading old enough yet), right after the counters went backwards, or when the
    /// file cannot be read or parsed (the next [`sample`](Self::sample) reports why).
    /// Blocking only as much as a `/proc` read; allocates nothing once running.
    pub fn cpu_busy(&mut self) -> Option<f64> {
        let now = self.epoch.elapsed();
        let text = self.stat.read_text().ok()?;
        self.cpu.step(text, now).ok().flatten()
    }

    /// Reads every source once and returns the values. Blocking (file reads and
    /// `statvfs`): call it on a blocking thread. Never panics on odd kernel text; a
    /// failing source shows up in [`HostSample::errors`].
    pub fn sample(&mut self) -> HostSample {
        let mut errors = Vec::new();

        let mut online = None;
        let cpu = match self.stat.read_text() {
            Ok(text) => match self.cpu.update_at(text, self.epoch.elapsed()) {
                Ok(reading) => {
                    online = (reading.online > 0).then_some(reading.online);
                    errors.extend(reading.note);
                    reading.usage
                }
                Err(e) => {
                    errors.push(format!("parse {}: {e}", self.stat.path.display()));
                    None
                }
            },
            Err(e) => {
                errors.push(format!("read {}: {e}", self.stat.path.display()));
                None
            }
        };

        let memory = match self.meminfo.read_text() {
            Ok(text) => match memory::parse(text) {
                Ok(m) => Some(m.usage()),
                Err(e) => {
                    errors.push(format!("parse {}: {e}", self.meminfo.path.display()));
                    None
                }
            },
            Err(e) => {
                errors.push(format!("read {}: {e}", self.meminfo.path.display()));
                None
            }
        };

        // Online CPUs come from this cycle's /proc/stat; without it, the CPUs this
        // process may run on (which a cpuset or affinity mask can make fewer).
        let cores = online.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
        });
        let load = match self.loadavg.read_text() {
            Ok(text) => match load::parse(text, cores) {
                Ok(l) => Some(l),
                Err(e) => {
                    errors.push(format!("parse {}: {e}", self.loadavg.path.display()));
                    None
                }
            },
            Err(e) => {
                errors.push(format!("read {}: {e}", self.loadavg.path.display()));
                None
            }
        };

        let disks = self.disks.scan(&mut errors);

        HostSample {
            cpu,
            memory,
            load,
            disks,
            errors,
        }
    }
}

/// Buffer size a [`ProcFile`] starts with; it doubles until a whole file fits, then
/// keeps that size.
const INITIAL_READ_BUFFER: usize = 8 * 1024;

/// `statfs(2)` type of the proc filesystem (`PROC_SUPER_MAGIC`; `f_type` is an `i64`
/// on 64-bit Linux).
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// A `/proc` file kept open and re-read whole, from offset 0, into a reused buffer.
#[derive(Debug)]
struct ProcFile {
    path: PathBuf,
    file: Option<File>,
    /// Always fully initialised: its length is the size offered to `pread`.
    buf: Vec<u8>,
    /// A mount table (`/proc/PID/mountinfo`): re-read only when `poll(2)` says it changed.
    mount_table: bool,
    /// Length of the last whole read, while it is known to be current (the open file
    /// is a mount table on procfs, which reports each change as `POLLPRI`).
    current: Option<usize>,
}

impl ProcFile {
    fn new(path: PathBuf) -> Self {
        ProcFile {
            path,
            file: None,
            buf: Vec::new(),
            mount_table: false,
            current: None,
        }
    }

    /// A mount table (`/proc/self/mountinfo`): when it is on procfs, it is read again
    /// only after the kernel reported a change of the mount namespace (proc(5): the
    /// file polls `POLLPRI | POLLERR` once after each mount or unmount), where
    /// generating its text every cycle was the largest part of the agent's kernel time
    /// (issue 3, agent CPU). Anything else (a test's regular file) is read every time.
    fn mount_table(path: PathBuf) -> Self {
        ProcFile {
            mount_table: true,
            ..Self::new(path)
        }
    }

    /// True when the mount table read last is still the current one: no change was
    /// polled since (a failed poll counts as a change).
    fn unchanged(file: &File) -> bool {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(file, PollFlags::PRI)];
        let now = Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&now)) {
            Ok(0) => true,
            Ok(_) => !fds[0]
                .revents()
                .intersects(PollFlags::PRI | PollFlags::ERR | PollFlags::NVAL),
            Err(_) => false,
        }
    }

    /// The whole file, read with one `pread` at offset 0 once the buffer is big enough.
    ///
    /// A short read means the end of the file: true for regular files and for the
    /// kernel's seq_file-backed `/proc` files, which fill the buffer as far as they can.
    /// After an error the file is closed, so the next call reopens it.
    fn read(&mut self) -> io::Result<&[u8]> {
        self.read_with_path().1
    }

    /// [`read`](Self::read), with the path alongside for messages (borrowed, not cloned).
    fn read_with_path(&mut self) -> (&Path, io::Result<&[u8]>) {
        let ProcFile {
            path,
            file,
            buf,
            mount_table,
            current,
        } = self;
        if let (Some(open), Some(len)) = (file.as_ref(), *current)
            && Self::unchanged(open)
        {
            return (path, Ok(&buf[..len]));
        }
        *current = None;
        // Taken out while reading: an error drops (closes) it, success puts it back.
        let open = match file.take() {
            Some(f) => f,
            None => match File::open(&*path) {
                Ok(f) => f,
                Err(e) => return (path, Err(e)),
            },
        };
        if buf.is_empty() {
            buf.resize(INITIAL_READ_BUFFER, 0);
        }
        let mut filled = 0;
        loop {
            if filled == buf.len() {
                let bigger = buf.len() * 2;
                buf.resize(bigger, 0);
            }
            match open.read_at(&mut buf[filled..], filled as u64) {
                Ok(0) => break,
                Ok(n) => {
                    filled += n;
                    if filled < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return (path, Err(e)),
            }
        }
        if *mount_table && rustix::fs::fstatfs(&open).is_ok_and(|fs| fs.f_type == PROC_SUPER_MAGIC)
        {
            *current = Some(filled);
        }
        *file = Some(open);
        (path, Ok(&buf[..filled]))
    }

    /// [`read`](Self::read) as UTF-8 (`/proc/stat`, `meminfo` and `loadavg` are ASCII).
    fn read_text(&mut self) -> io::Result<&str> {
        let bytes = self.read()?;
        std::str::from_utf8(bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

#[cfg(test)]
mod tests;
