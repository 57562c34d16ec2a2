use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::Command;

use super::*;

/// A fixture root: `proc/self/mountinfo` with `mountinfo`, and a directory under the root
/// for each mount point in `dirs` (raw bytes, so non-UTF-8 names can be made).
fn fixture(mountinfo: &[u8], dirs: &[&[u8]]) -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("proc/self")).expect("mkdir proc");
    std::fs::write(root.path().join("proc/self/mountinfo"), mountinfo).expect("write");
    for d in dirs {
        let rel = d.strip_prefix(b"/").unwrap_or(d);
        std::fs::create_dir_all(root.path().join(OsStr::from_bytes(rel))).expect("mkdir");
    }
    root
}

fn scan(root: &Path, options: DiskOptions) -> (Vec<DiskUsage>, Vec<String>) {
    let mut s = DiskScanner::new(root, root.join("proc/self/mountinfo"), options);
    let mut errors = Vec::new();
    let disks = s.scan(&mut errors);
    (disks, errors)
}

fn mounts(disks: &[DiskUsage]) -> Vec<&str> {
    disks.iter().map(|d| d.mount.as_str()).collect()
}

const MOUNTINFO: &str = r"22 27 0:21 / /proc rw,relatime shared:5 - proc proc rw
24 27 0:6 / /dev rw,nosuid shared:2 - devtmpfs devtmpfs rw,size=8k
25 24 0:23 / /dev/shm rw - tmpfs tmpfs rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw,discard
28 27 254:0 /srv /srv/bind rw,relatime - ext4 /dev/vda rw
29 27 7:1 / /snap/core/1 ro,nodev shared:9 - squashfs /dev/loop1 ro
30 27 0:50 / /mnt/nfs rw - nfs4 server:/export rw,vers=4.2
31 27 0:51 / /mnt/ssh rw - fuse.sshfs user@host:/ rw
32 27 0:52 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=/a
33 27 8:1 / /data/long/path rw - xfs /dev/sdb1 rw
34 27 8:1 / /data rw - xfs /dev/sdb1 rw
35 27 8:2 / /mnt/my\040disk rw shared:7 master:3 propagate_from:2 - ext4 /dev/sdc1 rw
36 27 8:3 / /mnt/données rw - ext4 /dev/disk/by-label/caf\303\251 rw
37 27 8:4 / /mnt/missing rw - ext4 /dev/sde1 rw
38 27 8:5 / /mnt/hidden rw - ext4 /dev/sdf1 rw
39 27 0:60 / /mnt/hidden rw - tmpfs tmpfs rw
40 27 8:16 / /boot/efi rw - vfat /dev/sda1 rw
this line is not mountinfo
";

const DIRS: &[&[u8]] = &[
    b"/dev/shm",
    b"/srv/bind",
    b"/mnt/nfs",
    b"/data/long/path",
    b"/mnt/my disk",
    "/mnt/données".as_bytes(),
    b"/mnt/hidden",
    b"/boot/efi",
];

#[test]
fn default_selection_skips_pseudo_network_images_duplicates_and_hidden_mounts() {
    let root = fixture(MOUNTINFO.as_bytes(), DIRS);
    let (disks, errors) = scan(root.path(), DiskOptions::default());
    assert_eq!(
        mounts(&disks),
        ["/", "/data", "/mnt/my disk", "/mnt/données", "/boot/efi"]
    );
    assert_eq!(
        errors,
        [
            format!(
                "parse {}: 1 malformed line(s) skipped",
                root.path().join("proc/self/mountinfo").display()
            ),
            "statvfs /mnt/missing: No such file or directory (os error 2)".to_owned(),
        ]
    );
    let slash = &disks[0];
    assert_eq!(
        (slash.device.as_str(), slash.fstype.as_str()),
        ("/dev/vda", "ext4")
    );
    assert_eq!(disks[1].fstype, "xfs");
    assert_eq!(
        disks[3].device, "/dev/disk/by-label/café",
        "escapes in the source"
    );
    for d in &disks {
        assert!((0.0..=100.0).contains(&d.used_pct), "{d:?}");
        assert!(d.total_bytes > 0 && d.avail_bytes <= d.total_bytes, "{d:?}");
        if let Some(i) = d.inodes_used_pct {
            assert!((0.0..=100.0).contains(&i), "{d:?}");
        }
    }
}

