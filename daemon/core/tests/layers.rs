//! The layering of custody's two crates, checked from their sources:
//!
//! - `custody-core` does not depend on gRPC: no tonic, prost or generated
//!   `custody.v1` types in its manifest or its code;
//! - within each crate, no import cycle between top-level modules (a
//!   module's `crate::x` paths, outside its tests, name the modules it
//!   imports; `crate::Custody`, `crate::Error` and `crate::Reason` are the
//!   modules that define them);
//! - no source file over 800 lines, tests aside.
//!
//! Run: `cargo test -p custody-core --test layers`.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 800;

fn core_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn daemon_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The code of a file before its first `#[cfg(test)]`, without comments.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    let body = text.split("#[cfg(test)]").next().unwrap_or_default();
    body.lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A file's top-level module (`keys` for `src/keys/rotate.rs`).
fn top_module(src: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(src).unwrap();
    let first = rel.components().next()?.as_os_str().to_str()?.to_string();
    if first == "bin" {
        return None;
    }
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// Modules named by `crate::...` paths; root re-exports resolved.
fn imports(code: &str) -> BTreeSet<String> {
    let reexports = [
        ("Custody", "custody"),
        ("Error", "error"),
        ("Reason", "error"),
    ];
    let mut found = BTreeSet::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() {
            // `crate::{a, B}`: every name in the braces.
            if let Some(list) = rest.strip_prefix('{') {
                for item in list.split('}').next().unwrap_or_default().split(',') {
                    let item = item.trim().split("::").next().unwrap_or_default();
                    if let Some((_, module)) = reexports.iter().find(|(n, _)| *n == item) {
                        found.insert(module.to_string());
                    } else if item.starts_with(|c: char| c.is_ascii_lowercase()) {
                        found.insert(item.to_string());
                    }
                }
            }
        } else if let Some((_, module)) = reexports.iter().find(|(n, _)| *n == name) {
            found.insert(module.to_string());
        } else if name.starts_with(|c: char| c.is_ascii_lowercase()) {
            found.insert(name);
        }
    }
    found
}

fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let Some(module) = top_module(src, &file) else {
            continue;
        };
        let entry = graph.entry(module.clone()).or_default();
        for imported in imports(&code(&file)) {
            if imported != module {
                entry.insert(imported);
            }
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    for edges in graph.values_mut() {
        edges.retain(|m| modules.contains(m));
    }
    graph
}

/// Every cycle's modules (strongly connected components of two or more).
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    // Reachability closure: small graphs, clarity over speed.
    let reach = |from: &str| {
        let mut seen = BTreeSet::new();
        let mut todo = vec![from.to_string()];
        while let Some(m) = todo.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if seen.insert(next.clone()) {
                    todo.push(next.clone());
                }
            }
        }
        seen
    };
    let reachable: BTreeMap<&String, BTreeSet<String>> =
        graph.keys().map(|m| (m, reach(m))).collect();
    let mut out: Vec<Vec<String>> = Vec::new();
    for m in graph.keys() {
        let component: Vec<String> = graph
            .keys()
            .filter(|n| *n == m || (reachable[m].contains(*n) && reachable[*n].contains(m)))
            .cloned()
            .collect();
        if component.len() > 1 && !out.contains(&component) {
            out.push(component);
        }
    }
    out
}

#[test]
fn the_domain_does_not_know_grpc() {
    let manifest =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap()
        .split("\n[")
        .next()
        .unwrap();
    for forbidden in ["tonic", "prost", "custody-proto"] {
        assert!(
            !dependencies
                .lines()
                .any(|line| line.trim_start().starts_with(forbidden)),
            "custody-core depends on {forbidden}"
        );
    }
    let mut files = Vec::new();
    rust_files(&core_src(), &mut files);
    for file in files {
        let text = code(&file);
        for forbidden in ["tonic::", "prost", "custody_proto"] {
            assert!(
                !text.contains(forbidden),
                "{} names {forbidden}",
                file.display()
            );
        }
    }
}

#[test]
fn no_import_cycle_between_the_modules_of_either_crate() {
    for src in [core_src(), daemon_src()] {
        let graph = module_graph(&src);
        assert!(graph.len() > 5, "{}: no modules found", src.display());
        assert_eq!(
            cycles(&graph),
            Vec::<Vec<String>>::new(),
            "import cycles in {}",
            src.display()
        );
    }
}

#[test]
fn no_source_file_is_over_the_limit() {
    for src in [core_src(), daemon_src()] {
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        // A `tests.rs` is a test module of its own (`#[cfg(test)] mod
        // tests;` in its parent): all of it is tests.
        for file in files.into_iter().filter(|f| !f.ends_with("tests.rs")) {
            let text = fs::read_to_string(&file).unwrap();
            let lines = text
                .split("#[cfg(test)]")
                .next()
                .unwrap_or_default()
                .lines()
                .count();
            assert!(
                lines <= MAX_LINES,
                "{} has {lines} lines of code (at most {MAX_LINES})",
                file.display()
            );
        }
    }
}

#[test]
fn the_checker_finds_cycles_and_root_reexports() {
    let uses = imports("use crate::{Custody, Error, keys::x};\nlet a = crate::registry::get();");
    assert_eq!(
        uses,
        ["custody", "error", "keys", "registry"]
            .map(String::from)
            .into()
    );
    let graph: BTreeMap<String, BTreeSet<String>> = [
        ("a", vec!["b"]),
        ("b", vec!["c"]),
        ("c", vec!["a"]),
        ("d", vec!["a"]),
    ]
    .into_iter()
    .map(|(m, e)| (m.to_string(), e.into_iter().map(String::from).collect()))
    .collect();
    assert_eq!(
        cycles(&graph),
        vec![
            vec!["a", "b", "c"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>()
        ]
    );
}
