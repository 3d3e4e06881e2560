//! Writes a layer's entries into a directory the way containerd's
//! applier does (`pkg/archive`'s `applyNaive` and `createTarFile`), but
//! with every path resolved inside the directory by the kernel
//! (`openat2` with `RESOLVE_IN_ROOT`) and every change made relative to a
//! held parent directory, so no entry of a hostile archive can reach out
//! of it: not by `..`, an absolute name, a symlink on the way, nor a hard
//! link's target.

use std::collections::HashSet;
use std::ffi::{CStr, CString, OsStr};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use super::files;
use super::tar::{Header, Kind};

/// How a layer's whiteout entries (`.wh.NAME`, `.wh..wh..opq`) land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Whiteouts {
    /// Into an overlay upper dir: a whiteout is a 0/0 character device,
    /// an opaque directory carries this xattr set to `y`.
    Overlay { opaque_xattr: &'static str },
    /// Into a plain tree: the named paths are removed.
    Remove,
}

/// Where and how a layer is written.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub root: PathBuf,
    pub whiteouts: Whiteouts,
    /// The lower layers, nearest first: a directory the layer creates
    /// only by implication takes its owner, mode, times and xattrs from
    /// the nearest one that has it, as containerd's `mkparent` does.
    pub lowers: Vec<PathBuf>,
    /// Running in a user namespace: devices cannot be made, and are
    /// skipped as containerd skips them.
    pub in_userns: bool,
}

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// Applies entries one at a time; `finish` sets directory times last.
pub(crate) struct Writer {
    root: OwnedFd,
    target: Target,
    lowers: Vec<OwnedFd>,
    /// Directories and their times, set once nothing more is created in
    /// them.
    dirs: Vec<(Vec<u8>, [libc::timespec; 2])>,
    /// Paths this layer wrote, which an opaque marker in the plain form
    /// keeps.
    unpacked: HashSet<Vec<u8>>,
    /// The last parent directory resolved, reused by its next entries.
    cached: Option<(Vec<u8>, Rc<OwnedFd>)>,
    buf: Vec<u8>,
    /// Finishes regular files beside the writer (see `files`).
    pool: Option<files::Pool>,
}

/// An entry's failure, naming it.
pub(crate) fn at_entry(name: &[u8], e: io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        EntryError {
            name: String::from_utf8_lossy(name).into_owned(),
            source: e,
        },
    )
}

/// An entry's failure; its source stays the OS's error, so a full disk
/// is still told apart (see `crate::error`).
#[derive(Debug, thiserror::Error)]
#[error("entry {name:?}: {source}")]
pub(crate) struct EntryError {
    name: String,
    source: io::Error,
}

