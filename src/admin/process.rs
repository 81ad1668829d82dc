//! Process metrics, read from `/proc/self` at scrape time: resident and virtual memory, open and maximum
//! file descriptors, CPU time and start time, under the `process_` names every Prometheus exporter uses.
//!
//! Nothing here runs between scrapes. A file that cannot be read (no procfs) leaves its metrics out of the
//! scrape rather than reporting a made-up zero.

use std::sync::LazyLock;

use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::{Registry, Unit};

/// Sizes the kernel reports in: (page size in bytes, clock ticks per second), asked once.
#[allow(unsafe_code)]
static SYSTEM: LazyLock<(u64, f64)> = LazyLock::new(|| {
    // SAFETY: sysconf only reads a configuration value; it has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    // SAFETY: as above.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (
        if page > 0 { page as u64 } else { 4096 },
        if ticks > 0 { ticks as f64 } else { 100.0 },
    )
});

/// The machine's boot time in seconds since the epoch (`btime` in /proc/stat), to turn the process's start
/// tick count into a timestamp.
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse::<f64>().ok())
}

/// The soft limit on open files (`Max open files` in /proc/self/limits).
fn max_fds() -> Option<i64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .and_then(|v| v.parse::<i64>().ok())
}

/// Add this scrape's process metrics to `registry`.
pub fn register(registry: &mut Registry) {
    let (page_size, ticks) = *SYSTEM;
    let p = registry.sub_registry_with_prefix("process");
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        let mut fields = statm.split_whitespace().map(|v| v.parse::<u64>().ok());
        let size = fields.next().flatten();
        let resident = fields.next().flatten();
        if let Some(pages) = resident {
            p.register_with_unit(
                "resident_memory",
                "Resident memory size",
                Unit::Bytes,
                ConstGauge::new((pages * page_size) as i64),
            );
        }
        if let Some(pages) = size {
            p.register_with_unit(
                "virtual_memory",
                "Virtual memory size",
                Unit::Bytes,
                ConstGauge::new((pages * page_size) as i64),
            );
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        p.register(
            "open_fds",
            "Open file descriptors",
            ConstGauge::new(dir.count() as i64),
        );
    }
    if let Some(max) = max_fds() {
        p.register(
            "max_fds",
            "Limit on open file descriptors",
            ConstGauge::new(max),
        );
    }
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // The command name is in parentheses and may hold spaces; count fields after its closing one.
        // utime, stime and starttime are fields 14, 15 and 22 of the whole line.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                p.register_with_unit(
                    "cpu",
                    "User and system CPU time",
                    Unit::Seconds,
                    ConstCounter::new((utime + stime) / ticks),
                );
            }
            if let (Some(start), Some(boot)) = (field(22), boot_time()) {
                p.register_with_unit(
                    "start_time",
                    "Start time of the process since the Unix epoch",
                    Unit::Seconds,
                    ConstGauge::new(boot + start / ticks),
                );
            }
        }
    }
}
