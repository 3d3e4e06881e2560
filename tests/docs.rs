//! The documentation holds together: every relative link in README.md,
//! CONTRIBUTING.md and docs/ names a file that exists (and, with `#`, one
//! of its headings), the README stays short enough to read, and every
//! key of ontop's config file is documented where users look for it.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn pages() -> Vec<PathBuf> {
    let mut pages = vec![root().join("README.md"), root().join("CONTRIBUTING.md")];
    let mut docs: Vec<_> = std::fs::read_dir(root().join("docs"))
        .expect("docs/")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// The `(target)` of every `[text](target)` outside code blocks.
fn links(markdown: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let mut rest = line;
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let Some(end) = after.find(')') else { break };
            out.push(after[..end].to_string());
            rest = &after[end..];
        }
    }
    out
}

/// GitHub's anchors: headings lower-cased, punctuation dropped, spaces
/// turned into dashes.
fn anchors(markdown: &str) -> HashSet<String> {
    markdown
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let mut broken = Vec::new();
    for page in pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for link in links(&text) {
            if link.contains("://") || link.starts_with("mailto:") {
                continue;
            }
            let (file, anchor) = link.split_once('#').unwrap_or((&link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            if !target.exists() {
                broken.push(format!("{}: {link} (no such file)", page.display()));
            } else if !anchor.is_empty() {
                let headings = anchors(&std::fs::read_to_string(&target).unwrap());
                if !headings.contains(anchor) {
                    broken.push(format!("{}: {link} (no such heading)", page.display()));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_readme_is_short() {
    let size = std::fs::metadata(root().join("README.md")).unwrap().len();
    assert!(
        size <= 15 * 1024,
        "README.md is {size} bytes; keep it at most 15 KB and move detail to docs/"
    );
}

/// The keys `config.toml` accepts: the fields of `FileConfig`.
fn config_keys() -> Vec<String> {
    let source = std::fs::read_to_string(root().join("src/config.rs")).unwrap();
    let start = source
        .find("pub struct FileConfig {")
        .expect("FileConfig in src/config.rs");
    let body = &source[start..start + source[start..].find("\n}").unwrap()];
    let keys: Vec<String> = body
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(": Option<"))
        .map(|(key, _)| key.to_string())
        .collect();
    assert!(keys.len() >= 10, "FileConfig's fields not found: {keys:?}");
    keys
}

#[test]
fn every_config_key_is_documented_and_in_the_example() {
    let page = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let example = std::fs::read_to_string(root().join("config.toml.example")).unwrap();
    let example_keys: Vec<&str> = example
        .lines()
        .map(|l| l.trim_start_matches("# "))
        .filter_map(|l| l.split_once(" = ").map(|(k, _)| k))
        .filter(|k| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    let keys = config_keys();
    for key in &keys {
        assert!(
            page.contains(&format!("`{key}`")),
            "docs/configuration.md does not document `{key}`"
        );
        assert!(
            example_keys.contains(&key.as_str()),
            "config.toml.example does not show `{key}`"
        );
    }
    for key in example_keys {
        assert!(
            keys.iter().any(|k| k == key),
            "config.toml.example shows `{key}`, which ontop does not accept"
        );
    }
}
