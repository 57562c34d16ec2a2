//! Load averages from `/proc/loadavg`.

/// The kernel's load averages, from `/proc/loadavg`: exponentially damped averages of the
/// number of tasks runnable or in uninterruptible sleep (usually disk or NFS I/O). Not a
/// percentage; compare with `cores` (see [`LoadAverage::per_core`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoadAverage {
    /// 1-minute average.
    pub one: f64,
    /// 5-minute average.
    pub five: f64,
    /// 15-minute average.
    pub fifteen: f64,
    /// Online CPUs of the host: the number of `cpuN` lines in the same cycle's
    /// `/proc/stat`. Only when `/proc/stat` could not be read, the CPUs this process may
    /// run on (`std::thread::available_parallelism`, which an affinity mask or cgroup
    /// quota can make smaller). At least 1.
    pub cores: usize,
}

impl LoadAverage {
    /// `[one, five, fifteen]` divided by `cores`: about 1.0 means every core is busy.
    pub fn per_core(&self) -> [f64; 3] {
        let cores = self.cores.max(1) as f64;
        [self.one / cores, self.five / cores, self.fifteen / cores]
    }
}

/// Parses `/proc/loadavg` (`0.52 0.58 0.59 2/345 12345`): the first three numbers.
///
/// # Errors
/// A message when one of them is missing, not a number or negative.
pub(super) fn parse(text: &str, cores: usize) -> Result<LoadAverage, String> {
    let mut it = text.split_ascii_whitespace();
    let mut next = |name: &str| {
        let raw = it.next().ok_or_else(|| format!("no {name} load average"))?;
        match raw.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => Ok(v),
            _ => Err(format!("{name} load average {raw:?} is not a number ≥ 0")),
        }
    };
    Ok(LoadAverage {
        one: next("1-minute")?,
        five: next("5-minute")?,
        fifteen: next("15-minute")?,
        cores: cores.max(1),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_numbers_and_per_core() {
        let l = parse("3.25 1.66 1.50 5/117 16136\n", 2).expect("parses");
        assert_eq!((l.one, l.five, l.fifteen, l.cores), (3.25, 1.66, 1.5, 2));
        assert_eq!(l.per_core(), [1.625, 0.83, 0.75]);
    }

    #[test]
    fn garbage_is_an_error_naming_the_field() {
        let e = parse("0.1 x 0.3 1/2 3", 1).expect_err("bad");
        assert!(e.contains("5-minute") && e.contains("\"x\""), "{e}");
        assert!(
            parse("0.1 0.2", 1)
                .expect_err("short")
                .contains("15-minute")
        );
        assert!(parse("-1 0 0", 1).is_err());
        assert!(parse("NaN 0 0", 1).is_err());
        assert!(parse("", 1).is_err());
    }

    #[test]
    fn zero_cores_is_one() {
        assert_eq!(parse("1 1 1", 0).expect("parses").cores, 1);
    }
}
