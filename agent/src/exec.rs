//! A safe child-process runner: one program, one argument vector, no shell, bounded in
//! time and output, and nothing left running afterwards.
//!
//! It owns spawning, the environment the child sees, the timeout with its SIGTERM →
//! SIGKILL escalation, output capture and reaping. It does not interpret the output (see
//! `nagios` for plugin output) nor decide when or how often to run (the caller's
//! schedule, `recovery` for restart budgets).
//!
//! How a run goes:
//! - The environment is **cleared**; the child gets `PATH` (the agent's own `PATH`, or
//!   [`DEFAULT_PATH`] when the agent has none), `LC_ALL=C` (so plugins print `0.5`, not
//!   `0,5`, and English messages), then [`Spec::env`], which may override both.
//! - stdin is `/dev/null`; stdout and stderr are pipes.
//! - The child leads a new process group (`process_group(0)`), so every process it starts
//!   can be signalled at once.
//! - When [`Spec::timeout`] passes, the whole group gets SIGTERM, and SIGKILL
//!   [`Spec::kill_grace`] later if the leader is still alive.
//! - When the leader has exited, the pipes are drained for at most [`DRAIN_AFTER_EXIT`];
//!   then **whatever is left in the group is SIGKILLed** — unless
//!   [`Spec::keep_leftovers`] (recovery actions that start a daemon).
//! - The leader is always reaped. On Linux ≥ 5.3 its exit is observed through a pidfd
//!   *before* it is reaped, so the group id cannot have been recycled when it is
//!   signalled; without pidfd (old kernel, seccomp) the stragglers are killed right after
//!   the reap, which leaves a theoretical window for PID reuse.

use std::future::Future;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use rustix::process::{Pid, PidfdFlags, Signal};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Child;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// `PATH` given to children when the agent itself has no (or an empty) `PATH`.
pub const DEFAULT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// Default for [`Spec::timeout`] (the seed's `HEALTH_CHECK_TIMEOUT`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default for [`Spec::kill_grace`]: time between SIGTERM and SIGKILL.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(5);

/// Default for [`Spec::max_output`]: bytes kept per stream (64 KiB, the pipe buffer size
/// of Linux; Nagios plugins print far less).
pub const DEFAULT_MAX_OUTPUT: usize = 64 * 1024;

/// How long the pipes are read after the leader exited before the rest of its process
/// group is killed (a background grandchild may hold stdout open forever).
pub const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(250);

/// How long the pipes are read after the group was SIGKILLed before giving up on them.
const DRAIN_AFTER_KILL: Duration = Duration::from_millis(250);

/// How long to wait for the leader to die after SIGKILL (a process stuck in
/// uninterruptible sleep dies only when the kernel lets it). After that `run` returns and
/// the tokio runtime reaps the child whenever it dies.
const REAP_AFTER_KILL: Duration = Duration::from_secs(5);

/// Read size of the output pumps.
const READ_CHUNK: usize = 16 * 1024;

/// What to run and within which limits.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    /// `argv[0]` is the program (an absolute path, or a name looked up on the child's
    /// `PATH`), the rest its arguments, passed literally: never through a shell.
    pub argv: Vec<String>,
    /// Environment variables added to the cleared environment, after `PATH` and
    /// `LC_ALL=C` (see the module docs), so they may override both.
    pub env: Vec<(String, String)>,
    /// Working directory; `None` = the agent's.
    pub cwd: Option<PathBuf>,
    /// Time the program may run before its process group gets SIGTERM.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL of the process group.
    pub kill_grace: Duration,
    /// Bytes kept per stream (stdout, stderr); the rest is read and discarded so the child
    /// never blocks on a full pipe.
    pub max_output: usize,
    /// Leave the processes the command started running after it exits (a recovery
    /// action that starts a daemon). Off: whatever is left in the group is killed.
    /// A timeout kills the whole group either way.
    pub keep_leftovers: bool,
}

