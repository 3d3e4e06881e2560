//! systemd's two daemon protocols, in the few lines each takes (no
//! libsystemd): socket activation (`LISTEN_FDS`, sd_listen_fds(3)) and
//! service notification (`NOTIFY_SOCKET`, sd_notify(3)), with the
//! watchdog.
//!
//! Written here rather than with the sd-notify crate (0.5): that one sends
//! only to a filesystem `NOTIFY_SOCKET`, not to one in the abstract
//! namespace (`@name`), which sd_notify(3) allows and service managers
//! other than PID 1 use; and ontop checks what an activated socket is
//! (a listening unix stream socket) before it serves on it.
//!
//! Socket activation is what makes a restart invisible to containerd:
//! the listening socket belongs to systemd and outlives the process, so
//! connections made while ontop restarts wait in the listen backlog
//! instead of being refused.

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _};
use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};

/// The first inherited descriptor (SD_LISTEN_FDS_START).
const LISTEN_FDS_START: RawFd = 3;

/// The listening socket systemd passed, if this process was started by
/// socket activation, with the path it listens on. A passed socket that
/// ontop cannot serve on (not one listening unix stream socket) is an
/// error, not a silent fallback to binding: the unit says otherwise.
pub fn inherited_listener() -> anyhow::Result<Option<(UnixListener, Option<PathBuf>)>> {
    let var = |name| std::env::var(name).ok();
    let Some(fds) = listen_fds(var("LISTEN_PID"), var("LISTEN_FDS"), std::process::id())? else {
        return Ok(None);
    };
    if fds != 1 {
        bail!(
            "socket activation passed {fds} sockets; ontop serves one: give the .socket unit \
             one ListenStream="
        );
    }
    // SAFETY: sd_listen_fds(3) hands this process fd 3 to own; nothing
    // else in ontop opens or closes it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    // Fails for a socket of any other family.
    let unix = getsockname::<UnixAddr>(LISTEN_FDS_START).ok();
    let stream = getsockopt(&fd, sockopt::SockType).ok() == Some(SockType::Stream);
    let listening = getsockopt(&fd, sockopt::AcceptConn).unwrap_or(false);
    let Some(unix) = unix.filter(|_| stream && listening) else {
        bail!(
            "the socket passed by socket activation is not a listening unix stream socket; \
             the .socket unit needs ListenStream=/path"
        );
    };
    let path = unix.path().map(PathBuf::from);
    // Not for the processes ontop starts (mount helpers): they must not
    // hold the socket open past ontop.
    nix::fcntl::fcntl(
        &fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .context("setting close-on-exec on the inherited socket")?;
    let listener = UnixListener::from(fd);
    listener
        .set_nonblocking(true)
        .context("making the inherited socket non-blocking")?;
    Ok(Some((listener, path)))
}

/// How many sockets were passed to process `pid`: None when the variables
/// are absent or meant for another process (a parent that was activated
/// and started ontop without clearing them).
fn listen_fds(
    listen_pid: Option<String>,
    listen_fds: Option<String>,
    pid: u32,
) -> anyhow::Result<Option<usize>> {
    let (Some(listen_pid), Some(listen_fds)) = (listen_pid, listen_fds) else {
        return Ok(None);
    };
    if listen_pid.trim().parse::<u32>().ok() != Some(pid) {
        return Ok(None);
    }
    match listen_fds.trim().parse::<usize>() {
        Ok(0) => Ok(None),
        Ok(n) => Ok(Some(n)),
        Err(_) => bail!("LISTEN_FDS={listen_fds:?} is not a number of sockets"),
    }
}

/// Where to send service state, if systemd (or anyone speaking its
/// protocol) asked through `NOTIFY_SOCKET`.
pub struct Notifier {
    socket: UnixDatagram,
    target: UnixAddr,
}

impl Notifier {
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var("NOTIFY_SOCKET").ok()?;
        let target = match path.strip_prefix('@') {
            Some(name) => UnixAddr::new_abstract(name.as_bytes()),
            None => UnixAddr::new(path.as_str()),
        };
        let target = match target {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(socket = %path, error = %e, "NOTIFY_SOCKET is not a usable address");
                return None;
            }
        };
        match UnixDatagram::unbound() {
            Ok(socket) => Some(Notifier { socket, target }),
            Err(e) => {
                tracing::warn!(error = %e, "no datagram socket for systemd notifications");
                None
            }
        }
    }

    /// Sends one notification, such as `READY=1`. A failure is logged,
    /// never fatal: the service works without its manager hearing it.
    pub fn send(&self, state: &str) {
        use std::os::fd::AsRawFd;
        let sent = nix::sys::socket::sendto(
            self.socket.as_raw_fd(),
            state.as_bytes(),
            &self.target,
            nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
        );
        if let Err(e) = sent {
            tracing::warn!(state, error = %e, "could not notify systemd");
        }
    }
}

/// How often to tell the watchdog that ontop is alive: half the interval
/// systemd set (`WatchdogSec=`), as sd_watchdog_enabled(3) advises. None
/// when no watchdog is set for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let var = |name| std::env::var(name).ok();
    watchdog_interval_of(
        var("WATCHDOG_USEC"),
        var("WATCHDOG_PID"),
        std::process::id(),
    )
}

fn watchdog_interval_of(
    usec: Option<String>,
    watchdog_pid: Option<String>,
    pid: u32,
) -> Option<Duration> {
    if let Some(p) = watchdog_pid {
        if p.trim().parse::<u32>().ok() != Some(pid) {
            return None;
        }
    }
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    Some(Duration::from_micros(usec) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &str) -> Option<String> {
        Some(v.to_string())
    }

    #[test]
    fn listen_fds_counts_only_sockets_meant_for_this_process() {
        assert_eq!(listen_fds(s("42"), s("1"), 42).unwrap(), Some(1));
        assert_eq!(listen_fds(s("42"), s("2"), 42).unwrap(), Some(2));
        // Inherited from an activated parent: not ours.
        assert_eq!(listen_fds(s("41"), s("1"), 42).unwrap(), None);
        assert_eq!(listen_fds(None, s("1"), 42).unwrap(), None);
        assert_eq!(listen_fds(s("42"), None, 42).unwrap(), None);
        assert_eq!(listen_fds(s("42"), s("0"), 42).unwrap(), None);
        let err = listen_fds(s("42"), s("x"), 42).unwrap_err();
        assert!(err.to_string().contains("LISTEN_FDS"), "{err}");
    }

    #[test]
    fn the_watchdog_is_fed_at_half_its_interval_and_only_when_meant_for_us() {
        let half = Some(Duration::from_secs(5));
        assert_eq!(watchdog_interval_of(s("10000000"), None, 7), half);
        assert_eq!(watchdog_interval_of(s("10000000"), s("7"), 7), half);
        assert_eq!(watchdog_interval_of(s("10000000"), s("8"), 7), None);
        assert_eq!(watchdog_interval_of(s("0"), None, 7), None);
        assert_eq!(watchdog_interval_of(s("soon"), None, 7), None);
        assert_eq!(watchdog_interval_of(None, None, 7), None);
    }
}
