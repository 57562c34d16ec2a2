//! Filesystem space and inodes: mounts from `/proc/self/mountinfo`, numbers from
//! `statvfs(2)`.

use std::ffi::OsStr;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::ProcFile;

/// Which filesystems [`super::HostSampler`] reports.
///
/// With `include_mounts` empty (the default), every "real" filesystem is reported once:
///
/// - skipped: the fstypes in [`PSEUDO_FSTYPES`] (kernel interfaces, and `tmpfs`/`ramfs`:
///   `/run`, `/dev/shm`, `/sys/fs/cgroup` are tmpfs and RAM-backed, so their fill level
///   is a memory question), [`IMAGE_FSTYPES`] (read-only images such as snaps: always
///   100 % full by construction), [`NETWORK_FSTYPES`] and every `fuse.*` type (a
///   `statvfs` on a dead server can block the sampling thread for minutes; `fuseblk`,
///   FUSE on a local block device such as ntfs-3g, is kept), and `exclude_fstypes`;
/// - `overlay` is kept only when mounted at `/` (a container's root filesystem); other
///   overlay mounts are container runtimes' per-container views of a disk reported
///   anyway;
/// - a filesystem with 0 blocks is skipped (it has no space to run out of);
/// - a device (the `major:minor` field of mountinfo) mounted at several points — bind
///   mounts, btrfs subvolumes — is reported once, at its shortest mount path;
/// - a mount hidden by a later mount on the same point is skipped (`statvfs` would read
///   the upper one).
///
/// With `include_mounts` set, exactly those mount points are reported, in that order,
/// whatever their fstype (so `/dev/shm` or an NFS mount can be watched on purpose — an
/// unresponsive NFS server then blocks [`super::HostSampler::sample`]), each even when
/// it shares a device with another listed one; a listed path that is not a mount point
/// is an error in [`super::HostSample::errors`] every cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskOptions {
    /// Absolute mount points to report (e.g. `"/"`, `"/var/lib/postgresql"`); empty = all
    /// real filesystems as described above. A trailing `/` is ignored.
    pub include_mounts: Vec<String>,
    /// fstypes to skip on top of the built-in lists when `include_mounts` is empty, e.g.
    /// `"vfat"`. A trailing `*` matches a prefix (`"fuse.*"`, `"nfs*"`).
    pub exclude_fstypes: Vec<String>,
}

/// Space and inode use of one filesystem, from `statvfs(2)` on its mount point.
#[derive(Debug, Clone, PartialEq)]
pub struct DiskUsage {
    /// Mount point, from mountinfo with its `\040`-style escapes decoded; bytes that are
    /// not UTF-8 are shown as U+FFFD.
    pub mount: String,
    /// Mount source, from mountinfo: a device (`/dev/sda1`), `none`, `server:/export`…
    pub device: String,
    /// Filesystem type, from mountinfo (`ext4`, `xfs`, `btrfs`, `overlay`…).
    pub fstype: String,
    /// Used percent 0–100 as `df` computes it: (blocks − bfree) / (blocks − bfree +
    /// bavail). Blocks reserved for root are excluded, so 100 means "full for ordinary
    /// users" even when root still has some room.
    pub used_pct: f64,
    /// Used inodes percent 0–100 = (files − ffree) / files; `None` when the filesystem
    /// reports 0 inodes (btrfs, vfat and others allocate them on demand).
    pub inodes_used_pct: Option<f64>,
    /// Size in bytes: blocks × fragment size (`df`'s "Size").
    pub total_bytes: u64,
    /// Bytes available to non-root users: bavail × fragment size (`df`'s "Avail").
    pub avail_bytes: u64,
}

/// Kernel interface and RAM-backed filesystems, skipped unless listed in
/// [`DiskOptions::include_mounts`].
pub const PSEUDO_FSTYPES: &[&str] = &[
    "autofs",
    "binfmt_misc",
    "bpf",
    "cgroup",
    "cgroup2",
    "configfs",
    "cpuset",
    "debugfs",
    "devfs",
    "devpts",
    "devtmpfs",
    "efivarfs",
    "fusectl",
    "hugetlbfs",
    "mqueue",
    "nfsd",
    "nsfs",
    "proc",
    "pstore",
    "ramfs",
    "rootfs",
    "rpc_pipefs",
    "securityfs",
    "selinuxfs",
    "sysfs",
    "tmpfs",
    "tracefs",
];