impl Spec {
    /// A spec for `argv` with [`DEFAULT_TIMEOUT`], [`DEFAULT_KILL_GRACE`],
    /// [`DEFAULT_MAX_OUTPUT`], no extra environment and the agent's working directory.
    pub fn new(argv: Vec<String>) -> Self {
        Spec {
            argv,
            env: Vec::new(),
            cwd: None,
            timeout: DEFAULT_TIMEOUT,
            kill_grace: DEFAULT_KILL_GRACE,
            max_output: DEFAULT_MAX_OUTPUT,
            keep_leftovers: false,
        }
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitKind {
    /// The program exited with this code (0–255).
    Exited(i32),
    /// The program was killed by this signal number (not by us: a timeout is
    /// [`ExitKind::TimedOut`]).
    Signaled(i32),
    /// [`Spec::timeout`] passed; the process group was terminated.
    TimedOut,
    /// The program could not be started (or waited for); the message names the program
    /// and the OS error, e.g. `"/usr/lib/x/check_foo: No such file or directory (os error 2)"`.
    SpawnFailed(String),
}

/// The result of [`run`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// How the run ended.
    pub status: ExitKind,
    /// Standard output as lossy UTF-8, at most [`Spec::max_output`] bytes cut on a
    /// character boundary, followed by `"…[truncated, N bytes]"` (N = all bytes the stream
    /// carried) when cut.
    pub stdout: String,
    /// Standard error, same form as `stdout`.
    pub stderr: String,
    /// Wall time from spawn to reap (including the drain after exit).
    pub duration: Duration,
    /// `stdout` was cut at [`Spec::max_output`].
    pub stdout_truncated: bool,
    /// `stderr` was cut at [`Spec::max_output`].
    pub stderr_truncated: bool,
}

impl Outcome {
    fn failed(message: String) -> Self {
        Outcome {
            status: ExitKind::SpawnFailed(message),
            stdout: String::new(),
            stderr: String::new(),
            duration: Duration::ZERO,
            stdout_truncated: false,
            stderr_truncated: false,
        }
    }
}

/// The `PATH` children get unless [`Spec::env`] sets one: the agent's own, or
/// [`DEFAULT_PATH`] when unset or empty. Config validation resolves bare program names
/// with the same value.
pub fn child_path() -> String {
    std::env::var("PATH")
        .ok()
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.to_owned())
}

/// Runs `spec` to completion and reports how it ended. Never fails: spawn errors are
/// [`ExitKind::SpawnFailed`]. Returns within about `timeout + kill_grace +`
/// [`DRAIN_AFTER_EXIT`] `+ 0.25 s`, with the leader reaped and its process group killed;
/// a leader stuck in uninterruptible sleep, which even SIGKILL cannot end at once, may add
/// up to 10 s, after which `run` returns without it (the tokio runtime reaps it later).
pub async fn run(spec: &Spec) -> Outcome {
    run_with(spec, true).await
}

