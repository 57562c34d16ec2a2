//! Resource use of a running process, read from `/proc`, for the benchmark binaries.

/// Installs the Debian packages of `peers` — (program path, package) pairs — whose program
/// is missing, with apt-get (`apt-get install` first, `apt-get update` and again if that
/// fails). Progress on stderr.
///
/// # Errors
/// When apt-get fails (not root, no registry): names the packages.
pub fn ensure_debian(peers: &[(&str, &str)]) -> anyhow::Result<()> {
    use std::process::Command;
    let missing: Vec<&str> = peers
        .iter()
        .filter(|(path, _)| !std::path::Path::new(path).is_file())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!("installing {list} with apt-get\n").as_bytes(),
    );
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    let ok = install()
        || (Command::new("apt-get")
            .arg("update")
            .status()
            .is_ok_and(|s| s.success())
            && install());
    anyhow::ensure!(ok, "cannot install {list} (run as root, or install them)");
    Ok(())
}

/// Kernel clock ticks per second for `/proc/PID/stat` times (`USER_HZ`, 100 on Linux).
pub const USER_HZ: f64 = 100.0;

/// utime + stime of `pid`, seconds (`/proc/PID/stat` fields 14 and 15); 0 when gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / USER_HZ
}

/// A `/proc/PID/status` memory line (`VmRSS:`, `VmHWM:`) in MiB; 0 when unreadable.
pub fn rss_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Median of `values` (mean of the middle two for an even count); NaN when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median, smallest and largest of a set of measurements (NaN values left out; all NaN
/// when there is none).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    /// [`median`] of the values.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
}

impl Spread {
    /// The spread of `values`.
    pub fn of(values: &[f64]) -> Spread {
        let v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Spread {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        Spread {
            median: median(&v),
            min: v.iter().copied().fold(f64::INFINITY, f64::min),
            max: v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// A number for a benchmark row: a plain decimal with at most 3 decimals (trailing zeros
/// dropped), `-` when not finite.
pub fn plain(x: f64) -> String {
    if !x.is_finite() {
        return "-".into();
    }
    let s = format!("{x:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" { "0".into() } else { s.into() }
}

/// One row of the issue-9 side-by-side format (see `bench/side-by-side.sh`), with its
/// newline: `scenario metric unit tocsin_median tocsin_min tocsin_max peer_name
/// peer_median peer_min peer_max target`, tab-separated; `peer` `None` gives `-` for the
/// peer's name and values. `unit` is `%cpu`, `MiB`, `ms`, `s` or `events/s`; `target` is
/// short text such as `<= 50 ms` or `-`.
pub fn tsv_row(
    scenario: &str,
    metric: &str,
    unit: &str,
    tocsin: &Spread,
    peer: Option<(&str, &Spread)>,
    target: &str,
) -> String {
    let (name, p) = match peer {
        Some((name, s)) => (name, *s),
        None => ("-", Spread::of(&[])),
    };
    [
        scenario.to_owned(),
        metric.to_owned(),
        unit.to_owned(),
        plain(tocsin.median),
        plain(tocsin.min),
        plain(tocsin.max),
        name.to_owned(),
        plain(p.median),
        plain(p.min),
        plain(p.max),
        target.to_owned(),
    ]
    .join("\t")
        + "\n"
}

/// Removes every `flag` (e.g. `--tsv`) from `args`; true when there was one.
pub fn take_flag(args: &mut Vec<String>, flag: &str) -> bool {
    let before = args.len();
    args.retain(|a| a != flag);
    args.len() != before
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tsv_row_has_eleven_plain_fields_and_dashes_without_a_peer() {
        let t = Spread::of(&[3.0, 1.25, 2.0, f64::NAN]);
        assert_eq!((t.median, t.min, t.max), (2.0, 1.25, 3.0));
        let row = tsv_row("restart", "restart_started", "ms", &t, None, "<= 50 ms");
        assert_eq!(
            row,
            "restart\trestart_started\tms\t2\t1.25\t3\t-\t-\t-\t-\t<= 50 ms\n"
        );
        let p = Spread::of(&[512.3456, 700.0]);
        let row = tsv_row(
            "restart",
            "restart_started",
            "ms",
            &t,
            Some(("monit", &p)),
            "-",
        );
        let fields: Vec<&str> = row.trim_end().split('\t').collect();
        assert_eq!(fields.len(), 11, "{row:?}");
        assert_eq!(&fields[6..10], ["monit", "606.173", "512.346", "700"]);
    }

    #[test]
    fn take_flag_removes_every_copy() {
        let mut args: Vec<String> = ["5", "--tsv", "3", "--tsv"].map(String::from).into();
        assert!(take_flag(&mut args, "--tsv"));
        assert_eq!(args, ["5", "3"]);
        assert!(!take_flag(&mut args, "--tsv"));
    }
}
