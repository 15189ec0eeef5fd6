//! Starts the real `noa` daemon on a free port with a temporary data directory, and runs the CLI against it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub fn noa_bin() -> &'static str {
    env!("CARGO_BIN_EXE_noa")
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub struct Daemon {
    pub child: Option<Child>,
    pub dir: PathBuf,
    /// More arguments for `noa up`.
    pub up_args: Vec<String>,
    /// More environment for `noa up`.
    pub up_env: Vec<(String, String)>,
    _tmp: Option<tempfile::TempDir>,
}

impl Daemon {
    pub fn start() -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let mut d = Daemon {
            child: None,
            dir,
            up_args: Vec::new(),
            up_env: Vec::new(),
            _tmp: Some(tmp),
        };
        d.launch();
        d
    }

    /// A daemon on an existing data directory (not removed afterwards).
    pub fn start_in(dir: &Path) -> Daemon {
        let mut d = Daemon {
            child: None,
            dir: dir.to_owned(),
            up_args: Vec::new(),
            up_env: Vec::new(),
            _tmp: None,
        };
        d.launch();
        d
    }

    /// Starts (again) on the same data directory.
    pub fn launch(&mut self) {
        let _ = std::fs::remove_file(self.dir.join("noa.addr"));
        let child = Command::new(noa_bin())
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&self.dir)
            .args(&self.up_args)
            .envs(self.up_env.iter().map(|(k, v)| (k, v)))
            .env("NOA_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.dir.join("noa.addr").exists() && self.noa(&["status"]).status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not become healthy"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn os_pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn noa(&self, args: &[&str]) -> Output {
        Command::new(noa_bin())
            .args(args)
            .env("NOA_DATA_DIR", &self.dir)
            .current_dir(repo_root())
            .output()
            .unwrap()
    }

    /// Runs the CLI and returns stdout, asserting success.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.noa(args);
        assert!(
            out.status.success(),
            "noa {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    pub fn process(&self, name: &str) -> serde_json::Value {
        self.json(&["ps"])
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn wait_for(&self, what: &str, cond: impl Fn(&Daemon) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cond(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn addr(&self) -> String {
        std::fs::read_to_string(self.dir.join("noa.addr"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn token(&self) -> String {
        std::fs::read_to_string(self.dir.join("admin.token"))
            .unwrap()
            .trim()
            .to_owned()
    }

    pub fn signal(&mut self, sig: &str) -> std::process::ExitStatus {
        Command::new("kill")
            .args([sig, &self.os_pid().to_string()])
            .status()
            .unwrap();
        self.child.take().unwrap().wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn alive(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
    })
}
