//! A qemu guest under software emulation: Debian's kernel, a busybox
//! initramfs holding the release `ontop` and a workload, and one disk
//! whose every write qemu's `blklogwrites` records. Shared by the
//! power-cut test and the size-limit guest test (tests/limits_guest.rs).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::common;

/// Where the markers start on the disk: past the filesystem, which mkfs
/// is told to keep to the first [`FS_BYTES`].
pub const MARKERS_AT: u64 = 400 << 20;
pub const FS_BYTES: u64 = 384 << 20;
const DISK_BYTES: u64 = MARKERS_AT + (64 << 20);

/// The kernel modules the guest loads, with what they need: the disk, the
/// three filesystems, crc32c for their checksums, overlay, which ontop's
/// start-up looks for, and for size limits ext4's quota format and loop.
const MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "ext4",
    "xfs",
    "btrfs",
    "overlay",
    "quota_v2",
    "loop",
];

/// The power-cut test's init: `@MARKERS@` and `@ARGS@` are filled in.
pub const POWERCUT_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "insmod $m failed"; done
fs=$(sed -n 's/.*ontop\.fs=\([a-z0-9]*\).*/\1/p' /proc/cmdline)
mkdir -p /mnt /run/ontop /tmp
mount -t "$fs" /dev/vda /mnt || { echo "POWERCUT: mount failed"; poweroff -f; }
/usr/bin/ontop serve --root /mnt/ontop --address /run/ontop/ontop.sock --log-level warn &
/usr/bin/ontop-powercut --socket /run/ontop/ontop.sock --disk /dev/vda --offset @MARKERS@ @ARGS@
echo "POWERCUT: workload exited $?"
poweroff -f
"#;

/// The release build of every binary of the workspace, made once per
/// test process in `target/package` (shared with the package test).
pub fn release_dir() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let target = root.join("target/package");
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            common::stdout_of(
                Command::new(cargo)
                    .args(["build", "--release", "--locked", "--workspace", "--bins"])
                    .current_dir(root)
                    .env("CARGO_TARGET_DIR", &target),
                "cargo build --release",
            );
            target.join("release")
        })
        .clone()
}

pub struct Kernel {
    pub image: PathBuf,
    pub modules: PathBuf,
}

impl Kernel {
    /// Debian's newest installed kernel.
    pub fn find() -> Kernel {
        let mut images: Vec<PathBuf> = std::fs::read_dir("/boot")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("vmlinuz-")
            })
            .collect();
        images.sort();
        let image = images.pop().unwrap_or_else(|| {
            panic!(
                "the power-cut test boots Debian's kernel, and /boot has none: \
                 apt-get install linux-image-amd64"
            )
        });
        let version = image.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
        let modules = Path::new("/lib/modules").join(version);
        assert!(
            modules.join("modules.dep").exists(),
            "{} has no modules.dep: reinstall linux-image-amd64",
            modules.display()
        );
        Kernel { image, modules }
    }

    /// The `.ko` files of [`MODULES`] and their dependencies, in an order
    /// insmod can load them.
    fn module_order(&self) -> Vec<PathBuf> {
        let dep = std::fs::read_to_string(self.modules.join("modules.dep")).unwrap();
        let deps: std::collections::HashMap<&str, Vec<&str>> = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, d)| (m, d.split_whitespace().collect()))
            .collect();
        let by_name = |name: &str| {
            deps.keys()
                .find(|m| {
                    let file = Path::new(m).file_name().unwrap().to_string_lossy();
                    let stem = file.split('.').next().unwrap().replace('-', "_");
                    stem == name
                })
                .copied()
                .unwrap_or_else(|| panic!("kernel module {name} not found in modules.dep"))
        };
        fn visit<'a>(
            m: &'a str,
            deps: &std::collections::HashMap<&'a str, Vec<&'a str>>,
            seen: &mut HashSet<&'a str>,
            order: &mut Vec<&'a str>,
        ) {
            if !seen.insert(m) {
                return;
            }
            // modules.dep lists a module's dependencies, each before the
            // ones it needs: load from the end.
            for d in deps.get(m).into_iter().flatten().rev() {
                visit(d, deps, seen, order);
            }
            order.push(m);
        }
        let (mut seen, mut order) = (HashSet::new(), Vec::new());
        for name in MODULES {
            visit(by_name(name), &deps, &mut seen, &mut order);
        }
        order.iter().map(|m| self.modules.join(m)).collect()
    }
}

/// Copies `bin` into `root` with the shared libraries `ldd` names.
fn install_binary(bin: &Path, as_name: &str, root: &Path) {
    let dest = root.join("usr/bin").join(as_name);
    std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
    std::fs::copy(bin, &dest).unwrap_or_else(|e| panic!("copying {}: {e}", bin.display()));
    let ldd = common::stdout_of(Command::new("ldd").arg(bin), "ldd");
    for lib in ldd.split_whitespace().filter(|w| w.starts_with('/')) {
        let at = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        // The loader's own path may be reached through /lib64.
        std::fs::copy(std::fs::canonicalize(lib).unwrap(), &at).unwrap();
    }
}

