//! Takeover: a new `ontop serve --takeover` receives the listening socket
//! of the ontop serving its root, so that an upgrade or a restart without
//! systemd (a DaemonSet's rolling update) refuses no call: connections
//! made meanwhile wait in the socket's backlog, as under socket
//! activation.
//!
//! The serving ontop listens on a control socket beside its own,
//! `<address>.takeover` (mode 0600). The exchange, one line each way:
//!
//! 1. successor: `TAKEOVER <root>`; the server checks the peer's uid (its
//!    own) and that the root is its own, and answers `NO <why>` or
//! 2. server: stops accepting, then `FD <owned> <path>` with the listening
//!    socket attached (SCM_RIGHTS); `owned` is 1 when ontop bound it (and
//!    so removes it when it stops) and 0 when systemd passed it;
//! 3. successor: `ACK`. From then the server finishes its calls in flight,
//!    closes the database and exits, and the successor, once the root's
//!    lock is free, opens the database and serves the socket it received.
//!
//! Until the ACK the server has given nothing up: a successor that dies or
//! hangs before it leaves the server accepting again. One takeover at a
//! time: a second successor is told `NO`.

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use nix::sys::socket::{
    getsockopt, recvmsg, sendmsg, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
};

/// How long each side waits for the other's next line.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(10);

/// The control socket of the ontop serving on `address`.
pub fn control_path(address: &Path) -> PathBuf {
    let mut p = address.as_os_str().to_owned();
    p.push(".takeover");
    PathBuf::from(p)
}

/// What a successor receives: the listening socket, its path, and
/// whether ontop owns the socket file (bound it) or systemd does.
pub struct Handed {
    pub listener: UnixListener,
    pub path: PathBuf,
    pub owned: bool,
    /// The pid of the ontop that handed it over.
    pub from_pid: i32,
}

/// Asks the ontop serving `root` on `address` for its socket. None when
/// no ontop answers the control socket (none runs, or one too old to
/// know takeovers); an error when one answers but refuses or hangs.
pub fn take_over(address: &Path, root: &Path) -> anyhow::Result<Option<Handed>> {
    let control = control_path(address);
    let stream = match UnixStream::connect(&control) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", control.display())),
    };
    let peer = getsockopt(&stream, sockopt::PeerCredentials)?;
    if peer.uid() != nix::unistd::geteuid().as_raw() {
        bail!(
            "{} belongs to uid {}, not to this ontop's uid: refusing to take over from it",
            control.display(),
            peer.uid()
        );
    }
    let hung = || {
        format!(
            "the ontop serving {} (pid {}) did not answer a takeover within {}s; it may be \
             hung: stop it, then start again",
            root.display(),
            peer.pid(),
            ANSWER_WITHIN.as_secs()
        )
    };
    stream.set_read_timeout(Some(ANSWER_WITHIN))?;
    stream.set_write_timeout(Some(ANSWER_WITHIN))?;
    writeln!(&stream, "TAKEOVER {}", root.display())?;
    let (line, fd) = receive_line_with_fd(&stream).with_context(hung)?;
    let fields: Vec<&str> = line.splitn(3, ' ').collect();
    match fields[..] {
        ["FD", owned, path] => {
            let fd = fd.context("the answer carried no socket")?;
            writeln!(&stream, "ACK")?;
            let listener = UnixListener::from(fd);
            listener.set_nonblocking(true)?;
            Ok(Some(Handed {
                listener,
                path: PathBuf::from(path),
                owned: owned == "1",
                from_pid: peer.pid(),
            }))
        }
        ["NO", ..] => bail!(
            "the ontop serving {} (pid {}) refused the takeover: {}",
            root.display(),
            peer.pid(),
            line.trim_start_matches("NO ")
        ),
        _ => bail!("unexpected answer to a takeover: {line:?}"),
    }
}

/// Reads one line, and the descriptor sent with it, if any.
fn receive_line_with_fd(stream: &UnixStream) -> anyhow::Result<(String, Option<OwnedFd>)> {
    let mut buf = [0_u8; 4096];
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fd = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = c {
            for raw in fds {
                // SAFETY: the kernel gave this process the descriptor;
                // nothing else owns it.
                let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                fd.get_or_insert(owned);
            }
        }
    }
    let n = msg.bytes;
    if n == 0 {
        bail!("the connection closed");
    }
    let text = String::from_utf8_lossy(&buf[..n]);
    Ok((text.trim_end_matches('\n').to_string(), fd))
}

/// What the serving side does with a takeover: stop accepting, resume,
/// or stop for good once handed over.
pub trait Gate: Send + Sync + 'static {
    fn pause(&self);
    fn resume(&self);
    /// The socket was handed over: stop serving, leaving the socket file.
    fn handed_over(&self);
}

/// The serving side's control socket, answered on a thread of its own.
pub struct ControlServer {
    path: PathBuf,
    ino: u64,
    stop: Arc<AtomicBool>,
}