impl Writer {
    pub fn new(target: Target) -> io::Result<Writer> {
        let root = open_dir_path(&target.root)?;
        let lowers = target
            .lowers
            .iter()
            .map(|p| open_dir_path(p))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Writer {
            root,
            target,
            lowers,
            dirs: Vec::new(),
            unpacked: HashSet::new(),
            cached: None,
            buf: vec![0u8; 1 << 20],
            pool: files::Pool::new(file_threads()),
        })
    }

    /// Applies one entry; `content` reads a regular file's data.
    pub fn entry(
        &mut self,
        h: &Header,
        content: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<()> {
        if h.kind == Kind::GlobalHeader {
            return Ok(());
        }
        if self.target.in_userns && matches!(h.kind, Kind::Char | Kind::Block) {
            tracing::warn!(name = %String::from_utf8_lossy(&h.name), "device skipped: cannot be made in a user namespace");
            return Ok(());
        }
        let Some((parent_name, base)) = split(&h.name) else {
            // The root itself: containerd ignores it.
            return Ok(());
        };
        let parent = self.parent(&parent_name)?;
        let base_c = cstring(&base)?;

        if let Some(hidden) = base.strip_prefix(WHITEOUT_PREFIX) {
            if base == OPAQUE {
                return self.opaque(&parent, &parent_name);
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(invalid(format!(
                    "invalid whiteout name {:?}",
                    String::from_utf8_lossy(&base)
                )));
            }
            let hidden_c = cstring(hidden)?;
            self.remove_existing(&parent, &hidden_c)?;
            return match self.target.whiteouts {
                Whiteouts::Overlay { .. } => {
                    mknod(&parent, &hidden_c, libc::S_IFCHR, 0)?;
                    chown(&parent, &hidden_c, h.uid, h.gid)
                }
                Whiteouts::Remove => Ok(()),
            };
        }

        let full = join(&parent_name, &base);
        let times = times(h);
        // What is there is replaced, but a directory by a directory, which
        // keeps its contents. A file is made first and looked at only if
        // something is in the way: a fresh upper has nothing.
        let existing_dir = if h.kind == Kind::Regular {
            false
        } else {
            match stat_at(&parent, &base_c)? {
                Some(st) if is_dir(&st) && h.kind == Kind::Directory => true,
                Some(_) => {
                    self.remove_existing(&parent, &base_c)?;
                    false
                }
                None => false,
            }
        };
        match h.kind {
            Kind::Regular => {
                let file = match create_file(&parent, &base_c) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                        self.remove_existing(&parent, &base_c)?;
                        create_file(&parent, &base_c)?
                    }
                    other => other?,
                };
                self.note_unpacked(full);
                match &self.pool {
                    Some(pool) if h.size <= files::MAX_QUEUED_FILE => {
                        let mut data = vec![0u8; h.size as usize];
                        read_exactly(content, &mut data)?;
                        return pool.submit(files::FileJob {
                            file,
                            data,
                            uid: h.uid,
                            gid: h.gid,
                            mode: h.mode,
                            times,
                            xattrs: h.xattrs.clone(),
                            name: h.name.clone(),
                        });
                    }
                    _ => {}
                }
                let file = std::fs::File::from(file);
                self.write_content(&file, h.size, content)?;
                return finish_file(&file, h.uid, h.gid, &h.xattrs, h.mode, &times, &h.name);
            }
            Kind::Directory => {
                if !existing_dir {
                    mkdir(&parent, &base_c, h.mode)?;
                }
                self.dirs.push((full.clone(), times));
            }
            Kind::Symlink => symlink(&cstring(&h.link)?, &parent, &base_c)?,
            Kind::HardLink => {
                // The target may still be being finished: its owner, mode
                // and times must not land after the link's.
                self.wait_for_files()?;
                let (link_parent, link_base) = split(&h.link).unwrap_or_default();
                // A target the layer (and the snapshot) does not hold
                // makes the layer itself wrong.
                let missing = |e: io::Error| match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ENOTDIR) => invalid(format!(
                        "hard link to {:?}, which is not there",
                        String::from_utf8_lossy(&h.link)
                    )),
                    _ => e,
                };
                if link_base.is_empty() {
                    // "/" or "..": a directory cannot be hard-linked.
                    return Err(invalid(format!(
                        "hard link to the root ({:?})",
                        String::from_utf8_lossy(&h.link)
                    )));
                }
                let from = self.resolve(&link_parent).map_err(missing)?;
                link(&from, &cstring(&link_base)?, &parent, &base_c).map_err(missing)?;
            }
            Kind::Char => mknod(
                &parent,
                &base_c,
                libc::S_IFCHR | h.mode,
                libc::makedev(h.dev_major, h.dev_minor),
            )?,
            Kind::Block => mknod(
                &parent,
                &base_c,
                libc::S_IFBLK | h.mode,
                libc::makedev(h.dev_major, h.dev_minor),
            )?,
            Kind::Fifo => mknod(&parent, &base_c, libc::S_IFIFO | h.mode, 0)?,
            Kind::GlobalHeader => unreachable!(),
        }
        chown(&parent, &base_c, h.uid, h.gid)?;
        let path = proc_path(&parent, Some(&base));
        set_xattrs(&path, &h.name, h.kind, &h.xattrs, h.kind != Kind::Directory)?;
        if h.kind != Kind::Symlink {
            chmod(&parent, &base_c, h.mode)?;
        }
        utimens(&parent, &base_c, &times)?;
        self.note_unpacked(full);
        Ok(())
    }

    /// Sets the directories' times, now that nothing more is created in
    /// them.
    pub fn finish(mut self) -> io::Result<()> {
        self.wait_for_files()?;
        for (name, times) in std::mem::take(&mut self.dirs) {
            let Some((parent_name, base)) = split(&name) else {
                continue;
            };
            let parent = match self.resolve(&parent_name) {
                Ok(p) => p,
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) => return Err(at_entry(&name, e)),
            };
            match utimens(&parent, &cstring(&base)?, &times) {
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                other => other.map_err(|e| at_entry(&name, e))?,
            }
        }
        Ok(())
    }

    /// Remembers what the layer wrote, which only the plain form's opaque
    /// markers ask about.
    fn note_unpacked(&mut self, name: Vec<u8>) {
        if self.target.whiteouts == Whiteouts::Remove {
            self.unpacked.insert(name);
        }
    }

    fn wait_for_files(&self) -> io::Result<()> {
        match &self.pool {
            Some(pool) => pool.wait(),
            None => Ok(()),
        }
    }

    fn write_content(
        &mut self,
        mut out: &std::fs::File,
        size: u64,
        content: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    ) -> io::Result<()> {
        let mut left = size;
        while left > 0 {
            let want = self.buf.len().min(left as usize);
            let n = content(&mut self.buf[..want])?;
            if n == 0 {
                return Err(invalid("the archive ends inside a file".into()));
            }
            out.write_all(&self.buf[..n])?;
            left -= n as u64;
        }
        Ok(())
    }

    /// `.wh..wh..opq` in `dir`: everything below hidden.
    fn opaque(&mut self, dir: &OwnedFd, dir_name: &[u8]) -> io::Result<()> {
        match self.target.whiteouts {
            Whiteouts::Overlay { opaque_xattr } => {
                let path = proc_path(dir, None);
                let name = cstring(opaque_xattr.as_bytes())?;
                let r = unsafe {
                    libc::setxattr(path.as_ptr(), name.as_ptr(), b"y".as_ptr().cast(), 1, 0)
                };
                if r != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            }
            Whiteouts::Remove => {
                self.cached = None;
                self.remove_not_unpacked(dir, dir_name)
            }
        }
    }

    /// Removes what `dir` holds that this layer did not write.
    fn remove_not_unpacked(&self, dir: &OwnedFd, dir_name: &[u8]) -> io::Result<()> {
        for (name, is_dir) in list(dir)? {
            let full = join(dir_name, &name);
            let name_c = cstring(&name)?;
            if !self.unpacked.contains(&full) {
                remove_at(dir, &name_c)?;
            } else if is_dir {
                let sub = open_beneath(dir, &name_c)?;
                self.remove_not_unpacked(&sub, &full)?;
            }
        }
        Ok(())
    }

    fn remove_existing(&mut self, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
        if let Some(st) = stat_at(dir, name)? {
            if is_dir(&st) {
                // A cached parent may lie under it.
                self.cached = None;
            }
            remove_at(dir, name)?;
        }
        Ok(())
    }

    /// The parent directory `name` (cleaned, relative), made if missing.
    fn parent(&mut self, name: &[u8]) -> io::Result<Rc<OwnedFd>> {
        if let Some((cached, fd)) = &self.cached {
            if cached == name {
                return Ok(Rc::clone(fd));
            }
        }
        let fd = Rc::new(match self.resolve(name) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => self.make_parents(name)?,
            Err(e) => return Err(e),
        });
        self.cached = Some((name.to_vec(), Rc::clone(&fd)));
        Ok(fd)
    }

    /// Resolves `name` inside the root, following symlinks as if the root
    /// were `/`.
    fn resolve(&self, name: &[u8]) -> io::Result<OwnedFd> {
        resolve_in(&self.root, name)
    }

    /// Makes the missing directories of `name`, as containerd's
    /// `mkparent` does: mode 0755, or the nearest lower's attributes. A
    /// dangling symlink on the way is followed inside the root, and what
    /// it names is made.
    fn make_parents(&mut self, name: &[u8]) -> io::Result<OwnedFd> {
        let mut parts = components(name);
        let mut hops = 0;
        'again: loop {
            // The deepest ancestor that exists.
            let mut have = 0;
            let mut dir = self.root.try_clone()?;
            for i in (1..parts.len()).rev() {
                match self.resolve(&parts[..i].join(&b'/')) {
                    Ok(fd) => {
                        have = i;
                        dir = fd;
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                    Err(e) => return Err(e),
                }
            }
            for i in have..parts.len() {
                let part = cstring(&parts[i])?;
                if let Some(link) = readlink_at(&dir, &part)? {
                    hops += 1;
                    if hops > 40 {
                        return Err(io::Error::from_raw_os_error(libc::ELOOP));
                    }
                    let mut redirected = if link.starts_with(b"/") {
                        Vec::new()
                    } else {
                        parts[..i].join(&b'/')
                    };
                    redirected.push(b'/');
                    redirected.extend_from_slice(&link);
                    for rest in &parts[i + 1..] {
                        redirected.push(b'/');
                        redirected.extend_from_slice(rest);
                    }
                    parts = components(&redirected);
                    continue 'again;
                }
                match mkdir(&dir, &part, 0o755) {
                    Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                    other => other?,
                }
                let sub = open_beneath(&dir, &part)?;
                chmod(&dir, &part, 0o755)?;
                self.copy_from_lower(&sub, &parts[..=i].join(&b'/'))?;
                dir = sub;
            }
            return Ok(dir);
        }
    }

    /// Gives `made` the owner, mode, times and (non-trusted) xattrs of
    /// the nearest lower's `name`, when that is a directory.
    fn copy_from_lower(&self, made: &OwnedFd, name: &[u8]) -> io::Result<()> {
        for lower in &self.lowers {
            let found = match resolve_in(lower, name) {
                Ok(fd) => fd,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let st = fstat(&found)?;
            chown_fd_path(made, st.st_uid, st.st_gid)?;
            let made_path = proc_path(made, None);
            let cmode = CString::new(made_path.to_bytes()).unwrap();
            if unsafe { libc::chmod(cmode.as_ptr(), st.st_mode & 0o7777) } != 0 {
                return Err(io::Error::last_os_error());
            }
            copy_xattrs(&proc_path(&found, None), &made_path)?;
            let ts = [
                libc::timespec {
                    tv_sec: st.st_atime,
                    tv_nsec: st.st_atime_nsec,
                },
                libc::timespec {
                    tv_sec: st.st_mtime,
                    tv_nsec: st.st_mtime_nsec,
                },
            ];
            let r = unsafe { libc::utimensat(libc::AT_FDCWD, cmode.as_ptr(), ts.as_ptr(), 0) };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
            return Ok(());
        }
        Ok(())
    }
}