/// Builds the initramfs: busybox, the modules, `init`, and `binaries`
/// (path, and the name it gets in `/usr/bin`) with their libraries.
pub fn initramfs(kernel: &Kernel, init: &str, binaries: &[(&Path, &str)], dir: &Path) -> PathBuf {
    let root = dir.join("initramfs");
    for d in ["bin", "proc", "sys", "dev", "modules", "lib64", "lib"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    common::require_program("busybox", "apt-get install busybox-static");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).unwrap();
    let mut order = String::new();
    for (i, m) in kernel.module_order().iter().enumerate() {
        let name = format!("{i:02}-{}", m.file_name().unwrap().to_string_lossy());
        std::fs::copy(m, root.join("modules").join(&name)).unwrap();
        order.push_str(&name);
        order.push('\n');
    }
    std::fs::write(root.join("modules/order"), order).unwrap();
    if let Some(config) = std::env::var_os("ONTOP_POWERCUT_CONFIG") {
        // Read by `ontop serve` from its default place.
        std::fs::create_dir_all(root.join("etc/ontop")).unwrap();
        std::fs::write(
            root.join("etc/ontop/config.toml"),
            config.as_encoded_bytes(),
        )
        .unwrap();
    }
    for (bin, name) in binaries {
        install_binary(bin, name, &root);
    }
    std::fs::write(root.join("init"), init).unwrap();
    common::stdout_of(
        Command::new("chmod").arg("755").arg(root.join("init")),
        "chmod",
    );
    common::require_program("cpio", "apt-get install cpio");
    let image = dir.join("initramfs.cpio");
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "find . | cpio -o -H newc --quiet > {}",
            image.display()
        ))
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(status.success(), "cpio failed");
    image
}

/// A fresh disk with an empty filesystem of type `fs` in its first
/// [`FS_BYTES`], made on the host, so the log holds only the guest's work.
pub fn make_disk(fs: &str, path: &Path) {
    make_disk_with(fs, path, &[]);
}

/// [`make_disk`] with more mkfs options, such as ext4's quota features.
pub fn make_disk_with(fs: &str, path: &Path, options: &[&str]) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    drop(f);
    let size = FS_BYTES.to_string();
    let mut mkfs = Command::new(format!("mkfs.{fs}"));
    mkfs.args(options);
    match fs {
        "ext4" => mkfs
            .args(["-q", "-F"])
            .arg(path)
            .arg(format!("{}k", FS_BYTES >> 10)),
        "xfs" => mkfs
            .args(["-q", "-f", "-d"])
            .arg(format!("size={size}"))
            .arg(path),
        "btrfs" => mkfs.args(["-q", "-f", "-b", &size]).arg(path),
        other => panic!("no mkfs for {other}"),
    };
    common::stdout_of(&mut mkfs, &format!("mkfs.{fs}"));
}

/// Boots the guest on `disk`, every write logged into `log`, and waits for
/// the console to say `done` (what the init prints once the workload
/// succeeded). Returns the guest's console.
pub fn run(
    kernel: &Kernel,
    initramfs: &Path,
    fs: &str,
    disk: &Path,
    log: &Path,
    done: &str,
) -> String {
    common::require_program("qemu-system-x86_64", "apt-get install qemu-system-x86");
    std::fs::File::create(log).unwrap();
    let console = log.with_extension("console");
    let blockdev = format!(
        "driver=blklogwrites,node-name=logged,\
         file.driver=file,file.filename={},\
         log.driver=file,log.filename={}",
        disk.display(),
        log.display()
    );
    let mut qemu = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=tcg",
            "-cpu",
            "max",
            "-smp",
            "1",
            "-m",
            "1024",
        ])
        .args(["-nographic", "-no-reboot", "-nodefaults", "-serial"])
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&kernel.image)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 quiet ontop.fs={fs}"))
        .arg("-blockdev")
        .arg(blockdev)
        .args(["-device", "virtio-blk-pci,drive=logged,write-cache=on"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting qemu-system-x86_64");
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(status) = qemu.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = qemu.kill();
            panic!(
                "the guest did not finish within 10 minutes:\n{}",
                std::fs::read_to_string(&console).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&console).unwrap_or_default();
    let mut stderr = String::new();
    use std::io::Read as _;
    qemu.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(
        status.success(),
        "qemu exited with {status}: {stderr}\n{out}"
    );
    assert!(
        out.contains(done),
        "the workload failed in the guest:\n{out}"
    );
    out
}
