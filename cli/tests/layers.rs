//! The library's modules form layers: no import cycle, and the ground floor (`abi`, `error`,
//! `system`) imports nothing above it. A reader finds where a change belongs from the tree,
//! and a lower module never needs a higher one to build.
//!
//! The graph is read from the sources: every `crate::a` or `crate::{a, b::c}` path in a file
//! under the library's `src/` is an edge from the file's top-level module to `a`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// The modules at the bottom, and the only crate modules each may import.
const GROUND_FLOOR: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("system", &["error"]),
    ("cidr", &["error"]),
    ("abi", &["error", "skel", "cidr"]),
    ("skel", &[]),
];

type Graph = BTreeMap<String, BTreeSet<String>>;

/// The library's source directory, the workspace root's src/ (this test is the cli crate's).
fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("cli/ is inside the workspace")
        .join("src")
}

/// Every `.rs` file under `dir`, except the BPF C's directory.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name != "bpf" {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`src/pins/load.rs` → `pins`), `None` for lib.rs.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib").then(|| name.to_string())
}

/// The code of a file without its `//` comments (doc comments name modules in prose).
fn without_comments(text: &str) -> String {
    text.lines()
        .map(|line| match line.find("//") {
            // A `//` inside a string literal ("http://") is rare here; the worst case is a
            // missed edge in the rest of that line, never a made-up one.
            Some(at) => &line[..at],
            None => line,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// The first segment of each path in a `{...}` group starting at `text` (after the `{`).
fn group_heads(text: &str, out: &mut BTreeSet<String>) {
    let mut depth = 0usize;
    let mut at_start = true;
    let mut word = String::new();
    for c in text.chars() {
        match c {
            '{' => {
                depth += 1;
                at_start = false;
            }
            '}' if depth == 0 => break,
            '}' => depth -= 1,
            ',' if depth == 0 => at_start = true,
            c if depth == 0 && at_start && is_ident(c) => word.push(c),
            _ if depth == 0 && at_start && !word.is_empty() => {
                out.insert(std::mem::take(&mut word));
                at_start = false;
            }
            _ => {}
        }
    }
    if !word.is_empty() {
        out.insert(word);
    }
}

/// The crate modules `code` names through `crate::`.
fn imports(code: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let preceded = rest[..at]
            .chars()
            .next_back()
            .is_some_and(|c| is_ident(c) || c == '$');
        rest = &rest[at + "crate::".len()..];
        if preceded {
            continue; // `$crate::`, `other_crate::`
        }
        if let Some(group) = rest.strip_prefix('{') {
            group_heads(group, &mut out);
        } else {
            let name: String = rest.chars().take_while(|&c| is_ident(c)).collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

/// The module graph of the library's sources.
fn graph(src: &Path) -> Graph {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut graph = Graph::new();
    for file in files {
        let Some(module) = module_of(src, &file) else {
            continue;
        };
        let text =
            fs::read_to_string(&file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let edges = graph.entry(module.clone()).or_default();
        for dep in imports(&without_comments(&text)) {
            if dep != module && dep != "self" && dep != "super" {
                edges.insert(dep);
            }
        }
    }
    graph
}

/// One cycle of `graph` as a path `a → b → … → a`, if it has any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        node: &str,
        graph: &Graph,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|n| n == node).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(node.to_string());
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node.to_string(), Mark::Open);
        stack.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node.to_string(), Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for node in graph.keys() {
        if let Some(cycle) = visit(node, graph, &mut marks, &mut Vec::new()) {
            return Some(cycle);
        }
    }
    None
}

fn edges(list: &[(&str, &[&str])]) -> Graph {
    list.iter()
        .map(|(from, to)| {
            let to = to.iter().map(|s| s.to_string()).collect();
            (from.to_string(), to)
        })
        .collect()
}

#[test]
fn the_library_modules_import_each_other_without_a_cycle() {
    let graph = graph(&src_dir());
    assert!(graph.len() > 10, "too few modules found: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "import cycle: {}; move the shared item down into the lower module \
             (layers: /work/shared/DESIGN.md \"Userspace layers\")",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_ground_floor_imports_nothing_above_it() {
    let graph = graph(&src_dir());
    for (module, allowed) in GROUND_FLOOR {
        let found = graph
            .get(*module)
            .unwrap_or_else(|| panic!("module {module} not found"));
        let above: Vec<_> = found
            .iter()
            .filter(|d| !allowed.contains(&d.as_str()))
            .collect();
        assert!(
            above.is_empty(),
            "{module} imports {above:?}, above the ground floor"
        );
    }
}

#[test]
fn the_check_finds_imports_and_cycles() {
    let code = "use crate::abi::{self, X};\nuse crate::{error::Result, pins::{a, b}};\n\
                fn f() { crate::mapio::read(); $crate::no(); my_crate::no(); }";
    let found: Vec<_> = imports(code).into_iter().collect();
    assert_eq!(found, ["abi", "error", "mapio", "pins"]);
    assert!(imports(&without_comments("// crate::trace in prose")).is_empty());

    let acyclic = edges(&[("a", &["b", "c"]), ("b", &["c"]), ("c", &[])]);
    assert_eq!(find_cycle(&acyclic), None);
    let cyclic = edges(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])]);
    assert_eq!(
        find_cycle(&cyclic),
        Some(vec!["a".into(), "b".into(), "c".into(), "a".into()])
    );
}