/// [`run`], optionally without the pidfd (to test the fallback for kernels without one).
async fn run_with(spec: &Spec, use_pidfd: bool) -> Outcome {
    let Some(program) = spec.argv.first() else {
        return Outcome::failed("empty command: no program to run".to_owned());
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(&spec.argv[1..])
        .env_clear()
        .env("PATH", child_path())
        .env("LC_ALL", "C")
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    let started = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::failed(format!("{program}: {e}")),
    };
    let Some(pgid) = child
        .id()
        .and_then(|id| Pid::from_raw(i32::try_from(id).ok()?))
    else {
        // Unreachable after a successful spawn; kill_on_drop cleans up.
        return Outcome::failed(format!("{program}: spawned but has no process id"));
    };
    // Declared after `child`, so dropped before it: a run abandoned mid-way (its future
    // dropped, e.g. when the agent shuts down) kills the whole group while the leader is
    // not reaped yet, instead of only the leader (`kill_on_drop`).
    let mut group = GroupKill(Some(pgid));
    let stop = CancellationToken::new();
    let mut pumps = Pumps::new(
        child.stdout.take(),
        child.stderr.take(),
        spec.max_output,
        &stop,
    );
    // The pidfd lets us see the exit without reaping, so the group id stays ours.
    let pidfd = use_pidfd
        .then(|| rustix::process::pidfd_open(pgid, PidfdFlags::empty()).ok())
        .flatten()
        .and_then(register_pidfd);

    let (status, reaped) = pumps
        .alongside(supervise(&mut child, pidfd.as_ref(), pgid, spec))
        .await;
    let timed_out = matches!(status, Some(ExitKind::TimedOut));
    let keep = spec.keep_leftovers && !timed_out;
    if !pumps.until(Instant::now() + DRAIN_AFTER_EXIT).await && !keep {
        // Someone in the group still holds a pipe open: a background grandchild.
        signal_group(pgid, Signal::KILL);
        pumps.until(Instant::now() + DRAIN_AFTER_KILL).await;
    }
    let reaped = match reaped {
        Some(s) => Some(s),
        None => {
            // With a pidfd the leader is an unreaped zombie: its group id cannot be reused
            // yet, so this reaches only our stragglers.
            if !keep {
                signal_group(pgid, Signal::KILL);
            }
            tokio::time::timeout(REAP_AFTER_KILL, child.wait())
                .await
                .ok()
                .and_then(Result::ok)
        }
    };
    if pidfd.is_none() && !keep {
        // Without a pidfd the leader was reaped already; see the module docs.
        signal_group(pgid, Signal::KILL);
    }
    // Reaped and cleaned up: the group id may be reused from now on.
    group.disarm();
    stop.cancel();
    let (out, err) = pumps.finish().await;
    let status = match status {
        Some(kind) => kind,
        None => match reaped {
            Some(s) => exit_kind(s),
            None => ExitKind::SpawnFailed(format!("{program}: could not be reaped")),
        },
    };
    let (stdout, stdout_truncated) = out.render(spec.max_output);
    let (stderr, stderr_truncated) = err.render(spec.max_output);
    Outcome {
        status,
        stdout,
        stderr,
        duration: started.elapsed(),
        stdout_truncated,
        stderr_truncated,
    }
}

/// Registers a pidfd with the tokio reactor; `None` if that fails (the caller falls back to
/// a plain wait).
#[expect(
    deprecated,
    reason = "tokio 1.54 deprecated AsyncFd::new because a generic AsRawFd may change or close \
              its fd; an OwnedFd cannot, and the replacement `register` is unsafe, which the \
              workspace forbids"
)]
fn register_pidfd(fd: OwnedFd) -> Option<AsyncFd<OwnedFd>> {
    AsyncFd::new(fd).ok()
}

/// Waits for the leader to exit, enforcing the timeout. Returns the final kind when it is
/// already decided (timeout, wait error) and the exit status when the leader was reaped.
async fn supervise(
    child: &mut Child,
    pidfd: Option<&AsyncFd<OwnedFd>>,
    pgid: Pid,
    spec: &Spec,
) -> (Option<ExitKind>, Option<ExitStatus>) {
    match tokio::time::timeout(spec.timeout, leader_exit(child, pidfd)).await {
        Ok(Ok(reaped)) => (None, reaped),
        Ok(Err(e)) => {
            signal_group(pgid, Signal::KILL);
            let program = spec.argv.first().map_or("", String::as_str);
            (
                Some(ExitKind::SpawnFailed(format!("{program}: wait: {e}"))),
                None,
            )
        }
        Err(_) => {
            signal_group(pgid, Signal::TERM);
            let reaped =
                match tokio::time::timeout(spec.kill_grace, leader_exit(child, pidfd)).await {
                    Ok(Ok(reaped)) => reaped,
                    _ => {
                        signal_group(pgid, Signal::KILL);
                        tokio::time::timeout(REAP_AFTER_KILL, leader_exit(child, pidfd))
                            .await
                            .ok()
                            .and_then(Result::ok)
                            .flatten()
                    }
                };
            (Some(ExitKind::TimedOut), reaped)
        }
    }
}

