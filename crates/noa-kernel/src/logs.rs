//! Process logs: one JSON-lines file per process name, rotated by size, and a live copy on `sys.logs.<name>`.

use noa_bus::Bus;
use noa_types::{Pid, now_ms};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

/// One log line of a process.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LogLine {
    pub ts_ms: u64,
    pub pid: Pid,
    pub level: String,
    pub line: String,
}

/// The longest log line kept; longer ones are cut and marked.
pub const MAX_LOG_LINE: usize = 16 * 1024;

pub(crate) struct Logs {
    dir: PathBuf,
    max_bytes: u64,
    bus: Bus,
    files: Mutex<HashMap<String, (File, u64)>>,
}

impl Logs {
    pub fn new(dir: PathBuf, max_bytes: u64, bus: Bus) -> Logs {
        if let Err(e) = std::fs::create_dir_all(&dir) {
            tracing::error!(dir = %dir.display(), error = %e, "Cannot create the log directory; process logs will only go to the bus.");
        }
        Logs {
            dir,
            max_bytes,
            bus,
            files: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.log"))
    }

    pub fn append(&self, pid: Pid, name: &str, level: &str, line: &str) {
        let mut text = line.to_owned();
        if text.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str(" …[cut]");
        }
        let entry = LogLine {
            ts_ms: now_ms(),
            pid,
            level: level.to_owned(),
            line: text,
        };
        let Ok(mut json) = serde_json::to_string(&entry) else {
            return;
        };
        if let Ok(subject) = noa_bus::Subject::new(&format!("sys.logs.{name}")) {
            let _ = self
                .bus
                .publish(noa_bus::Message::new(subject, json.clone()));
        }
        json.push('\n');
        let mut files = self.files.lock();
        if !files.contains_key(name) {
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(name))
            {
                Ok(f) => {
                    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
                    files.insert(name.to_owned(), (f, len));
                }
                Err(e) => {
                    tracing::warn!(name, error = %e, "Cannot open the process log file.");
                    return;
                }
            }
        }
        let Some((file, len)) = files.get_mut(name) else {
            return;
        };
        if file.write_all(json.as_bytes()).is_ok() {
            *len += json.len() as u64;
        }
        if *len > self.max_bytes {
            // Keep one rotated file: at most about twice max_bytes per process on disk.
            let path = self.path(name);
            let _ = std::fs::rename(&path, path.with_extension("log.1"));
            files.remove(name);
        }
    }

    /// The last `tail` lines of a process's log, oldest first.
    pub fn read(&self, name: &str, tail: usize) -> Vec<LogLine> {
        let mut lines = Vec::new();
        let path = self.path(name);
        for p in [path.with_extension("log.1"), path] {
            if let Ok(f) = File::open(&p) {
                for l in BufReader::new(f).lines().map_while(Result::ok) {
                    if let Ok(entry) = serde_json::from_str::<LogLine>(&l) {
                        lines.push(entry);
                    }
                }
            }
        }
        let skip = lines.len().saturating_sub(tail);
        lines.split_off(skip)
    }
}