#[test]
fn exclude_fstypes_adds_to_the_built_in_lists() {
    let root = fixture(MOUNTINFO.as_bytes(), DIRS);
    let options = |ex: &[&str]| DiskOptions {
        include_mounts: Vec::new(),
        exclude_fstypes: ex.iter().map(|s| (*s).to_owned()).collect(),
    };
    let (disks, _) = scan(root.path(), options(&["vfat"]));
    assert_eq!(
        mounts(&disks),
        ["/", "/data", "/mnt/my disk", "/mnt/données"]
    );
    let (disks, _) = scan(root.path(), options(&["x*", "ext*"]));
    assert_eq!(mounts(&disks), ["/boot/efi"]);
}

#[test]
fn explicit_mounts_are_reported_whatever_their_type_in_order() {
    let root = fixture(MOUNTINFO.as_bytes(), DIRS);
    let options = DiskOptions {
        include_mounts: [
            "/dev/shm",
            "/mnt/nfs/",
            "/srv/bind",
            "/",
            "/mnt/my disk",
            "/nowhere",
        ]
        .map(str::to_owned)
        .to_vec(),
        exclude_fstypes: vec!["tmpfs".to_owned()],
    };
    let (disks, errors) = scan(root.path(), options);
    assert_eq!(
        mounts(&disks),
        ["/dev/shm", "/mnt/nfs", "/srv/bind", "/", "/mnt/my disk"],
        "tmpfs, nfs and a bind mount of / are reported when asked for"
    );
    assert_eq!(disks[1].device, "server:/export");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[1].starts_with("disk /nowhere: not a mount point"),
        "{errors:?}"
    );
}

#[test]
fn overlay_is_kept_only_as_the_root_filesystem() {
    let text = "1 0 0:40 / / rw - overlay overlay rw,lowerdir=/l\n\
                2 1 0:41 / /merged rw - overlay overlay rw\n\
                3 1 0:42 / /etc/hosts rw - ext4 /dev/vda1 rw\n";
    let root = fixture(text.as_bytes(), &[b"/merged", b"/etc/hosts"]);
    let (disks, errors) = scan(root.path(), DiskOptions::default());
    assert_eq!(mounts(&disks), ["/", "/etc/hosts"], "{errors:?}");
    assert_eq!(disks[0].fstype, "overlay");
}

#[test]
fn mount_points_that_are_not_utf8_are_shown_lossily_and_still_statted() {
    let mut text = b"1 0 8:1 / / rw - ext4 /dev/vda1 rw\n2 1 8:2 / /mnt/x".to_vec();
    text.extend_from_slice(b"\xff\xfey rw - ext4 /dev/vdb1 rw\n");
    let root = fixture(&text, &[b"/mnt/x\xff\xfey"]);
    let (disks, errors) = scan(root.path(), DiskOptions::default());
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(mounts(&disks), ["/", "/mnt/x\u{fffd}\u{fffd}y"]);
}

#[test]
fn a_missing_mountinfo_is_one_error_and_no_disks() {
    let root = tempfile::tempdir().expect("tempdir");
    let (disks, errors) = scan(root.path(), DiskOptions::default());
    assert!(disks.is_empty());
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("mountinfo") && errors[0].contains("No such file"),
        "{errors:?}"
    );
}