/// Sets a layer entry's xattrs on `path`. Like containerd, it skips
/// those the filesystem does not support, and `user.*` ones on what
/// cannot carry them (anything but files and directories).
fn set_xattrs(
    path: &CStr,
    entry: &[u8],
    kind: Kind,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    nofollow: bool,
) -> io::Result<()> {
    for (name, value) in xattrs {
        let name_c = cstring(name)?;
        let r = unsafe {
            let f = if nofollow {
                libc::lsetxattr
            } else {
                libc::setxattr
            };
            f(
                path.as_ptr(),
                name_c.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        if r == 0 {
            continue;
        }
        let err = io::Error::last_os_error();
        let ignorable = match err.raw_os_error() {
            Some(libc::ENOTSUP) => true,
            // user.* attributes exist only on files and directories.
            Some(libc::EPERM) => {
                name.starts_with(b"user.") && !matches!(kind, Kind::Regular | Kind::Directory)
            }
            _ => false,
        };
        if !ignorable {
            return Err(io::Error::new(
                err.kind(),
                format!("setting xattr {:?}: {err}", String::from_utf8_lossy(name)),
            ));
        }
        tracing::warn!(name = %String::from_utf8_lossy(entry), xattr = %String::from_utf8_lossy(name), error = %err, "xattr in the layer ignored");
    }
    Ok(())
}

/// Owner, xattrs, mode and times of a regular file just written, in
/// containerd's order (the mode after the owner, which clears setuid).
pub(super) fn finish_file(
    file: &std::fs::File,
    uid: u32,
    gid: u32,
    xattrs: &[(Vec<u8>, Vec<u8>)],
    mode: u32,
    times: &[libc::timespec; 2],
    entry: &[u8],
) -> io::Result<()> {
    let fd = file.as_raw_fd();
    check(unsafe { libc::fchown(fd, uid, gid) })?;
    if !xattrs.is_empty() {
        let path = CString::new(format!("/proc/self/fd/{fd}")).unwrap();
        set_xattrs(&path, entry, Kind::Regular, xattrs, false)?;
    }
    check(unsafe { libc::fchmod(fd, mode & 0o7777) })?;
    check(unsafe { libc::futimens(fd, times.as_ptr()) })
}

/// How many threads finish regular files: one per core beyond the
/// writer's own, at most three.
fn file_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get().saturating_sub(1).min(3))
        .unwrap_or(0)
}

