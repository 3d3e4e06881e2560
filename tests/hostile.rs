//! Hostile input: the filter parser under proptest and a corpus kept in
//! `tests/corpus/filters.txt`, and the gRPC API fed adversarial keys,
//! labels, filters, field paths and base directories. Every request gets a
//! status from the contract (never Internal, never a dropped connection),
//! the daemon keeps serving, and `ontop check` finds it consistent.

mod common;

use std::collections::HashMap;

use common::{labels, Daemon};
use ontop::filter::Filter;
use ontop::snapshot::{Kind, Snapshot, Timestamp};
use proptest::prelude::*;
use tonic::Code;

const CORPUS: &str = include_str!("corpus/filters.txt");
use ontop::base::BASE_LABEL;

fn sample() -> Snapshot {
    Snapshot {
        id: 1,
        kind: Kind::Active,
        key: "a/b c".into(),
        parent: "p".into(),
        labels: [("x".to_string(), "y".to_string())].into_iter().collect(),
        created: Timestamp(0),
        updated: Timestamp(0),
    }
}

#[test]
fn the_filter_corpus_parses_or_is_refused_without_panicking() {
    for line in CORPUS.lines() {
        if let Ok(f) = Filter::parse_all(&[line]) {
            f.matches(&sample());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Filter-shaped noise: the characters the grammar cares about.
    #[test]
    fn random_filters_never_panic(s in r#"[a-z.,"=!~/\\ ()\[\]*^$0-9]{0,64}"#) {
        if let Ok(f) = Filter::parse_all(&[s.as_str()]) {
            f.matches(&sample());
        }
    }

    /// Anything at all.
    #[test]
    fn arbitrary_strings_never_panic(s in any::<String>()) {
        if let Ok(f) = Filter::parse_all(&[s.as_str()]) {
            f.matches(&sample());
        }
    }
}

/// A status the contract allows for bad input.
fn refused(r: Result<impl std::fmt::Debug, tonic::Status>, what: &str) {
    match r {
        Ok(v) => panic!("{what}: accepted: {v:?}"),
        Err(s) => assert!(
            matches!(
                s.code(),
                Code::InvalidArgument
                    | Code::NotFound
                    | Code::FailedPrecondition
                    | Code::AlreadyExists
            ),
            "{what}: {s}"
        ),
    }
}

#[tokio::test]
async fn adversarial_requests_get_contract_statuses_and_leave_a_consistent_root() {
    let d = Daemon::start_with_bases("").await;
    let mut c = d.client().await;

    // Keys: empty and huge are refused; odd and unicode ones, up to the
    // limit, are just keys.
    refused(c.prepare("", "").await, "empty key");
    refused(c.prepare(&"x".repeat(1 << 20), "").await, "1 MiB key");
    refused(c.prepare("k", "no-such-parent").await, "missing parent");
    for key in [
        "x".repeat(4096),
        "\u{0}".into(),
        "../../etc".into(),
        "😀 / \\ ,:".into(),
    ] {
        c.prepare(&key, "").await.unwrap();
        c.stat(&key).await.unwrap();
        c.remove(&key).await.unwrap();
    }

    // Labels: 512 of them pass, 10k are refused; one over the size limit
    // is refused.
    let many = |n: usize| -> HashMap<String, String> {
        (0..n).map(|i| (format!("l{i}"), "v".into())).collect()
    };
    c.prepare_with("many", "", many(512)).await.unwrap();
    assert_eq!(c.stat("many").await.unwrap().labels.len(), 512);
    refused(
        c.prepare_with("too-many", "", many(10_000)).await,
        "10k labels",
    );
    refused(
        c.prepare_with("big", "", labels(&[("k", &"v".repeat(5000))]))
            .await,
        "oversized label",
    );
    refused(
        c.prepare_with(
            "vol",
            "",
            labels(&[("containerd.io/snapshot/ontop.volatile", "maybe")]),
        )
        .await,
        "bad volatile",
    );

    // Filters from the corpus: parsed or refused as InvalidArgument.
    for line in CORPUS.lines() {
        if let Err(s) = c.list(&[line]).await {
            assert_eq!(s.code(), Code::InvalidArgument, "{line:?}: {s}");
        }
    }

    // Field paths: only labels can change. ("labels.." names the label
    // ".", which is a label key like any other.)
    let info = c.stat("many").await.unwrap();
    for path in ["name", "parent", "kind", "", "created_at", "labelsx"] {
        refused(c.update(info.clone(), &[path]).await, path);
    }
    c.update(info.clone(), &["labels.."]).await.unwrap();

    // Bases: every escape from the allowlist is refused.
    let hosts = d.hosts();
    std::fs::create_dir_all(hosts.join("ok")).unwrap();
    std::os::unix::fs::symlink("loop-b", hosts.join("loop-a")).unwrap();
    std::os::unix::fs::symlink("loop-a", hosts.join("loop-b")).unwrap();
    std::os::unix::fs::symlink("/etc", hosts.join("to-etc")).unwrap();
    let escapes = [
        "..".to_string(),
        "relative/dir".into(),
        format!("{}/../..", hosts.display()),
        format!("{}/ok/../../..", hosts.display()),
        format!("{}/loop-a", hosts.display()),
        format!("{}/to-etc", hosts.display()),
        "/proc".into(),
        "/".into(),
        d.root.display().to_string(),
        d.root.join("snapshots").display().to_string(),
        format!("{}/ok\u{0}", hosts.display()),
    ];
    for (i, base) in escapes.iter().enumerate() {
        refused(
            c.prepare_with(&format!("b{i}"), "", labels(&[(BASE_LABEL, base)]))
                .await,
            base,
        );
    }

    // Still serving, nothing half-made, and the root is consistent.
    c.prepare("after", "").await.unwrap();
    let listed = c.list(&[]).await.unwrap();
    assert_eq!(listed, ["after", "many"]);
    d.assert_consistent();
}

/// Sends bytes as they are, to put what protobuf forbids on the wire.
#[derive(Clone, Default)]
struct Raw;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl tonic::codec::Encoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for Raw {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        Ok(Some(buf.copy_to_bytes(buf.remaining()).to_vec()))
    }
}

/// A key that is not UTF-8 cannot be a protobuf string: the request does
/// not parse, and gRPC's status table gives INTERNAL for an unparseable
/// request (tonic and grpc-go alike). Nothing reaches ontop's core.
#[tokio::test]
async fn a_non_utf8_key_is_an_unparseable_request_and_changes_nothing() {
    let d = Daemon::start().await;
    let channel = ontop_tools::client::connect(&d.socket).await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // PrepareSnapshotRequest { snapshotter: "ontop", key: [ff fe 41] }
    let body = vec![
        0x0a, 5, b'o', b'n', b't', b'o', b'p', 0x12, 3, 0xff, 0xfe, 0x41,
    ];
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(
        "/containerd.services.snapshots.v1.Snapshots/Prepare",
    );
    let err = grpc
        .unary(tonic::Request::new(body), path, Raw)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Internal, "{err}");
    assert!(err.message().contains("UTF-8"), "{err}");
    let mut c = d.client().await;
    assert!(c.list(&[]).await.unwrap().is_empty());
    assert!(d.snapshot_dirs().is_empty());
}
