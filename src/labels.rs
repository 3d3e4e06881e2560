//! Label rules shared by every write path.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::snapshot::Labels;

/// containerd rejects a label whose key and value together exceed this.
pub const MAX_LABEL_SIZE: usize = 4096;

/// The most labels one snapshot may carry: far above what containerd and
/// CRI set (a handful), and with [`MAX_LABEL_SIZE`] a bound of 2 MiB on
/// what one snapshot's labels hold, under gRPC's 4 MiB message limit.
pub const MAX_LABELS: usize = 512;

/// Checks sizes and drops empty values, which mean "unset" to containerd.
pub fn validate(labels: HashMap<String, String>) -> Result<Labels> {
    for (k, v) in &labels {
        check_size(k, v)?;
    }
    let labels: Labels = labels.into_iter().filter(|(_, v)| !v.is_empty()).collect();
    check_count(&labels)?;
    Ok(labels)
}

/// Refuses more than [`MAX_LABELS`] labels on one snapshot.
pub fn check_count(labels: &Labels) -> Result<()> {
    if labels.len() > MAX_LABELS {
        return Err(Error::invalid_argument(format!(
            "{} labels on one snapshot; the limit is {MAX_LABELS}",
            labels.len()
        )));
    }
    Ok(())
}

pub fn check_size(key: &str, value: &str) -> Result<()> {
    let size = key.len() + value.len();
    if size > MAX_LABEL_SIZE {
        let shown: String = key.chars().take(64).collect();
        return Err(Error::invalid_argument(format!(
            "label {shown:?}{} is {size} bytes (key plus value); the limit is {MAX_LABEL_SIZE}",
            if shown.len() < key.len() { "..." } else { "" },
        )));
    }
    Ok(())
}

/// Refuses an Update that names a field other than labels, or a label
/// too big, before anything is read.
pub fn check_update(
    key: &str,
    requested: &HashMap<String, String>,
    fieldpaths: &[String],
) -> Result<()> {
    for path in fieldpaths {
        if path != "labels" && !path.starts_with("labels.") {
            return Err(Error::invalid_argument(format!(
                "cannot update field {path:?} of snapshot {key:?}: only \"labels\" and \"labels.<key>\" can be updated"
            )));
        }
    }
    for (k, v) in requested {
        check_size(k, v)?;
    }
    Ok(())
}

/// The labels after an Update, as containerd's metadata store merges
/// them: no field paths, or `labels`, replace every label with the
/// requested ones; `labels.KEY` sets KEY from the request, or removes it
/// when the request lacks it. An empty value means unset. The paths are
/// those [`check_update`] let through.
pub fn merge_update(
    old: &Labels,
    requested: &HashMap<String, String>,
    fieldpaths: &[String],
) -> Labels {
    let all = || requested.clone().into_iter().collect();
    let mut labels = if fieldpaths.is_empty() {
        all()
    } else {
        old.clone()
    };
    for path in fieldpaths {
        match path.strip_prefix("labels.") {
            None => labels = all(),
            Some(k) => match requested.get(k) {
                Some(v) => {
                    labels.insert(k.to_string(), v.clone());
                }
                None => {
                    labels.remove(k);
                }
            },
        }
    }
    labels.retain(|_, v| !v.is_empty());
    labels
}

/// Whether an Update with these field paths may change `label`.
pub fn update_names(
    requested: &HashMap<String, String>,
    fieldpaths: &[String],
    label: &str,
) -> bool {
    let replaces_all = fieldpaths.is_empty() || fieldpaths.iter().any(|p| p == "labels");
    (replaces_all && requested.contains_key(label))
        || fieldpaths
            .iter()
            .any(|p| p.strip_prefix("labels.") == Some(label))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_on_key_plus_value() {
        let key = "k".repeat(96);
        let ok = HashMap::from([(key.clone(), "v".repeat(MAX_LABEL_SIZE - 96))]);
        assert!(validate(ok).is_ok());
        let over = HashMap::from([(key, "v".repeat(MAX_LABEL_SIZE - 95))]);
        let err = validate(over).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(err.to_string().contains("4097 bytes"), "{err}");
    }

    #[test]
    fn empty_values_are_dropped() {
        let l = validate(HashMap::from([
            ("a".into(), "".into()),
            ("b".into(), "1".into()),
        ]))
        .unwrap();
        assert_eq!(
            l.into_iter().collect::<Vec<_>>(),
            [("b".into(), "1".into())]
        );
    }

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn update_merges_labels_by_field_path() {
        let old = [("a", "1"), ("b", "2")];
        // (requested, field paths, labels after)
        type Pairs<'a> = &'a [(&'a str, &'a str)];
        let cases: &[(Pairs, &[&str], Pairs)] = &[
            // No paths: the request replaces every label.
            (&[("c", "3")], &[], &[("c", "3")]),
            (&[], &[], &[]),
            // "labels": the same.
            (&[("c", "3")], &["labels"], &[("c", "3")]),
            // "labels.KEY": set from the request...
            (&[("a", "9")], &["labels.a"], &[("a", "9"), ("b", "2")]),
            (
                &[("c", "3")],
                &["labels.c"],
                &[("a", "1"), ("b", "2"), ("c", "3")],
            ),
            // ...or removed when the request lacks it.
            (&[], &["labels.a"], &[("b", "2")]),
            (&[("x", "y")], &["labels.a"], &[("b", "2")]),
            // An empty value unsets.
            (&[("a", "")], &["labels.a"], &[("b", "2")]),
            (&[("a", ""), ("c", "3")], &[], &[("c", "3")]),
            // Several paths; a key with dots.
            (
                &[("a", "9"), ("x.y/z", "w")],
                &["labels.a", "labels.x.y/z", "labels.b"],
                &[("a", "9"), ("x.y/z", "w")],
            ),
            // "labels" among paths replaces all, then later paths apply.
            (&[("c", "3")], &["labels", "labels.a"], &[("c", "3")]),
        ];
        for (requested, paths, after) in cases {
            let paths: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
            let got = merge_update(&crate::snapshot::labels_of(&old), &map(requested), &paths);
            assert_eq!(
                got,
                crate::snapshot::labels_of(after),
                "requested {requested:?} with paths {paths:?}"
            );
        }
    }

    #[test]
    fn an_update_names_a_label_when_it_replaces_all_with_it_or_names_its_path() {
        let base = "b";
        let p = |ps: &[&str]| ps.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(update_names(&map(&[("b", "x")]), &p(&[]), base));
        assert!(update_names(&map(&[("b", "x")]), &p(&["labels"]), base));
        assert!(update_names(&map(&[]), &p(&["labels.b"]), base));
        assert!(!update_names(&map(&[]), &p(&[]), base));
        assert!(!update_names(&map(&[("b", "x")]), &p(&["labels.a"]), base));
    }

    #[test]
    fn only_label_fields_can_be_updated() {
        let err = check_update("k", &map(&[]), &["kind".to_string()]).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert!(check_update("k", &map(&[]), &["labels.x".to_string()]).is_ok());
    }
}
