//! CPU profiles of the daemon for targets that are missed: `perf record -g` attached to the daemon's pid
//! while a scenario runs, then the hottest symbols from `perf report`. Without `perf` nothing is recorded.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::BenchError;

/// A `perf record` attached to a process.
pub struct Recording {
    child: std::process::Child,
    data: std::path::PathBuf,
}

/// True when `perf` can be run.
pub fn available() -> bool {
    Command::new("perf")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Start sampling `pid` with call graphs into `data`.
pub fn start(pid: u32, data: &Path) -> Result<Recording, BenchError> {
    let child = Command::new("perf")
        .args(["record", "-F", "999", "-g", "-q", "-o"])
        .arg(data)
        .args(["-p", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    // perf needs a moment to attach before the interesting work starts.
    std::thread::sleep(Duration::from_millis(300));
    Ok(Recording {
        child,
        data: data.to_path_buf(),
    })
}

impl Recording {
    /// Stop sampling and return two flat tables: the symbols with the most self time, and the daemon's own
    /// functions with the most time including callees (where the time goes, by code path).
    pub fn finish(mut self) -> Result<String, BenchError> {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let self_time = self.report(&["--no-children"], None, 15)?;
        let inclusive = self.report(&["--children"], Some(" cc-proxy "), 30)?;
        Ok(format!(
            "self time, all code:\n{self_time}\n\nincluding callees, functions in cc-proxy:\n{inclusive}"
        ))
    }

    fn report(&self, mode: &[&str], dso: Option<&str>, lines: usize) -> Result<String, BenchError> {
        let out = Command::new("perf")
            .args(["report", "--stdio", "-g", "none", "--percent-limit", "1.5"])
            .args(["--sort", "dso,symbol"])
            .args(mode)
            .arg("-i")
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter(|l| dso.is_none_or(|d| l.contains(d)))
            .take(lines)
            .map(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let mut line = words.join(" ");
                // Drop trailing empty columns ("-") that some perf versions print.
                while line.ends_with(" -") {
                    line.truncate(line.len() - 2);
                }
                // Keep symbols readable: long generic Rust paths are cut.
                if line.chars().count() > 160 {
                    line = line.chars().take(157).collect::<String>() + "...";
                }
                line
            })
            .collect::<Vec<_>>()
            .join("\n"))
    }
}
