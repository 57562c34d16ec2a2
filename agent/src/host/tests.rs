use std::io::Write;
use std::path::Path;
use std::time::Duration;

use super::*;

fn write(root: &Path, rel: &str, text: &str) {
    let path = root.join(rel);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    // In place (truncate + write): the sampler keeps the file open.
    std::fs::write(path, text).expect("write fixture");
}

const MEMINFO: &str = "MemTotal:        8000000 kB\nMemFree:         1000000 kB\n\
                       MemAvailable:    6000000 kB\nBuffers:          100000 kB\n\
                       Cached:          4000000 kB\nSwapTotal:             0 kB\n\
                       SwapFree:              0 kB\n";

fn stat(total: &str, cpu0: &str, cpu1: &str) -> String {
    format!(
        "cpu  {total}\ncpu0 {cpu0}\ncpu1 {cpu1}\nintr 1 2 3\nctxt 4\nbtime 5\n\
         processes 6\nprocs_running 1\nprocs_blocked 0\nsoftirq 1 2 3\n"
    )
}

/// A fixture root with all four files; `/` in its mountinfo is the fixture dir itself.
fn fixture() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    write(
        r,
        "proc/stat",
        &stat("100 0 100 800 0 0 0 0 0 0", "50 0 50 400", "50 0 50 400"),
    );
    write(r, "proc/meminfo", MEMINFO);
    write(r, "proc/loadavg", "1.50 1.00 0.50 2/300 4242\n");
    write(
        r,
        "proc/self/mountinfo",
        "1 0 8:1 / / rw,relatime - ext4 /dev/vda1 rw\n",
    );
    root
}

#[test]
fn fixture_root_gives_every_value_with_its_unit() {
    let root = fixture();
    let r = root.path();
    let mut sampler = HostSampler::new(r.to_path_buf(), DiskOptions::default());

    let first = sampler.sample();
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.cpu, None, "one reading cannot give a CPU usage");
    let mem = first.memory.expect("memory");
    assert!((mem.used_pct - 25.0).abs() < 1e-9, "{mem:?}");
    assert_eq!(mem.total_bytes, 8_000_000 * 1024);
    assert_eq!(mem.available_bytes, 6_000_000 * 1024);
    assert_eq!((mem.swap_used_pct, mem.swap_total_bytes), (None, 0));
    let load = first.load.expect("load");
    assert_eq!(
        (load.one, load.five, load.fifteen, load.cores),
        (1.5, 1.0, 0.5, 2)
    );
    assert_eq!(first.disks.len(), 1);
    assert_eq!(
        (
            first.disks[0].mount.as_str(),
            first.disks[0].device.as_str()
        ),
        ("/", "/dev/vda1")
    );

    // Δ: user 100, system 100, idle 200, iowait 100 → 500 total: 40 % busy, 20 % iowait.
    write(
        r,
        "proc/stat",
        &stat(
            "200 0 200 1000 100 0 0 0 0 0",
            "100 0 50 450",
            "50 0 50 500",
        ),
    );
    let second = sampler.sample();
    assert!(second.errors.is_empty(), "{:?}", second.errors);
    let cpu = second.cpu.expect("second reading gives a usage");
    assert!((cpu.busy_pct - 40.0).abs() < 1e-9, "{cpu:?}");
    assert!((cpu.iowait_pct - 20.0).abs() < 1e-9, "{cpu:?}");
    assert_eq!(cpu.per_core_busy_pct, vec![Some(50.0), Some(0.0)]);
}

#[test]
fn one_failing_source_leaves_the_others() {
    let root = fixture();
    let r = root.path();
    let mut sampler = HostSampler::new(r.to_path_buf(), DiskOptions::default());
    sampler.sample();
    write(r, "proc/meminfo", "garbage\n");
    write(r, "proc/loadavg", "\n");
    write(
        r,
        "proc/stat",
        &stat("200 0 100 900 0 0 0 0 0 0", "1 1 1 1", "1 1 1 1"),
    );
    let s = sampler.sample();
    assert_eq!(s.memory, None);
    assert_eq!(s.load, None);
    assert_eq!(s.errors.len(), 2, "{:?}", s.errors);
    assert!(
        s.errors[0].contains("proc/meminfo: no usable MemTotal"),
        "{:?}",
        s.errors
    );
    assert!(
        s.errors[1].contains("proc/loadavg: no 1-minute"),
        "{:?}",
        s.errors
    );
    assert!((s.cpu.expect("cpu").busy_pct - 50.0).abs() < 1e-9);
    assert_eq!(s.disks.len(), 1);

    // The files come back: so do the values.
    write(r, "proc/meminfo", MEMINFO);
    write(r, "proc/loadavg", "0.1 0.2 0.3 1/1 1\n");
    let s = sampler.sample();
    assert!(s.errors.is_empty(), "{:?}", s.errors);
    assert!(s.memory.is_some() && s.load.is_some());
}

