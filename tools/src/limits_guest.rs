//! `ontop-limits-guest`: what the size-limit test runs inside a qemu
//! guest with Debian's kernel, where XFS and ext4 project quotas work and
//! root may grow a mounted ext4 (tests/limits_guest.rs). It drives the
//! `ontop serve` the guest started on a quota-mounted root through a real
//! overlay mount, then starts a second one forced to loop-ext4 and grows
//! a limit online. Prints `LIMITS: ok` when every check held.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use clap::Parser;
use ontop::limit::{project, ONTOP_MAX_SIZE_LABEL};
use ontop_tools::client::{Namespace, Snapshots};
use ontop_tools::mounter::{mount_all, unmount};

const MIB: u64 = 1 << 20;

#[derive(Parser)]
struct Args {
    /// The socket of the ontop serving the quota-mounted root.
    #[arg(long)]
    socket: PathBuf,
    /// That ontop's root.
    #[arg(long)]
    root: PathBuf,
    /// Where to put more roots, for daemons forced to an enforcer.
    #[arg(long)]
    more_roots: PathBuf,
    /// What the first ontop should pick: project-quota (XFS), or
    /// loop-ext4 (ext4, whose project quotas do not hold for overlay).
    #[arg(long)]
    expect: String,
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(()) => println!("LIMITS: ok"),
        Err(e) => {
            println!("LIMITS: FAILED: {e:#}");
            std::process::exit(1);
        }
    }
}

async fn run(args: &Args) -> anyhow::Result<()> {
    let mut c = connect(&args.socket).await?;
    match args.expect.as_str() {
        "project-quota" => project_quota(&mut c, &args.root)
            .await
            .context("project quota")?,
        _ => {
            auto_picks_a_loop_image(&mut c).await.context("auto")?;
            forced(&args.more_roots.join("project"), "project-quota", |c| {
                Box::pin(project_quota_is_refused(c))
            })
            .await
            .context("project-quota on ext4")?;
        }
    }
    forced(&args.more_roots.join("loop"), "loop-ext4", |c| {
        Box::pin(loop_image_grows(c))
    })
    .await
    .context("loop-ext4")
}

type Check<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + 'a>>;

/// Runs `check` against a second ontop on `root`, forced to `enforcer`.
async fn forced(
    root: &Path,
    enforcer: &str,
    check: impl for<'a> FnOnce(&'a mut Snapshots) -> Check<'a>,
) -> anyhow::Result<()> {
    let mut ontop = serve(root, &format!("limit_enforcer = \"{enforcer}\"\n"))?;
    let done = async {
        let mut c = connect(&root.join("ontop.sock")).await?;
        check(&mut c).await
    }
    .await;
    let _ = ontop.kill();
    let _ = ontop.wait();
    done
}

/// On ext4, auto leaves project quotas out and picks a loop image.
async fn auto_picks_a_loop_image(c: &mut Snapshots) -> anyhow::Result<()> {
    let mounts = c.prepare("auto", "", limit("32MiB")).await?;
    ensure!(
        format!("{mounts:?}").contains("/limit/"),
        "not a loop image: {mounts:?}"
    );
    let target = Path::new("/tmp/auto");
    fs::create_dir_all(target)?;
    mount_all(&mounts, target)?;
    let (written, errno) = fill(&target.join("big"))?;
    ensure!(
        errno == nix::libc::ENOSPC && (32 * MIB..=48 * MIB).contains(&written),
        "{written} bytes, errno {errno}, under a 32 MiB limit"
    );
    unmount(target)?;
    c.remove("auto").await?;
    Ok(())
}

/// Forced to project quotas on ext4, a limit is refused, saying why.
async fn project_quota_is_refused(c: &mut Snapshots) -> anyhow::Result<()> {
    match c.prepare("p", "", limit("32MiB")).await {
        Err(s)
            if s.code() == tonic::Code::FailedPrecondition
                && s.message().contains("CAP_SYS_RESOURCE") =>
        {
            Ok(())
        }
        other => bail!("a project limit on ext4: {other:?}"),
    }
}

async fn connect(socket: &Path) -> anyhow::Result<Snapshots> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !socket.exists() {
        ensure!(
            Instant::now() < deadline,
            "{} never appeared",
            socket.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let channel = ontop_tools::client::connect(socket).await?;
    Ok(Snapshots::new(channel, "ontop", Namespace::default()))
}

fn limit(value: &str) -> HashMap<String, String> {
    HashMap::from([(ONTOP_MAX_SIZE_LABEL.to_string(), value.to_string())])
}

/// Writes 1 MiB chunks, each synced, until one fails: bytes and errno.
fn fill(path: &Path) -> anyhow::Result<(u64, i32)> {
    let mut f = File::create(path)?;
    let chunk = vec![0xa5_u8; MIB as usize];
    let mut written = 0;
    loop {
        if let Err(e) = f.write_all(&chunk).and_then(|()| f.sync_data()) {
            return Ok((written, e.raw_os_error().unwrap_or(0)));
        }
        written += MIB;
        ensure!(written < 512 * MIB, "wrote 512 MiB into a limited snapshot");
    }
}

fn df_total(path: &Path) -> anyhow::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path)?;
    Ok(st.blocks() as u64 * st.fragment_size() as u64)
}

fn full(errno: i32) -> bool {
    errno == nix::libc::EDQUOT || errno == nix::libc::ENOSPC
}