impl ControlServer {
    /// Binds the control socket for the socket at `address` (`listener`,
    /// owned or systemd's) and answers takeovers for `root`.
    pub fn start(
        address: &Path,
        root: &Path,
        listener: OwnedFd,
        socket_path: &Path,
        owned: bool,
        gate: Arc<dyn Gate>,
    ) -> anyhow::Result<ControlServer> {
        use std::os::unix::fs::MetadataExt;
        let path = control_path(address);
        let control = crate::sockets::bind_private(&path, 0o600)?;
        let ino = std::fs::symlink_metadata(&path)?.ino();
        let stop = Arc::new(AtomicBool::new(false));
        let state = Answering {
            root: root.to_path_buf(),
            listener,
            socket_path: socket_path.to_path_buf(),
            owned,
            gate,
            done: AtomicBool::new(false),
        };
        let stopping = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("takeover".into())
            .spawn(move || {
                for conn in control.incoming() {
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    match conn {
                        Ok(conn) => {
                            if let Err(e) = state.answer(conn) {
                                tracing::warn!(error = %format!("{e:#}"), "takeover: a request failed");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "takeover: accepting failed");
                            // Out of descriptors, say: waiting frees the
                            // core instead of logging the same error in a
                            // busy loop.
                            std::thread::sleep(std::time::Duration::from_millis(100));
                        }
                    }
                }
            })
            .context("starting the takeover thread")?;
        Ok(ControlServer { path, ino, stop })
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt;
        self.stop.store(true, Ordering::Relaxed);
        // Only if still ours: a successor may have bound its own there.
        // (After a takeover the thread answers NO until the process ends.)
        if std::fs::symlink_metadata(&self.path).is_ok_and(|md| md.ino() == self.ino) {
            // Wakes the thread's accept, which then sees the stop.
            let _ = UnixStream::connect(&self.path);
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

struct Answering {
    root: PathBuf,
    listener: OwnedFd,
    socket_path: PathBuf,
    owned: bool,
    gate: Arc<dyn Gate>,
    done: AtomicBool,
}

impl Answering {
    fn answer(&self, conn: UnixStream) -> anyhow::Result<()> {
        conn.set_read_timeout(Some(ANSWER_WITHIN))?;
        conn.set_write_timeout(Some(ANSWER_WITHIN))?;
        let peer = getsockopt(&conn, sockopt::PeerCredentials)?;
        let refuse = |why: &str| -> anyhow::Result<()> {
            tracing::warn!(
                peer_pid = peer.pid(),
                peer_uid = peer.uid(),
                "takeover refused: {why}"
            );
            writeln!(&conn, "NO {why}")?;
            Ok(())
        };
        if peer.uid() != nix::unistd::geteuid().as_raw() {
            return refuse("the successor runs as another user");
        }
        let mut line = String::new();
        BufReader::new(&conn).read_line(&mut line)?;
        let Some(root) = line.trim_end().strip_prefix("TAKEOVER ") else {
            return refuse("not a takeover request");
        };
        if Path::new(root) != self.root {
            return refuse(&format!(
                "this ontop serves {}, not {root}",
                self.root.display()
            ));
        }
        if self.done.load(Ordering::Relaxed) {
            return refuse("the socket was handed over already");
        }
        tracing::info!(
            successor_pid = peer.pid(),
            "takeover: handing the socket over"
        );
        self.gate.pause();
        let header = format!(
            "FD {} {}\n",
            u8::from(self.owned),
            self.socket_path.display()
        );
        let fds = [self.listener.as_fd().as_raw_fd()];
        let sent = sendmsg::<()>(
            conn.as_raw_fd(),
            &[io::IoSlice::new(header.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        );
        let started = Instant::now();
        let mut ack = String::new();
        let acked = sent.is_ok()
            && BufReader::new(&conn).read_line(&mut ack).is_ok()
            && ack.trim_end() == "ACK";
        if !acked {
            tracing::warn!(
                successor_pid = peer.pid(),
                waited = ?started.elapsed(),
                "takeover: the successor went away before it took the socket; serving on"
            );
            self.gate.resume();
            return Ok(());
        }
        self.done.store(true, Ordering::Relaxed);
        tracing::info!(
            successor_pid = peer.pid(),
            "takeover: handed over; stopping"
        );
        self.gate.handed_over();
        Ok(())
    }
}

/// The inode of this process's pid namespace: two processes that show the
/// same one are in one container (or both on the host).
pub fn pid_namespace() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata("/proc/self/ns/pid")?.ino())
}

/// Waits until nobody holds the root's lock (the ontop that handed the
/// socket over has closed its database), up to `within`.
pub fn wait_for_root(root: &Path, within: Duration) -> anyhow::Result<()> {
    let path = root.join("lock");
    let deadline = Instant::now() + within;
    loop {
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
        };
        // SAFETY: flock on a descriptor we own; released when it closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the ontop that handed its socket over still holds {} after {}s: it may be \
                 hung finishing its calls",
                root.display(),
                within.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
