//! The library's modules stand in the order docs/design.md lists them:
//! each imports only modules listed below it, so there is no cycle, and
//! the page names every module as it is.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every `.rs` file under `dir`.
fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out.sort();
    out
}

/// The top-level module a file of src/ belongs to: `src/store/tx.rs` is
/// `store`'s.
fn module_of(file: &Path) -> String {
    let rel = file.strip_prefix(Path::new(ROOT).join("src")).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// Which top-level modules each module uses through `crate::`, outside its
/// unit tests (which may reach anywhere).
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in sources(&Path::new(ROOT).join("src")) {
        let module = module_of(&file);
        if module == "main" || module == "lib" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap();
        let code = text.split("#[cfg(test)]\nmod ").next().unwrap();
        let uses = graph.entry(module.clone()).or_default();
        for (i, _) in code.match_indices("crate::") {
            let name: String = code[i + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != module {
                uses.insert(name);
            }
        }
    }
    graph
}

/// A cycle through `from`, if any, as the path that closes it.
fn cycle_from(
    graph: &BTreeMap<String, BTreeSet<String>>,
    from: &str,
    path: &mut Vec<String>,
    done: &mut BTreeSet<String>,
) -> Option<Vec<String>> {
    if let Some(at) = path.iter().position(|m| m == from) {
        let mut cycle = path[at..].to_vec();
        cycle.push(from.to_string());
        return Some(cycle);
    }
    if done.contains(from) {
        return None;
    }
    path.push(from.to_string());
    for next in graph.get(from).into_iter().flatten() {
        if let Some(c) = cycle_from(graph, next, path, done) {
            return Some(c);
        }
    }
    path.pop();
    done.insert(from.to_string());
    None
}

#[test]
fn no_module_imports_one_that_imports_it_back() {
    let graph = imports();
    assert!(graph.len() > 20, "found too few modules: {graph:?}");
    let mut done = BTreeSet::new();
    for module in graph.keys() {
        if let Some(cycle) = cycle_from(&graph, module, &mut Vec::new(), &mut done) {
            panic!("an import cycle among the modules: {}", cycle.join(" -> "));
        }
    }
}

/// The modules of src/ in the order docs/design.md's first list gives.
fn design_order() -> Vec<String> {
    let design = std::fs::read_to_string(Path::new(ROOT).join("docs/design.md")).unwrap();
    let block = design
        .split("```text\n")
        .nth(1)
        .expect("a text block in design.md");
    let block = block.split("```").next().unwrap();
    block
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.strip_prefix("src/"))
        .map(|m| m.trim_end_matches(".rs").trim_end_matches('/').to_string())
        .collect()
}

#[test]
fn every_module_imports_only_modules_the_design_page_lists_below_it() {
    let graph = imports();
    let order = design_order();
    let mut wrong = Vec::new();
    for (module, uses) in &graph {
        let Some(at) = order.iter().position(|m| m == module) else {
            wrong.push(format!("{module} is not in design.md's list"));
            continue;
        };
        for used in uses.iter().filter(|u| graph.contains_key(*u)) {
            if order
                .iter()
                .position(|m| m == used)
                .is_some_and(|u| u <= at)
            {
                wrong.push(format!("{module} uses {used}, listed above it"));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn the_design_page_names_every_module_and_nothing_else() {
    let design = std::fs::read_to_string(Path::new(ROOT).join("docs/design.md")).unwrap();
    let mut files: Vec<PathBuf> = sources(&Path::new(ROOT).join("src"));
    files.extend(sources(&Path::new(ROOT).join("tools/src")));
    let mut missing = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(ROOT)
            .unwrap()
            .to_string_lossy()
            .to_string();
        // A directory module is named once, as `src/store/`.
        let parts: Vec<&str> = rel.split('/').collect();
        let named = match parts.as_slice() {
            [top, "src", dir, _] if *top == "tools" => format!("tools/src/{dir}/"),
            ["src", dir, _] => format!("src/{dir}/"),
            _ => rel.clone(),
        };
        if !design.contains(&named) && !missing.contains(&named) {
            missing.push(named);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/design.md does not name {missing:?}"
    );
    // And every source path it names exists.
    let mut stale = Vec::new();
    for word in design.split(|c: char| c.is_whitespace() || c == '`') {
        if (word.starts_with("src/") || word.starts_with("tools/src/"))
            && !Path::new(ROOT).join(word).exists()
        {
            stale.push(word.to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "docs/design.md names files that are gone: {stale:?}"
    );
}