/// Fills `buf` from `content`; a layer that ends first is bad.
fn read_exactly(
    content: &mut dyn FnMut(&mut [u8]) -> io::Result<usize>,
    mut buf: &mut [u8],
) -> io::Result<()> {
    while !buf.is_empty() {
        let n = content(buf)?;
        if n == 0 {
            return Err(invalid("the archive ends inside a file".into()));
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

/// Cleans a name as Go's `filepath.Clean` and containerd's root-scoped
/// resolution together do: `.` and empty parts go, `..` climbs but never
/// above the root, and a leading `/` means the root. Returns the parent
/// (possibly empty: the root) and the last part; `None` for the root.
pub(crate) fn split(name: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let mut parts = components(name);
    let base = parts.pop()?;
    Some((parts.join(&b'/'), base))
}

/// `name`'s parts, cleaned (see [`split`]).
fn components(name: &[u8]) -> Vec<Vec<u8>> {
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for part in name.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            p => parts.push(p.to_vec()),
        }
    }
    parts
}

fn join(parent: &[u8], base: &[u8]) -> Vec<u8> {
    if parent.is_empty() {
        return base.to_vec();
    }
    let mut v = parent.to_vec();
    v.push(b'/');
    v.extend_from_slice(base);
    v
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, super::tar::Malformed(what))
}