async fn set_limit(c: &mut Snapshots, key: &str, value: &str) -> Result<(), tonic::Status> {
    let mut info = c.stat(key).await?;
    info.labels
        .insert(ONTOP_MAX_SIZE_LABEL.to_string(), value.to_string());
    c.update(info, &[&format!("labels.{ONTOP_MAX_SIZE_LABEL}")])
        .await
        .map(|_| ())
}

/// A snapshot's id, from its upper dir's path (`.../snapshots/<id>/fs`):
/// the upperdir option, or a bind mount's source.
fn id_of(mounts: &[ontop::containerd_api::types::Mount]) -> anyhow::Result<i64> {
    let upper = mounts
        .iter()
        .flat_map(|m| &m.options)
        .find_map(|o| o.strip_prefix("upperdir="))
        .or_else(|| mounts.first().map(|m| m.source.as_str()))
        .context("no mount")?;
    let id = Path::new(upper)
        .parent()
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .with_context(|| format!("no id in {upper}"))?;
    Ok(id)
}

async fn project_quota(c: &mut Snapshots, root: &Path) -> anyhow::Result<()> {
    let mounts = c.prepare("c", "", limit("32MiB")).await?;
    let id = id_of(&mounts)?;
    ensure!(
        !format!("{mounts:?}").contains("/limit/"),
        "a loop image, not a project quota: {mounts:?}"
    );
    let quota = project::limit(root, id)?;
    ensure!(quota == 32 * MIB, "project limit {quota}");
    let target = Path::new("/tmp/c");
    fs::create_dir_all(target)?;
    mount_all(&mounts, target)?;
    let total = df_total(target)?;
    ensure!(
        (31 * MIB..=32 * MIB).contains(&total),
        "df shows {total} bytes for a 32 MiB limit"
    );
    let (written, errno) = fill(&target.join("big"))?;
    ensure!(full(errno), "the write past the limit got errno {errno}");
    ensure!(
        (24 * MIB..=32 * MIB).contains(&written),
        "{written} bytes under a 32 MiB limit"
    );
    println!(
        "LIMITS: project quota stopped a write at {} MiB with errno {errno}",
        written / MIB
    );
    fs::remove_file(target.join("big"))?;
    fs::write(target.join("kept"), vec![7_u8; 3 * MIB as usize])?;
    let (size, _) = c.usage("c").await?;
    ensure!(
        (3 * MIB as i64..4 * MIB as i64).contains(&size),
        "usage {size} for 3 MiB"
    );
    // Raised at once; lowered only above what it holds.
    set_limit(c, "c", "64MiB").await?;
    ensure!(project::limit(root, id)? == 64 * MIB, "not raised");
    let (written, errno) = fill(&target.join("big"))?;
    ensure!(
        full(errno) && written >= 48 * MIB,
        "{written} bytes after raising to 64 MiB"
    );
    fs::remove_file(target.join("big"))?;
    match set_limit(c, "c", "2MiB").await {
        Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
        other => bail!("lowering below usage: {other:?}"),
    }
    set_limit(c, "c", "48MiB").await?;
    ensure!(project::limit(root, id)? == 48 * MIB, "not lowered");
    unmount(target)?;
    c.commit("c1", "c", HashMap::new()).await?;
    ensure!(project::limit(root, id)? == 0, "Commit left the limit");
    let child = c.prepare("child", "c1", HashMap::new()).await?;
    mount_all(&child, target)?;
    ensure!(
        fs::read(target.join("kept"))?.len() == 3 * MIB as usize,
        "child lost kept"
    );
    fs::write(target.join("more"), vec![1_u8; 40 * MIB as usize])
        .context("an unlimited child writing past its parent's old limit")?;
    unmount(target)?;
    // Remove lifts a limit with the snapshot.
    let gone = c.prepare("gone", "", limit("16MiB")).await?;
    let gone_id = id_of(&gone)?;
    ensure!(project::limit(root, gone_id)? == 16 * MIB, "not limited");
    c.remove("gone").await?;
    ensure!(project::limit(root, gone_id)? == 0, "Remove left a limit");
    for key in ["child", "c1"] {
        c.remove(key).await?;
    }
    Ok(())
}

fn serve(root: &Path, config_text: &str) -> anyhow::Result<Child> {
    fs::create_dir_all(root)?;
    let config = root.join("config.toml");
    fs::write(&config, config_text)?;
    Command::new("/usr/bin/ontop")
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(root.join("root"))
        .arg("--address")
        .arg(root.join("ontop.sock"))
        .arg("--log-level")
        .arg("warn")
        .spawn()
        .context("starting a second ontop")
}

async fn loop_image_grows(c: &mut Snapshots) -> anyhow::Result<()> {
    let mounts = c.prepare("c", "", limit("32MiB")).await?;
    let target = Path::new("/tmp/loop");
    fs::create_dir_all(target)?;
    mount_all(&mounts, target)?;
    let before = df_total(target)?;
    set_limit(c, "c", "96MiB").await?;
    let after = df_total(target)?;
    ensure!(
        after >= 96 * MIB && after > before,
        "df went from {before} to {after} for 32 then 96 MiB"
    );
    let (written, errno) = fill(&target.join("big"))?;
    ensure!(
        errno == nix::libc::ENOSPC && written >= 96 * MIB,
        "{written} bytes, errno {errno}, after growing to 96 MiB"
    );
    println!("LIMITS: a loop image grew online from {before} to {after} bytes");
    unmount(target)?;
    c.remove("c").await?;
    Ok(())
}