#[test]
fn without_proc_stat_cores_fall_back_to_available_parallelism() {
    let root = fixture();
    std::fs::remove_file(root.path().join("proc/stat")).expect("rm");
    let mut sampler = HostSampler::new(root.path().to_path_buf(), DiskOptions::default());
    let s = sampler.sample();
    assert_eq!(s.cpu, None);
    assert_eq!(s.errors.len(), 1, "{:?}", s.errors);
    assert!(
        s.errors[0].starts_with("read ") && s.errors[0].contains("proc/stat: No such file"),
        "{:?}",
        s.errors
    );
    let expected = std::thread::available_parallelism()
        .expect("parallelism")
        .get();
    assert_eq!(s.load.expect("load").cores, expected);
    assert!(s.memory.is_some());
    assert_eq!(s.disks.len(), 1);
}

#[test]
fn proc_file_reads_whole_files_of_any_size_and_rereads_in_place() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("f");
    let big: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
    assert!(big.len() > 4 * INITIAL_READ_BUFFER);
    let mut f = ProcFile::new(path.clone());
    assert!(f.read().is_err(), "not there yet");
    std::fs::write(&path, &big).expect("write");
    assert_eq!(
        f.read_text().expect("read"),
        big,
        "reopened after the error"
    );
    std::fs::write(&path, "short\n").expect("write");
    assert_eq!(f.read_text().expect("read"), "short\n");
    let exact = "x".repeat(f.buf.len());
    std::fs::write(&path, &exact).expect("write");
    assert_eq!(
        f.read_text().expect("read"),
        exact,
        "a file exactly the buffer size"
    );
    std::fs::write(&path, b"\xff\n").expect("write");
    assert_eq!(
        f.read_text().expect_err("not UTF-8").kind(),
        io::ErrorKind::InvalidData
    );
}

#[test]
fn proc_file_sees_fresh_kernel_text_through_the_kept_descriptor() {
    let mut f = ProcFile::new(PathBuf::from("/proc/uptime"));
    let first = f.read_text().expect("read").to_owned();
    let mut later = first.clone();
    for _ in 0..100 {
        std::thread::sleep(Duration::from_millis(20));
        later = f.read_text().expect("read").to_owned();
        if later != first {
            break;
        }
    }
    assert_ne!(first, later, "/proc/uptime re-read at offset 0 must move");
}

#[test]
fn this_machine_two_samples_250ms_apart() {
    let mut sampler = HostSampler::new(PathBuf::from("/"), DiskOptions::default());
    let first = sampler.sample();
    assert_eq!(first.cpu, None);
    std::thread::sleep(Duration::from_millis(250));
    let s = sampler.sample();
    assert!(s.errors.is_empty(), "{:?}", s.errors);

    let cpu = s.cpu.expect("cpu after two readings");
    for v in [cpu.busy_pct, cpu.iowait_pct, cpu.steal_pct] {
        assert!((0.0..=100.0).contains(&v), "{cpu:?}");
    }
    assert!(cpu.busy_pct + cpu.iowait_pct <= 100.0 + 1e-9, "{cpu:?}");
    let load = s.load.expect("load");
    assert!(
        load.one >= 0.0 && load.five >= 0.0 && load.fifteen >= 0.0,
        "{load:?}"
    );
    assert_eq!(
        cpu.per_core_busy_pct.iter().flatten().count(),
        load.cores,
        "every online core has a value: {cpu:?}"
    );
    for v in cpu.per_core_busy_pct.iter().flatten() {
        assert!((0.0..=100.0).contains(v), "{cpu:?}");
    }

    let mem = s.memory.expect("memory");
    assert!(mem.used_pct > 0.0 && mem.used_pct < 100.0, "{mem:?}");
    assert!(mem.available_bytes < mem.total_bytes, "{mem:?}");

    assert!(
        s.disks.iter().any(|d| d.mount == "/"),
        "the root filesystem is reported: {:?}",
        s.disks
    );
}