fn cstring(b: &[u8]) -> io::Result<CString> {
    CString::new(b).map_err(|_| invalid("a name with a NUL byte".into()))
}

fn check(r: libc::c_int) -> io::Result<()> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

fn open_dir_path(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_bytes())?;
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("opening {}: {e}", path.display()),
        ));
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `openat2(RESOLVE_IN_ROOT)`: `name` inside `root` as if it were `/`.
fn resolve_in(root: &OwnedFd, name: &[u8]) -> io::Result<OwnedFd> {
    if name.is_empty() {
        return root.try_clone();
    }
    let c = cstring(name)?;
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS | libc::RESOLVE_NO_XDEV;
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// A directory right inside `dir`, never through a symlink.
fn open_beneath(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `/proc/self/fd/N` (the file `fd` holds), or a name inside it.
fn proc_path(fd: &OwnedFd, name: Option<&[u8]>) -> CString {
    let mut p = format!("/proc/self/fd/{}", fd.as_raw_fd()).into_bytes();
    if let Some(name) = name {
        p.push(b'/');
        p.extend_from_slice(name);
    }
    CString::new(p).expect("no NUL: checked by cstring")
}

fn stat_at(dir: &OwnedFd, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let r = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r == 0 {
        return Ok(Some(st));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(None),
        _ => Err(e),
    }
}

/// The target of the symlink `name` in `dir`; `None` when it is not one
/// (or is missing).
fn readlink_at(dir: &OwnedFd, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    let n = unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(None),
            _ => Err(e),
        };
    }
    buf.truncate(n as usize);
    Ok(Some(buf))
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

fn remove_at(dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    let path = proc_path(dir, Some(name.to_bytes()));
    crate::removal::remove_all(Path::new(OsStr::from_bytes(path.to_bytes())))
}

fn list(dir: &OwnedFd) -> io::Result<Vec<(Vec<u8>, bool)>> {
    let path = proc_path(dir, None);
    let mut out = Vec::new();
    for entry in std::fs::read_dir(OsStr::from_bytes(path.to_bytes()))? {
        let entry = entry?;
        out.push((
            entry.file_name().as_bytes().to_vec(),
            entry.file_type()?.is_dir(),
        ));
    }
    Ok(out)
}

fn create_file(dir: &OwnedFd, name: &CStr) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            0o600,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mkdir(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777) })
}

