//! 64 concurrent clients, each on its own connection, racing on shared keys
//! and working on private ones. No deadlock, no SQLite "database is locked"
//! reaching a client, exactly one winner wherever the contract allows one,
//! and a final state equal to a sequential model of what succeeded.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{Client, Daemon};
use tokio::sync::Barrier;
use tonic::Code;

const CLIENTS: usize = 64;
const ROUNDS: usize = 8;

/// What one client saw succeed.
#[derive(Default)]
struct Outcome {
    prepared: usize,
    committed: usize,
    removed: usize,
    children: Vec<(usize, String)>,
    private: BTreeSet<String>,
}

/// Codes a losing racer may get; anything else is a bug. "database is
/// locked" would be Internal.
fn lost(s: &tonic::Status, allowed: &[Code]) {
    assert!(
        allowed.contains(&s.code()) && !s.message().contains("locked"),
        "unexpected error: {s}"
    );
}

async fn client(mut c: Client, me: usize, barrier: Arc<Barrier>) -> Outcome {
    let mut out = Outcome::default();
    for r in 0..ROUNDS {
        let shared = format!("shared-{r}");
        let done = format!("done-{r}");
        // Everyone prepares the same key: one wins.
        match c.prepare(&shared, "").await {
            Ok(_) => out.prepared += 1,
            Err(s) => lost(&s, &[Code::AlreadyExists]),
        }
        barrier.wait().await;
        // Everyone commits it under the same name: one wins.
        match c.commit(&done, &shared).await {
            Ok(()) => out.committed += 1,
            Err(s) => lost(
                &s,
                &[
                    Code::AlreadyExists,
                    Code::NotFound,
                    Code::FailedPrecondition,
                ],
            ),
        }
        barrier.wait().await;
        // Half race to build on it, half to remove it.
        if me.is_multiple_of(2) {
            let child = format!("child-{r}-{me}");
            match c.prepare(&child, &done).await {
                Ok(_) => out.children.push((r, child)),
                Err(s) => lost(&s, &[Code::NotFound]),
            }
        } else {
            match c.remove(&done).await {
                Ok(()) => out.removed += 1,
                Err(s) => lost(&s, &[Code::NotFound, Code::FailedPrecondition]),
            }
        }
        // Private work between rounds, which must all succeed.
        let mine = format!("private-{me}-{r}");
        c.prepare(&format!("{mine}-active"), "").await.unwrap();
        c.commit(&mine, &format!("{mine}-active")).await.unwrap();
        if r % 2 == 0 {
            c.remove(&mine).await.unwrap();
        } else {
            out.private.insert(mine);
        }
        barrier.wait().await;
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_racing_clients_end_in_the_state_a_sequential_model_predicts() {
    let d = Daemon::start().await;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let mut tasks = Vec::new();
    for me in 0..CLIENTS {
        // Each client its own connection, as separate containerd shims are.
        let c = d.client().await;
        tasks.push(tokio::spawn(client(c, me, Arc::clone(&barrier))));
    }
    let all = tokio::time::timeout(Duration::from_secs(120), futures::future::join_all(tasks))
        .await
        .expect("no deadlock: every client finishes");
    let outcomes: Vec<Outcome> = all.into_iter().map(|r| r.unwrap()).collect();

    assert_eq!(
        outcomes.iter().map(|o| o.prepared).sum::<usize>(),
        ROUNDS,
        "one Prepare wins per round"
    );
    assert_eq!(
        outcomes.iter().map(|o| o.committed).sum::<usize>(),
        ROUNDS,
        "one Commit wins per round"
    );

    // The model: private snapshots kept, and per round either the committed
    // layer was removed (only possible before any child) or it stands with
    // every child that was prepared on it.
    let mut expected: BTreeSet<String> = outcomes.iter().flat_map(|o| o.private.clone()).collect();
    for r in 0..ROUNDS {
        let children: Vec<String> = outcomes
            .iter()
            .flat_map(|o| {
                o.children
                    .iter()
                    .filter(|(cr, _)| *cr == r)
                    .map(|(_, k)| k.clone())
            })
            .collect();
        // A child pins its parent: Remove after it fails, and a Prepare
        // after a Remove finds no parent.
        if !children.is_empty() {
            expected.insert(format!("done-{r}"));
            expected.extend(children);
        }
    }
    let removes: usize = outcomes.iter().map(|o| o.removed).sum();
    let rounds_without_children = (0..ROUNDS)
        .filter(|r| {
            !outcomes
                .iter()
                .any(|o| o.children.iter().any(|(cr, _)| cr == r))
        })
        .count();
    assert_eq!(
        removes, rounds_without_children,
        "a layer is removed exactly when nothing was built on it"
    );

    let mut c = d.client().await;
    let listed: BTreeSet<String> = c.list(&[]).await.unwrap().into_iter().collect();
    assert_eq!(listed, expected);
    c.cleanup().await.unwrap();
    let dirs = d.snapshot_dirs().len();
    assert_eq!(dirs, expected.len(), "one directory per snapshot");
}