/// Read-only image filesystems (snaps, live media, composefs): always full by
/// construction, skipped unless listed in [`DiskOptions::include_mounts`].
pub const IMAGE_FSTYPES: &[&str] = &["squashfs", "iso9660", "erofs"];

/// Network and userspace filesystems whose `statvfs` can hang on an unresponsive server,
/// skipped unless listed in [`DiskOptions::include_mounts`]. Every `fuse.*` type is
/// skipped as well.
pub const NETWORK_FSTYPES: &[&str] = &[
    "9p",
    "afs",
    "ceph",
    "cifs",
    "davfs",
    "fuse",
    "glusterfs",
    "lustre",
    "ncpfs",
    "nfs",
    "nfs4",
    "smb3",
    "smbfs",
    "sshfs",
];

/// One mountinfo line's fields that matter, as byte ranges of the read buffer (still
/// escaped).
#[derive(Debug, Clone, PartialEq, Eq)]
struct MountLine {
    dev: (u32, u32),
    mount: Range<usize>,
    fstype: Range<usize>,
    source: Range<usize>,
}

/// A mount to `statvfs` this cycle.
#[derive(Debug, Clone)]
struct Candidate {
    line: MountLine,
    /// Index in the include list (explicit mode), 0 otherwise.
    include: usize,
}

/// Mountinfo reader, selection and reused buffers; see [`DiskOptions`].
#[derive(Debug)]
pub(super) struct DiskScanner {
    root: PathBuf,
    mountinfo: ProcFile,
    /// `include_mounts`, normalised, for messages.
    include: Vec<String>,
    /// The same, escaped as mountinfo escapes them, for comparing without decoding.
    include_escaped: Vec<Vec<u8>>,
    exclude_fstypes: Vec<String>,
    candidates: Vec<Candidate>,
    mount_buf: Vec<u8>,
    path_buf: Vec<u8>,
    text_buf: Vec<u8>,
}

impl DiskScanner {
    pub(super) fn new(root: &Path, mountinfo: PathBuf, options: DiskOptions) -> Self {
        // Normalised and deduplicated (a duplicate would look unmounted).
        let include: Vec<String> = options
            .include_mounts
            .iter()
            .map(|m| {
                let trimmed = m.trim_end_matches('/');
                if trimmed.is_empty() { "/" } else { trimmed }.to_owned()
            })
            .fold(Vec::new(), |mut seen, m| {
                if !seen.contains(&m) {
                    seen.push(m);
                }
                seen
            });
        DiskScanner {
            root: root.to_path_buf(),
            mountinfo: ProcFile::mount_table(mountinfo),
            include_escaped: include.iter().map(|m| escape(m)).collect(),
            include,
            exclude_fstypes: options.exclude_fstypes,
            candidates: Vec::new(),
            mount_buf: Vec::new(),
            path_buf: Vec::new(),
            text_buf: Vec::new(),
        }
    }