#[test]
fn mountinfo_lines_parse_with_and_without_optional_fields() {
    let text = b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue";
    let m = parse_line(text, 0..text.len()).expect("parses");
    assert_eq!(m.dev, (98, 0));
    assert_eq!(&text[m.mount], b"/mnt2");
    assert_eq!(&text[m.fstype], b"ext3");
    assert_eq!(&text[m.source], b"/dev/root");
    let text = b"36 35 259:3 / / rw - btrfs /dev/nvme0n1p3 rw,subvol=/@";
    let m = parse_line(text, 0..text.len()).expect("parses");
    assert_eq!(m.dev, (259, 3));
    assert_eq!(&text[m.mount], b"/");
    for bad in [
        &b""[..],
        b"36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 ext3 /dev/root rw",
        b"36 35 98-0 / / rw - ext4 /dev/x rw",
        b"36 35 98:0 / / rw -",
        b"36 35 98:0 / / rw - ext4",
    ] {
        assert_eq!(
            parse_line(bad, 0..bad.len()),
            None,
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
}

#[test]
fn octal_escapes_decode_and_encode() {
    let mut out = Vec::new();
    unescape_into(br"/a\040b\011c\012d\134e", &mut out);
    assert_eq!(out, b"/a b\tc\nd\\e");
    // Not escapes: left as they are.
    unescape_into(br"/x\9\04\400\", &mut out);
    assert_eq!(out, br"/x\9\04\400\");
    assert_eq!(escape("/a b\\c"), br"/a\040b\134c");
    unescape_into(&escape("/tab\tnew\nline é"), &mut out);
    assert_eq!(out, "/tab\tnew\nline é".as_bytes());
}

#[test]
fn paths_are_resolved_under_the_root() {
    let mut out = Vec::new();
    under_root(Path::new("/"), b"/", &mut out);
    assert_eq!(out, b"/");
    under_root(Path::new("/"), b"/var/lib", &mut out);
    assert_eq!(out, b"/var/lib");
    under_root(Path::new("/host/"), b"/var", &mut out);
    assert_eq!(out, b"/host/var");
    under_root(Path::new("/host"), b"/", &mut out);
    assert_eq!(out, b"/host/");
}

/// `df -B1 --output=…` of `path`: (size, avail, used %, inodes used % if any).
fn df(path: &str) -> (u64, u64, f64, Option<f64>) {
    let out = Command::new("df")
        .args(["-B1", "--output=size,avail,pcent,ipcent", path])
        .output()
        .expect("run df");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let row: Vec<&str> = text
        .lines()
        .nth(1)
        .expect("a row")
        .split_whitespace()
        .collect();
    let pct = |s: &str| s.trim_end_matches('%').parse::<f64>().ok();
    (
        row[0].parse().expect("size"),
        row[1].parse().expect("avail"),
        pct(row[2]).expect("pcent"),
        pct(row[3]),
    )
}

#[test]
fn this_machine_root_filesystem_matches_df() {
    let (disks, errors) = scan(Path::new("/"), DiskOptions::default());
    let root = disks
        .iter()
        .find(|d| d.mount == "/")
        .unwrap_or_else(|| panic!("/ is reported: {disks:?} {errors:?}"));
    let (size, avail, pcent, ipcent) = df("/");
    assert_eq!(root.total_bytes, size);
    // Other builders write to this disk: allow 1 % of the size of movement.
    assert!(
        root.avail_bytes.abs_diff(avail) < size / 100,
        "{root:?} vs df {avail}"
    );
    // df rounds its percentages up.
    assert!(
        pcent - 2.0 < root.used_pct && root.used_pct <= pcent,
        "{root:?} vs df {pcent}"
    );
    match (root.inodes_used_pct, ipcent) {
        (Some(ours), Some(df)) => assert!(df - 2.0 < ours && ours <= df, "{ours} vs df {df}"),
        (None, None) => {}
        other => panic!("inodes disagree with df: {other:?}"),
    }
    for d in &disks {
        assert!(!PSEUDO_FSTYPES.contains(&d.fstype.as_str()), "{d:?}");
    }
}
