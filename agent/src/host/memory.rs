//! RAM and swap from `/proc/meminfo`.

/// RAM and swap use, from `/proc/meminfo`.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryUsage {
    /// Used percent 0–100 = (MemTotal − MemAvailable) / MemTotal. Page cache and
    /// reclaimable slab are not "used": the kernel counts them in MemAvailable.
    ///
    /// Kernels before 3.14 have no MemAvailable; then available is estimated as
    /// MemFree + Buffers + Cached (an over-estimate: some cache cannot be dropped).
    pub used_pct: f64,
    /// MemTotal in bytes: RAM the kernel manages (physical RAM minus firmware and kernel
    /// image reservations).
    pub total_bytes: u64,
    /// MemAvailable in bytes (or the estimate above): what can be allocated without
    /// swapping. At most `total_bytes`.
    pub available_bytes: u64,
    /// Swap used percent 0–100 = (SwapTotal − SwapFree) / SwapTotal; `None` when there
    /// is no swap (SwapTotal = 0).
    pub swap_used_pct: Option<f64>,
    /// SwapTotal in bytes; 0 without swap.
    pub swap_total_bytes: u64,
}

/// The `/proc/meminfo` fields used here, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct MemInfo {
    pub(super) total: u64,
    pub(super) free: u64,
    pub(super) available: Option<u64>,
    pub(super) buffers: u64,
    pub(super) cached: u64,
    pub(super) swap_total: u64,
    pub(super) swap_free: u64,
}

impl MemInfo {
    /// The values with units (see [`MemoryUsage`]).
    pub(super) fn usage(&self) -> MemoryUsage {
        let estimate = || {
            self.free
                .saturating_add(self.buffers)
                .saturating_add(self.cached)
        };
        let available = self.available.unwrap_or_else(estimate).min(self.total);
        let used_pct = (self.total - available) as f64 * 100.0 / self.total as f64;
        let swap_used_pct = (self.swap_total > 0).then(|| {
            let used = self.swap_total - self.swap_free.min(self.swap_total);
            used as f64 * 100.0 / self.swap_total as f64
        });
        MemoryUsage {
            used_pct: used_pct.clamp(0.0, 100.0),
            total_bytes: self.total,
            available_bytes: available,
            swap_used_pct,
            swap_total_bytes: self.swap_total,
        }
    }
}

/// Parses `/proc/meminfo` lines `Name:   123 kB`. Missing fields other than MemTotal
/// read 0 (MemAvailable: absent).
///
/// # Errors
/// A message when MemTotal is missing, unparsable or 0.
pub(super) fn parse(text: &str) -> Result<MemInfo, String> {
    let mut m = MemInfo::default();
    let mut total = None;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let value = bytes(rest);
        match key {
            "MemTotal" => total = value,
            "MemAvailable" => m.available = value,
            "MemFree" => m.free = value.unwrap_or(0),
            "Buffers" => m.buffers = value.unwrap_or(0),
            "Cached" => m.cached = value.unwrap_or(0),
            "SwapTotal" => m.swap_total = value.unwrap_or(0),
            "SwapFree" => m.swap_free = value.unwrap_or(0),
            _ => {}
        }
    }
    m.total = match total {
        Some(t) if t > 0 => t,
        _ => return Err("no usable MemTotal".to_owned()),
    };
    Ok(m)
}

/// ` 123 kB` → 125952; a value without unit is in bytes.
fn bytes(rest: &str) -> Option<u64> {
    let mut it = rest.split_ascii_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    match it.next() {
        None => Some(n),
        Some("kB") => n.checked_mul(1024),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODERN: &str = "MemTotal:       16000000 kB
MemFree:         2000000 kB
MemAvailable:   12000000 kB
Buffers:          500000 kB
Cached:          9000000 kB
SwapCached:            0 kB
Active:          3000000 kB
SwapTotal:       4000000 kB
SwapFree:        3000000 kB
HugePages_Total:       0
Hugepagesize:       2048 kB
";

    #[test]
    fn used_is_total_minus_available() {
        let u = parse(MODERN).expect("parses").usage();
        assert_eq!(u.total_bytes, 16_000_000 * 1024);
        assert_eq!(u.available_bytes, 12_000_000 * 1024);
        assert!((u.used_pct - 25.0).abs() < 1e-9, "{u:?}");
        assert_eq!(u.swap_total_bytes, 4_000_000 * 1024);
        assert_eq!(u.swap_used_pct, Some(25.0));
    }

    #[test]
    fn old_kernel_without_memavailable_estimates_from_free_buffers_cached() {
        let text = MODERN.replace("MemAvailable:   12000000 kB\n", "");
        let m = parse(&text).expect("parses");
        assert_eq!(m.available, None);
        let u = m.usage();
        // 2 000 000 + 500 000 + 9 000 000 = 11 500 000 available of 16 000 000.
        assert_eq!(u.available_bytes, 11_500_000 * 1024);
        assert!((u.used_pct - 28.125).abs() < 1e-9, "{u:?}");
    }

    #[test]
    fn no_swap_is_none_not_zero() {
        let text = MODERN
            .replace("SwapTotal:       4000000", "SwapTotal:             0")
            .replace("SwapFree:        3000000", "SwapFree:              0");
        let u = parse(&text).expect("parses").usage();
        assert_eq!(u.swap_used_pct, None);
        assert_eq!(u.swap_total_bytes, 0);
    }

    #[test]
    fn odd_values_stay_in_range() {
        // Available above total (never seen, but clamp rather than underflow).
        let u =
            parse("MemTotal: 100 kB\nMemAvailable: 200 kB\nSwapTotal: 10 kB\nSwapFree: 20 kB\n")
                .expect("parses")
                .usage();
        assert_eq!(u.used_pct, 0.0);
        assert_eq!(u.available_bytes, 100 * 1024);
        assert_eq!(u.swap_used_pct, Some(0.0));
        // An unparsable MemAvailable is treated as absent.
        let m = parse("MemTotal: 100 kB\nMemAvailable: lots\nMemFree: 50 kB\n").expect("parses");
        assert!((m.usage().used_pct - 50.0).abs() < 1e-9);
    }

    #[test]
    fn missing_or_zero_total_is_an_error() {
        assert!(parse("MemFree: 1 kB\n").is_err());
        assert!(parse("MemTotal: 0 kB\n").is_err());
        assert!(parse("MemTotal: 12 MB\n").is_err());
        assert!(parse("").is_err());
    }

    #[test]
    fn real_meminfo_parses() {
        let text = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
        let m = parse(&text).expect("parses");
        assert!(m.available.is_some(), "this kernel has MemAvailable");
        let u = m.usage();
        assert!(u.used_pct > 0.0 && u.used_pct < 100.0, "{u:?}");
    }
}