    /// Reads mountinfo, selects the filesystems and `statvfs`es each; problems go to
    /// `errors` without dropping the other disks.
    pub(super) fn scan(&mut self, errors: &mut Vec<String>) -> Vec<DiskUsage> {
        let DiskScanner {
            root,
            mountinfo,
            include,
            include_escaped,
            exclude_fstypes,
            candidates,
            mount_buf,
            path_buf,
            text_buf,
        } = self;
        let (path, text) = mountinfo.read_with_path();
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("read {}: {e}", path.display()));
                return Vec::new();
            }
        };
        let explicit = !include_escaped.is_empty();
        candidates.clear();
        let mut malformed = 0usize;
        for line in lines(text) {
            let Some(m) = parse_line(text, line) else {
                malformed += 1;
                continue;
            };
            let mount = &text[m.mount.clone()];
            // A later mount on the same point hides the earlier ones.
            candidates.retain(|c| text[c.line.mount.clone()] != *mount);
            if explicit {
                if let Some(i) = include_escaped.iter().position(|p| p == mount) {
                    candidates.push(Candidate {
                        line: m,
                        include: i,
                    });
                }
            } else if !skipped_by_default(&text[m.fstype.clone()], mount, exclude_fstypes) {
                candidates.push(Candidate {
                    line: m,
                    include: 0,
                });
            }
        }
        if malformed > 0 {
            errors.push(format!(
                "parse {}: {malformed} malformed line(s) skipped",
                path.display()
            ));
        }

        let mut out = Vec::with_capacity(candidates.len());
        if explicit {
            for (i, name) in include.iter().enumerate() {
                match candidates.iter().find(|c| c.include == i) {
                    Some(c) => out.extend(stat(
                        root, text, &c.line, true, mount_buf, path_buf, text_buf, errors,
                    )),
                    None => errors.push(format!(
                        "disk {name}: not a mount point (absent from {})",
                        path.display()
                    )),
                }
            }
        } else {
            dedup_by_device(text, candidates, mount_buf);
            for c in candidates.iter() {
                out.extend(stat(
                    root, text, &c.line, false, mount_buf, path_buf, text_buf, errors,
                ));
            }
        }
        out
    }
}

/// Keeps one candidate per device, the one with the shortest decoded mount path (the
/// first on a tie), in place and in order of first appearance.
fn dedup_by_device(text: &[u8], candidates: &mut Vec<Candidate>, scratch: &mut Vec<u8>) {
    let mut decoded_len = |r: &Range<usize>| {
        unescape_into(&text[r.clone()], scratch);
        scratch.len()
    };
    let mut kept = 0;
    for i in 0..candidates.len() {
        let c = candidates[i].clone();
        match candidates[..kept]
            .iter()
            .position(|k| k.line.dev == c.line.dev)
        {
            Some(k) => {
                if decoded_len(&c.line.mount) < decoded_len(&candidates[k].line.mount) {
                    candidates[k] = c;
                }
            }
            None => {
                candidates[kept] = c;
                kept += 1;
            }
        }
    }
    candidates.truncate(kept);
}

/// `statvfs` of one mount, as a [`DiskUsage`]; `None` with a message in `errors` when it
/// fails. A filesystem with no blocks is `None`, with a message only when `explicit`.
#[expect(
    clippy::too_many_arguments,
    reason = "disjoint borrows of the scanner's buffers"
)]
fn stat(
    root: &Path,
    text: &[u8],
    m: &MountLine,
    explicit: bool,
    mount_buf: &mut Vec<u8>,
    path_buf: &mut Vec<u8>,
    text_buf: &mut Vec<u8>,
    errors: &mut Vec<String>,
) -> Option<DiskUsage> {
    unescape_into(&text[m.mount.clone()], mount_buf);
    under_root(root, mount_buf, path_buf);
    let mount = String::from_utf8_lossy(mount_buf).into_owned();
    let st = match rustix::fs::statvfs(Path::new(OsStr::from_bytes(path_buf))) {
        Ok(st) => st,
        Err(e) => {
            errors.push(format!("statvfs {mount}: {e}"));
            return None;
        }
    };
    let used = st.f_blocks.saturating_sub(st.f_bfree);
    let usable = used.saturating_add(st.f_bavail);
    if st.f_blocks == 0 || usable == 0 {
        if explicit {
            errors.push(format!("statvfs {mount}: the filesystem reports no blocks"));
        }
        return None;
    }
    let inodes_used_pct = (st.f_files > 0).then(|| {
        let used = st.f_files - st.f_ffree.min(st.f_files);
        used as f64 * 100.0 / st.f_files as f64
    });
    let mut decode = |r: &Range<usize>| {
        unescape_into(&text[r.clone()], text_buf);
        String::from_utf8_lossy(text_buf).into_owned()
    };
    Some(DiskUsage {
        mount,
        device: decode(&m.source),
        fstype: decode(&m.fstype),
        used_pct: (used as f64 * 100.0 / usable as f64).clamp(0.0, 100.0),
        inodes_used_pct,
        total_bytes: st.f_blocks.saturating_mul(st.f_frsize),
        avail_bytes: st.f_bavail.saturating_mul(st.f_frsize),
    })
}