/// Resolves when the leader has exited. With a pidfd the leader is left unreaped (a
/// zombie) and `None` is returned; without one it is reaped and its status returned.
async fn leader_exit(
    child: &mut Child,
    pidfd: Option<&AsyncFd<OwnedFd>>,
) -> std::io::Result<Option<ExitStatus>> {
    match pidfd {
        Some(fd) => {
            // A pidfd becomes readable when the process exits; readiness is never cleared.
            let _guard = fd.readable().await?;
            Ok(None)
        }
        None => child.wait().await.map(Some),
    }
}

/// SIGKILLs a child's process group when dropped, unless disarmed.
#[derive(Debug)]
struct GroupKill(Option<Pid>);

impl GroupKill {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            signal_group(pgid, Signal::KILL);
        }
    }
}

/// Sends `sig` to every process of group `pgid`; "no such group" is the normal case once
/// everything has exited.
fn signal_group(pgid: Pid, sig: Signal) {
    if let Err(e) = rustix::process::kill_process_group(pgid, sig)
        && e != rustix::io::Errno::SRCH
    {
        tracing::debug!(pgid = pgid.as_raw_nonzero().get(), error = %e, "cannot signal process group");
    }
}

fn exit_kind(s: ExitStatus) -> ExitKind {
    match (s.code(), s.signal()) {
        (Some(code), _) => ExitKind::Exited(code),
        (None, Some(sig)) => ExitKind::Signaled(sig),
        // Neither code nor signal: not possible for a reaped child on Linux.
        (None, None) => ExitKind::Exited(-1),
    }
}

/// Bytes read from one stream: the kept prefix and the total count.
#[derive(Debug, Default)]
struct Captured {
    kept: Vec<u8>,
    total: u64,
}

impl Captured {
    /// Lossy UTF-8 text, cut on a character boundary with the truncation marker.
    fn render(self, max: usize) -> (String, bool) {
        let truncated = self.total > self.kept.len() as u64 || self.kept.len() > max;
        if !truncated {
            return (String::from_utf8_lossy(&self.kept).into_owned(), false);
        }
        let mut kept = &self.kept[..self.kept.len().min(max)];
        kept = &kept[..complete_prefix(kept)];
        let mut text = String::from_utf8_lossy(kept).into_owned();
        text.push_str(&format!("…[truncated, {} bytes]", self.total));
        (text, true)
    }
}

/// Length of `bytes` without a trailing incomplete UTF-8 sequence (one cut by truncation).
fn complete_prefix(bytes: &[u8]) -> usize {
    let len = bytes.len();
    // A UTF-8 sequence is at most 4 bytes: look at the last 3 for its lead byte.
    for back in 1..=3.min(len) {
        let b = bytes[len - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte
        }
        let width = match b {
            0x00..=0x7f => 1,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 3,
            0xf0..=0xf7 => 4,
            _ => 1, // invalid lead byte: lossy decoding replaces it
        };
        return if width > back { len - back } else { len };
    }
    len
}

/// Reads a stream until EOF or `stop`, keeping the first `max` bytes and discarding (but
/// counting) the rest.
async fn pump(
    stream: Option<impl AsyncRead + Unpin>,
    max: usize,
    stop: CancellationToken,
) -> Captured {
    let mut cap = Captured::default();
    let Some(mut stream) = stream else {
        return cap;
    };
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let n = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            r = stream.read(&mut buf) => match r {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            },
        };
        cap.total += n as u64;
        let room = max.saturating_sub(cap.kept.len());
        cap.kept.extend_from_slice(&buf[..n.min(room)]);
    }
    cap
}

type PumpFuture = Pin<Box<dyn Future<Output = Captured> + Send>>;

/// The stdout and stderr pumps, polled alongside whatever `run` is waiting for so the
/// child never blocks on a full pipe.
struct Pumps {
    out: PumpFuture,
    err: PumpFuture,
    out_done: Option<Captured>,
    err_done: Option<Captured>,
}

