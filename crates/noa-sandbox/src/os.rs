//! The OS calls the sandbox needs: resource limits and parent-death signal in the child before exec,
//! signals to process groups, and process start times. The only `unsafe` code of the sandbox is here.
#![allow(unsafe_code)]

use std::io;

/// Limits applied to a child before it executes its program.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChildLimits {
    pub memory_bytes: Option<u64>,
    pub cpu_seconds: Option<u64>,
    pub open_files: Option<u64>,
}

fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: value as libc::rlim_t,
        rlim_max: value as libc::rlim_t,
    };
    // SAFETY: `lim` is a valid rlimit that lives across the call; setrlimit is async-signal-safe.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Installs a hook that runs in the child between fork and exec: rlimits, and SIGKILL when the daemon dies.
pub fn apply_in_child(cmd: &mut tokio::process::Command, limits: ChildLimits) {
    // SAFETY: getpid is always safe; we read the daemon's pid before forking.
    let daemon = unsafe { libc::getpid() };
    let hook = move || -> io::Result<()> {
        if let Some(m) = limits.memory_bytes {
            setrlimit(libc::RLIMIT_AS, m)?;
        }
        if let Some(c) = limits.cpu_seconds {
            // The soft limit sends SIGXCPU; the hard limit one second later ends a process that ignores it.
            let lim = libc::rlimit {
                rlim_cur: c as libc::rlim_t,
                rlim_max: c.saturating_add(1) as libc::rlim_t,
            };
            // SAFETY: as in `setrlimit` above.
            if unsafe { libc::setrlimit(libc::RLIMIT_CPU, &lim) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(n) = limits.open_files {
            setrlimit(libc::RLIMIT_NOFILE, n)?;
        }
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and has no memory effects; async-signal-safe.
        if unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            )
        } != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The daemon may have died before the line above took effect: then do not run at all.
        // SAFETY: getppid is async-signal-safe and always succeeds.
        if unsafe { libc::getppid() } != daemon {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls (setrlimit, prctl, getppid) and allocates
    // nothing on its success path, as required between fork and exec.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Sends `signal` to every process in the group `pgid`. Errors (the group is gone) are ignored.
pub fn kill_group(pgid: u32, signal: i32) {
    if pgid == 0 || pgid > i32::MAX as u32 {
        return;
    }
    // SAFETY: kill with a negative pid signals a process group; it has no memory effects.
    unsafe {
        libc::kill(-(pgid as i32), signal);
    }
}

/// The start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may contain spaces and parentheses; fields after it follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// A signal's name, for messages.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU: CPU time limit exceeded",
        libc::SIGXFSZ => "SIGXFSZ",
        _ => "signal",
    }
}

/// Makes a write to a closed pipe end the process quietly, as Unix tools do (`noa … | head`).
/// Only for short-lived CLI commands: the daemon keeps SIGPIPE ignored and sees EPIPE as an error.
pub fn restore_default_sigpipe() {
    // SAFETY: setting a signal's disposition to SIG_DFL has no memory effects.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_own_start_time() {
        let me = std::process::id();
        let a = super::start_time(me).unwrap();
        assert_eq!(super::start_time(me), Some(a));
        assert_eq!(super::start_time(u32::MAX), None);
    }
}
