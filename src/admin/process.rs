//! Process metrics read from /proc/self at scrape time: resident memory, open fds, CPU time, start time.

use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

/// Clock ticks per second of /proc/self/stat times; 100 on every Linux configuration we target.
const TICKS_PER_SECOND: f64 = 100.0;

fn page_size() -> u64 {
    4096
}

pub fn register(registry: &mut Registry) {
    let p = registry.sub_registry_with_prefix("process");
    if let Ok(statm) = std::fs::read_to_string("/proc/self/statm") {
        if let Some(rss_pages) = statm
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
        {
            p.register(
                "resident_memory_bytes",
                "Resident memory size in bytes",
                ConstGauge::new((rss_pages * page_size()) as i64),
            );
        }
        if let Some(vm_pages) = statm
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            p.register(
                "virtual_memory_bytes",
                "Virtual memory size in bytes",
                ConstGauge::new((vm_pages * page_size()) as i64),
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
    if let Ok(stat) = std::fs::read_to_string("/proc/self/stat") {
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15 (1-based).
        if let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) {
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime = fields
                .get(11)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            let stime = fields
                .get(12)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
            p.register(
                "cpu_seconds",
                "User and system CPU time in seconds",
                ConstCounter::new((utime + stime) / TICKS_PER_SECOND),
            );
        }
    }
}