impl Pumps {
    fn new(
        stdout: Option<tokio::process::ChildStdout>,
        stderr: Option<tokio::process::ChildStderr>,
        max: usize,
        stop: &CancellationToken,
    ) -> Self {
        Pumps {
            out: Box::pin(pump(stdout, max, stop.clone())),
            err: Box::pin(pump(stderr, max, stop.clone())),
            out_done: None,
            err_done: None,
        }
    }

    fn done(&self) -> bool {
        self.out_done.is_some() && self.err_done.is_some()
    }

    /// Drives `f` to completion while pumping.
    async fn alongside<F: Future>(&mut self, f: F) -> F::Output {
        let mut f = std::pin::pin!(f);
        loop {
            tokio::select! {
                r = f.as_mut() => return r,
                c = &mut self.out, if self.out_done.is_none() => self.out_done = Some(c),
                c = &mut self.err, if self.err_done.is_none() => self.err_done = Some(c),
            }
        }
    }

    /// Pumps until both streams ended (true) or `deadline` passed (false).
    async fn until(&mut self, deadline: Instant) -> bool {
        let sleep = tokio::time::sleep_until(deadline);
        let mut sleep = std::pin::pin!(sleep);
        while !self.done() {
            tokio::select! {
                () = sleep.as_mut() => return false,
                c = &mut self.out, if self.out_done.is_none() => self.out_done = Some(c),
                c = &mut self.err, if self.err_done.is_none() => self.err_done = Some(c),
            }
        }
        true
    }

    /// Both captures; the stop token must be cancelled so unfinished pumps return at once.
    async fn finish(mut self) -> (Captured, Captured) {
        let out = match self.out_done.take() {
            Some(c) => c,
            None => self.out.await,
        };
        let err = match self.err_done.take() {
            Some(c) => c,
            None => self.err.await,
        };
        (out, err)
    }
}