/// Whether automatic selection skips this fstype at this (escaped) mount point.
fn skipped_by_default(fstype: &[u8], mount: &[u8], extra: &[String]) -> bool {
    let listed = |list: &[&str]| list.iter().any(|t| t.as_bytes() == fstype);
    if fstype == b"overlay" {
        return mount != b"/";
    }
    listed(PSEUDO_FSTYPES)
        || listed(IMAGE_FSTYPES)
        || listed(NETWORK_FSTYPES)
        || fstype.starts_with(b"fuse.")
        || extra.iter().any(|pattern| match pattern.strip_suffix('*') {
            Some(prefix) => fstype.starts_with(prefix.as_bytes()),
            None => pattern.as_bytes() == fstype,
        })
}

/// Byte ranges of the non-empty lines of `text`.
fn lines(text: &[u8]) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut start = 0;
    std::iter::from_fn(move || {
        while start < text.len() {
            let end = text[start..]
                .iter()
                .position(|&b| b == b'\n')
                .map_or(text.len(), |i| start + i);
            let line = start..end;
            start = end + 1;
            if !line.is_empty() {
                return Some(line);
            }
        }
        None
    })
}

/// Parses one mountinfo line (proc(5)):
/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue`
/// — id, parent id, major:minor, root, mount point, options, zero or more optional
/// fields, `-`, fstype, source, super options. `None` when it does not have that shape.
fn parse_line(text: &[u8], line: Range<usize>) -> Option<MountLine> {
    let mut fields = {
        let mut pos = line.start;
        std::iter::from_fn(move || {
            if pos > line.end {
                return None;
            }
            let end = text[pos..line.end]
                .iter()
                .position(|&b| b == b' ')
                .map_or(line.end, |i| pos + i);
            let field = pos..end;
            pos = end + 1;
            Some(field)
        })
    };
    let _id = fields.next()?;
    let _parent = fields.next()?;
    let dev = fields.next()?;
    let _root = fields.next()?;
    let mount = fields.next()?;
    let _options = fields.next()?;
    while text[fields.next()?] != *b"-" {}
    let fstype = fields.next()?;
    let source = fields.next()?;
    let (major, minor) = std::str::from_utf8(&text[dev]).ok()?.split_once(':')?;
    if mount.is_empty() || fstype.is_empty() {
        return None;
    }
    Some(MountLine {
        dev: (major.parse().ok()?, minor.parse().ok()?),
        mount,
        fstype,
        source,
    })
}

/// Decodes mountinfo's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash) into `out` (cleared first). Anything else is copied as is.
fn unescape_into(src: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut i = 0;
    while i < src.len() {
        if src[i] == b'\\'
            && let Some(&[a, b, c]) = src.get(i + 1..i + 4)
            && (b'0'..=b'3').contains(&a)
            && (b'0'..=b'7').contains(&b)
            && (b'0'..=b'7').contains(&c)
        {
            out.push((a - b'0') * 64 + (b - b'0') * 8 + (c - b'0'));
            i += 4;
        } else {
            out.push(src[i]);
            i += 1;
        }
    }
}

/// Escapes a path as the kernel writes it in mountinfo.
fn escape(path: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    for b in path.bytes() {
        if matches!(b, b' ' | b'\t' | b'\n' | b'\\') {
            out.extend_from_slice(format!("\\{b:03o}").as_bytes());
        } else {
            out.push(b);
        }
    }
    out
}

/// `path` under `root`: `root` joined with `path` (which starts with `/`), as raw bytes
/// (mount points need not be UTF-8), written into `out` (cleared first). With root `/`
/// this is `path` itself.
fn under_root(root: &Path, path: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let r = root.as_os_str().as_bytes();
    out.extend_from_slice(r.strip_suffix(b"/").unwrap_or(r));
    if !path.starts_with(b"/") {
        out.push(b'/');
    }
    out.extend_from_slice(path);
}

#[cfg(test)]
mod tests;
