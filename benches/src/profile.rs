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
    /// Stop sampling and return the top `lines` of a flat report by symbol (self time).
    pub fn finish(mut self, lines: usize) -> Result<String, BenchError> {
        let _ = Command::new("kill")
            .arg("-INT")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        let out = Command::new("perf")
            .args([
                "report",
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--sort",
                "dso,symbol",
                "--percent-limit",
                "1",
                "-i",
            ])
            .arg(&self.data)
            .stderr(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .take(lines)
            .map(|l| l.trim_end().to_string())
            .collect::<Vec<_>>()
            .join("\n"))
    }
}