impl std::fmt::Debug for Pumps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pumps")
            .field("out_done", &self.out_done.is_some())
            .field("err_done", &self.err_done.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Spec {
        Spec::new(vec!["/bin/sh".into(), "-c".into(), script.into()])
    }

    fn pid_alive(pid: i32) -> bool {
        // A zombie still has a /proc entry; look at its state.
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Ok(stat) => !stat
                .rsplit_once(") ")
                .is_some_and(|(_, rest)| rest.starts_with('Z')),
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn exit_codes_are_reported() {
        for code in [0, 1, 2, 3] {
            let out = run(&sh(&format!("echo out; echo err >&2; exit {code}"))).await;
            assert_eq!(out.status, ExitKind::Exited(code));
            assert_eq!(out.stdout, "out\n");
            assert_eq!(out.stderr, "err\n");
            assert!(!out.stdout_truncated);
        }
    }

    #[tokio::test]
    async fn a_signal_is_reported() {
        let out = run(&sh("kill -USR1 $$")).await;
        assert_eq!(out.status, ExitKind::Signaled(libc_sigusr1()));
    }

    fn libc_sigusr1() -> i32 {
        Signal::USR1.as_raw()
    }

    #[tokio::test]
    async fn shell_metacharacters_are_passed_literally() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("x");
        let arg = format!("svc; touch {} #", marker.display());
        // printf prints each argument on its own line: one line means one argument.
        let spec = Spec::new(vec![
            "/usr/bin/printf".into(),
            "[%s]\\n".into(),
            arg.clone(),
        ]);
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::Exited(0));
        assert_eq!(out.stdout, format!("[{arg}]\n"));
        assert!(!marker.exists(), "the argument was run by a shell");
    }

    #[tokio::test]
    async fn stdin_is_dev_null() {
        let mut spec = Spec::new(vec!["cat".into()]);
        spec.timeout = Duration::from_secs(5);
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::Exited(0));
        assert_eq!(out.stdout, "");
        assert!(out.duration < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn environment_is_cleared_with_path_and_c_locale() {
        let mut spec = Spec::new(vec!["/usr/bin/env".into()]);
        spec.env = vec![("TOCSIN_X".into(), "1".into())];
        let out = run(&spec).await;
        let mut vars: Vec<&str> = out.stdout.lines().collect();
        vars.sort_unstable();
        assert_eq!(
            vars,
            [
                "LC_ALL=C".to_owned(),
                format!("PATH={}", child_path()),
                "TOCSIN_X=1".to_owned()
            ]
        );
    }

    #[tokio::test]
    async fn env_overrides_path() {
        let mut spec = sh("echo $PATH");
        spec.env = vec![("PATH".into(), "/bin".into())];
        assert_eq!(run(&spec).await.stdout, "/bin\n");
    }

    #[tokio::test]
    async fn cwd_is_applied() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut spec = Spec::new(vec!["/bin/pwd".into()]);
        spec.cwd = Some(dir.path().to_owned());
        let out = run(&spec).await;
        let want = dir.path().canonicalize().expect("canonical");
        assert_eq!(out.stdout.trim_end(), want.to_str().expect("utf-8"));
    }

    #[tokio::test]
    async fn timeout_kills_sleep() {
        let mut spec = Spec::new(vec!["sleep".into(), "30".into()]);
        spec.timeout = Duration::from_millis(200);
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::TimedOut);
        assert!(out.duration < Duration::from_secs(10), "{:?}", out.duration);
    }

    #[tokio::test]
    async fn sigterm_ignored_gets_sigkill_after_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ready = dir.path().join("ready");
        // The trap is set before the marker is written, so the timeout cannot hit earlier.
        let mut spec = sh(&format!(
            "trap '' TERM; echo $$ > {}; while :; do sleep 0.05; done",
            ready.display()
        ));
        spec.timeout = Duration::from_millis(500);
        spec.kill_grace = Duration::from_millis(300);
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::TimedOut);
        let pid: i32 = std::fs::read_to_string(&ready)
            .expect("the script started")
            .trim()
            .parse()
            .expect("pid");
        assert!(!pid_alive(pid), "the script survived");
        // It took the grace period: SIGTERM alone did not end it.
        assert!(
            out.duration >= Duration::from_millis(800),
            "{:?}",
            out.duration
        );
        assert!(out.duration < Duration::from_secs(10), "{:?}", out.duration);
    }

    #[tokio::test]
    async fn background_grandchild_is_killed_and_run_returns() {
        // The grandchild inherits stdout and would keep the pipe open for 60 s.
        let spec = sh("sleep 60 & echo $!; exit 0");
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::Exited(0));
        assert!(out.duration < Duration::from_secs(5), "{:?}", out.duration);
        let pid: i32 = out.stdout.trim().parse().expect("grandchild pid");
        // The kill is synchronous but the kernel's exit path and its reaping by init are not.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "grandchild {pid} still running");
    }

    #[tokio::test]
    async fn without_pidfd_the_fallback_behaves_the_same() {
        let out = run_with(&sh("echo hi; exit 3"), false).await;
        assert_eq!(
            (out.status, out.stdout.as_str()),
            (ExitKind::Exited(3), "hi\n")
        );
        let mut spec = Spec::new(vec!["sleep".into(), "30".into()]);
        spec.timeout = Duration::from_millis(100);
        assert_eq!(run_with(&spec, false).await.status, ExitKind::TimedOut);
        let out = run_with(&sh("sleep 60 & echo $!"), false).await;
        assert_eq!(out.status, ExitKind::Exited(0));
        assert!(out.duration < Duration::from_secs(5), "{:?}", out.duration);
        let pid: i32 = out.stdout.trim().parse().expect("grandchild pid");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "grandchild {pid} still running");
    }

    #[tokio::test]
    async fn background_grandchild_without_pipes_is_killed() {
        let spec = sh("sleep 60 >/dev/null 2>&1 & echo $!");
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::Exited(0));
        let pid: i32 = out.stdout.trim().parse().expect("grandchild pid");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "grandchild {pid} still running");
    }

    #[tokio::test]
    async fn a_recovery_action_may_leave_its_daemon_running() {
        let mut spec = sh("sleep 60 >/dev/null 2>&1 & echo $!");
        spec.keep_leftovers = true;
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::Exited(0));
        let pid: i32 = out.stdout.trim().parse().expect("daemon pid");
        std::thread::sleep(Duration::from_millis(300));
        let alive = pid_alive(pid);
        if let Some(p) = rustix::process::Pid::from_raw(pid) {
            let _ = rustix::process::kill_process(p, Signal::KILL);
        }
        assert!(alive, "the started daemon {pid} was killed");
    }

    #[tokio::test]
    async fn regression_an_abandoned_run_leaves_no_grandchild() {
        // The agent shutting down drops a run in progress: before the fix only the leader
        // was killed (kill_on_drop) and its children ran on.
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pid");
        let spec = sh(&format!("sleep 60 & echo $! > {}; wait", file.display()));
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut run = Box::pin(run(&spec));
        let pid: i32 = loop {
            tokio::select! {
                out = run.as_mut() => panic!("the run ended: {out:?}"),
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
            if let Some(pid) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no grandchild started"
            );
        };
        drop(run);
        while pid_alive(pid) && std::time::Instant::now() < deadline + Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!pid_alive(pid), "grandchild {pid} still running");
    }

    #[tokio::test]
    async fn ten_megabytes_of_output_finish_with_bounded_capture() {
        let mut spec = Spec::new(vec![
            "/usr/bin/head".into(),
            "-c".into(),
            "10485760".into(),
            "/dev/zero".into(),
        ]);
        spec.max_output = 1000;
        spec.timeout = Duration::from_secs(30);
        let out = run(&spec).await;
        assert_eq!(out.status, ExitKind::Exited(0));
        assert!(out.stdout_truncated);
        assert!(
            out.stdout.ends_with("…[truncated, 10485760 bytes]"),
            "{}",
            &out.stdout[990..]
        );
        assert!(out.stdout.len() <= 1000 + "…[truncated, 10485760 bytes]".len());
    }

    #[tokio::test]
    async fn truncation_keeps_whole_characters() {
        // "é" is two bytes; a limit of 3 bytes falls inside the second one.
        let mut spec = sh("printf 'ééé'");
        spec.max_output = 3;
        let out = run(&spec).await;
        assert_eq!(out.stdout, "é…[truncated, 6 bytes]");
        spec.max_output = 6;
        let out = run(&spec).await;
        assert_eq!(out.stdout, "ééé");
        assert!(!out.stdout_truncated);
    }

    #[tokio::test]
    async fn missing_program_names_the_path() {
        let out = run(&Spec::new(vec!["/nonexistent/check_nothing".into()])).await;
        match out.status {
            ExitKind::SpawnFailed(m) => {
                assert!(m.contains("/nonexistent/check_nothing"), "{m}");
                assert!(m.contains("No such file"), "{m}");
            }
            other => panic!("expected SpawnFailed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn not_executable_is_a_spawn_failure() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("plain");
        std::fs::write(&file, "#!/bin/sh\nexit 0\n").expect("write");
        let path = file.to_str().expect("utf-8").to_owned();
        match run(&Spec::new(vec![path.clone()])).await.status {
            ExitKind::SpawnFailed(m) => assert!(m.contains(&path), "{m}"),
            other => panic!("expected SpawnFailed, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn empty_argv_is_a_spawn_failure() {
        let out = run(&Spec::new(Vec::new())).await;
        assert!(matches!(out.status, ExitKind::SpawnFailed(_)));
    }

    #[test]
    fn complete_prefix_cuts_partial_sequences_only() {
        assert_eq!(complete_prefix(b"abc"), 3);
        assert_eq!(complete_prefix("é".as_bytes()), 2);
        assert_eq!(complete_prefix(&"é".as_bytes()[..1]), 0);
        assert_eq!(complete_prefix(&"€".as_bytes()[..2]), 0);
        assert_eq!(complete_prefix(&"a😀".as_bytes()[..4]), 1);
        assert_eq!(complete_prefix("a😀".as_bytes()), 5);
        assert_eq!(complete_prefix(b""), 0);
    }
}