/// Where the page-cache test writes: the temp dir, unless it is a tmpfs (whose pages are
/// shared memory, which MemAvailable rightly does not count as available).
fn disk_backed_dir() -> PathBuf {
    let tmp = std::env::temp_dir();
    match rustix::fs::statfs(&tmp) {
        // TMPFS_MAGIC; a literal, as f_type's integer type differs between targets.
        Ok(st) if st.f_type != 0x0102_1994 => tmp,
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

/// Fills 200 MB of page cache and checks that used memory does not rise with it.
///
/// Each attempt writes a new file (fsynced, so its pages are clean cache) between two
/// samples; it counts only when the kernel's Cached really grew by most of the file, and
/// then used memory must not have risen by more than half of the cache added. Files are
/// deleted only at the end: freeing their cache earlier would park the pages on the
/// kernel's per-CPU free lists, which MemFree does not count, and blur the next attempt.
/// Other processes move memory meanwhile, so up to five attempts are made; counting the
/// cache as used (MemTotal − MemFree) fails them.
#[test]
fn page_cache_is_not_used_memory() {
    const SIZE: usize = 200 << 20;
    const CHUNK: usize = 1 << 20;
    let dir = tempfile::Builder::new()
        .prefix(".tocsin-host-cache-test")
        .tempdir_in(disk_backed_dir())
        .expect("tempdir");
    let chunk = vec![0x5a_u8; CHUNK];
    let cached = || {
        let text = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
        memory::parse(&text).expect("parses").cached
    };
    let mut sampler = HostSampler::new(PathBuf::from("/"), DiskOptions::default());
    let mut used = || {
        let m = sampler.sample().memory.expect("memory");
        (m.total_bytes - m.available_bytes, m.total_bytes)
    };

    let mut attempts = Vec::new();
    for attempt in 0..5 {
        let cached_before = cached();
        let (used_before, _) = used();
        let mut f =
            std::fs::File::create(dir.path().join(format!("fill-{attempt}"))).expect("create");
        for _ in 0..SIZE / CHUNK {
            f.write_all(&chunk).expect("write");
        }
        f.sync_all().expect("fsync");
        let (used_after, total) = used();
        let cache_added = cached().saturating_sub(cached_before);
        let used_rise = used_after.saturating_sub(used_before);
        let pct = |b: u64| b as f64 * 100.0 / total as f64;
        attempts.push(format!(
            "cache +{} MiB ({:.2} % of RAM), used +{} MiB ({:.2} %)",
            cache_added >> 20,
            pct(cache_added),
            used_rise >> 20,
            pct(used_rise)
        ));
        let conclusive = cache_added >= (SIZE as u64) * 3 / 4;
        if conclusive && used_rise <= cache_added / 2 {
            return;
        }
    }
    panic!("used memory rose with the page cache in every attempt: {attempts:#?}");
}

#[test]
fn the_sampler_can_move_to_a_blocking_thread() {
    fn send<T: Send + 'static>() {}
    send::<HostSampler>();
    send::<HostSample>();
}

#[test]
fn the_mount_table_is_read_again_only_after_a_change_on_procfs() {
    // procfs: the first read is kept while no mount or unmount is polled.
    let mut proc = ProcFile::mount_table(PathBuf::from("/proc/self/mountinfo"));
    let first = proc.read().expect("read mountinfo").to_vec();
    assert!(!first.is_empty());
    assert!(proc.current.is_some(), "procfs mount table kept");
    assert_eq!(proc.read().expect("kept mountinfo"), first.as_slice());
    // A regular file (a fixture) cannot report changes: read every time.
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), "mountinfo", "one\n");
    let mut plain = ProcFile::mount_table(dir.path().join("mountinfo"));
    assert_eq!(plain.read().expect("read"), b"one\n");
    assert!(plain.current.is_none());
    write(dir.path(), "mountinfo", "two\n");
    assert_eq!(plain.read().expect("read again"), b"two\n");
}