fn mknod(dir: &OwnedFd, name: &CStr, mode: u32, dev: libc::dev_t) -> io::Result<()> {
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) })
}

fn symlink(target: &CStr, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

fn link(from_dir: &OwnedFd, from: &CStr, dir: &OwnedFd, name: &CStr) -> io::Result<()> {
    check(unsafe {
        libc::linkat(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            0,
        )
    })
}

fn chown(dir: &OwnedFd, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// `fchown` on an `O_PATH` descriptor, which `fchown` itself refuses.
fn chown_fd_path(fd: &OwnedFd, uid: u32, gid: u32) -> io::Result<()> {
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

fn chmod(dir: &OwnedFd, name: &CStr, mode: u32) -> io::Result<()> {
    check(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode & 0o7777, 0) })
}

fn utimens(dir: &OwnedFd, name: &CStr, ts: &[libc::timespec; 2]) -> io::Result<()> {
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Copies `src`'s xattrs to `dst`, all but `trusted.*` (overlay's own).
fn copy_xattrs(src: &CStr, dst: &CStr) -> io::Result<()> {
    let mut names = vec![0u8; 64 * 1024];
    let n = unsafe { libc::llistxattr(src.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENOTSUP) => Ok(()),
            _ => Err(e),
        };
    }
    let mut value = vec![0u8; 64 * 1024];
    for name in names[..n as usize].split(|&b| b == 0) {
        if name.is_empty() || name.starts_with(b"trusted.") {
            continue;
        }
        let name_c = cstring(name)?;
        let len = unsafe {
            libc::lgetxattr(
                src.as_ptr(),
                name_c.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if len < 0 {
            continue;
        }
        check(unsafe {
            libc::lsetxattr(
                dst.as_ptr(),
                name_c.as_ptr(),
                value.as_ptr().cast(),
                len as usize,
                0,
            )
        })?;
    }
    Ok(())
}

/// An entry's access and modification times, as containerd sets them:
/// the access time is the later of the two, and times before the epoch
/// become the epoch.
fn times(h: &Header) -> [libc::timespec; 2] {
    let bound = |(s, ns): (i64, u32)| {
        if s < 0 {
            libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            }
        } else {
            libc::timespec {
                tv_sec: s,
                tv_nsec: i64::from(ns),
            }
        }
    };
    let atime = match h.atime {
        Some(a) if a > h.mtime => a,
        _ => h.mtime,
    };
    [bound(atime), bound(h.mtime)]
}
