//! The layout shows the architecture: no import circle among the crate's source files, and no
//! arrow from the pieces every role shares (`http`, `ops`, `boot`, `clock`, `limits`) up to a
//! role's runtime.
//!
//! The import graph is read from the sources as text: a file imports another when it names a
//! path into it (`crate::a::b`, `super::x`, a `use` group `crate::a::{b, c::D}`), test modules
//! and test files left out. A parent naming its own child module (`mod x;`, `x::f()`) is not an
//! import. The check prints each circle it finds with the names that tie it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module path (`["datacenter", "link"]`) of each source file under `src/`.
fn modules(src: &Path) -> BTreeMap<Vec<String>, PathBuf> {
    let mut out = BTreeMap::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("read src") {
            let p = e.expect("dir entry").path();
            if p.is_dir() {
                stack.push(p);
                continue;
            }
            if p.extension().is_none_or(|x| x != "rs") {
                continue;
            }
            let rel = p.strip_prefix(src).expect("under src");
            let mut parts: Vec<String> = rel
                .iter()
                .map(|s| s.to_string_lossy().trim_end_matches(".rs").to_string())
                .collect();
            let last = parts.last().cloned().unwrap_or_default();
            if matches!(last.as_str(), "mod" | "lib" | "main") {
                parts.pop();
            }
            // Test files (`tests.rs`, `*_tests.rs`, `tests/` folders) are not the layout.
            if parts.iter().any(|s| s == "tests" || s.ends_with("_tests")) {
                continue;
            }
            out.insert(parts, p);
        }
    }
    out
}

/// The text of a file without its `#[cfg(test)]` modules and comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("read source");
    let mut out = String::new();
    let mut skip_depth: Option<i32> = None;
    let mut depth = 0i32;
    let mut pending_test = false;
    for line in text.lines() {
        let t = line.trim_start();
        if t.starts_with("//") {
            continue;
        }
        if skip_depth.is_none() && t.starts_with("#[cfg(test)]") {
            pending_test = true;
            continue;
        }
        let opens = line.matches('{').count() as i32;
        let closes = line.matches('}').count() as i32;
        if pending_test {
            pending_test = false;
            if t.starts_with("mod ") && opens > 0 {
                skip_depth = Some(depth);
                depth += opens - closes;
                continue;
            }
        }
        depth += opens - closes;
        if let Some(d) = skip_depth {
            if depth <= d {
                skip_depth = None;
            }
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every path the code names that starts at `crate::` or `super::`, resolved to absolute
/// module paths (with the names after the last module segment left on; the caller finds the
/// longest known module prefix).
fn named_paths(code: &str, me: &[String], is_mod_rs: bool) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts = |kw: &str| code_at(&bytes, i, kw) && (i == 0 || !is_ident(bytes[i - 1]));
        let base: Option<Vec<String>> = if starts("crate::") {
            i += "crate::".len();
            Some(Vec::new())
        } else if starts("super::") {
            // `super` of a file `a/b.rs` is `a`; of `a/b/mod.rs` (module a::b) also `a`.
            let _ = is_mod_rs;
            let mut base = me.to_vec();
            base.pop();
            i += "super::".len();
            while code_at(&bytes, i, "super::") {
                base.pop();
                i += "super::".len();
            }
            Some(base)
        } else {
            None
        };
        let Some(base) = base else {
            i += 1;
            continue;
        };
        parse_tree(&bytes, &mut i, base, &mut out);
    }
    out
}

fn code_at(b: &[char], i: usize, kw: &str) -> bool {
    kw.chars()
        .enumerate()
        .all(|(k, c)| b.get(i + k) == Some(&c))
}

/// Parses `a::b::{c, d::E}` at `i` below `base`, pushing every full path.
fn parse_tree(b: &[char], i: &mut usize, mut base: Vec<String>, out: &mut Vec<Vec<String>>) {
    loop {
        while b.get(*i).is_some_and(|c| c.is_whitespace()) {
            *i += 1;
        }
        if b.get(*i) == Some(&'{') {
            *i += 1;
            loop {
                while b.get(*i).is_some_and(|c| c.is_whitespace() || *c == ',') {
                    *i += 1;
                }
                match b.get(*i) {
                    None => return,
                    Some('}') => {
                        *i += 1;
                        out.push(base);
                        return;
                    }
                    _ => {
                        let before = *i;
                        parse_tree(b, i, base.clone(), out);
                        if *i == before {
                            *i += 1;
                        }
                    }
                }
            }
        }
        let start = *i;
        while b.get(*i).is_some_and(|c| is_ident(*c)) {
            *i += 1;
        }
        if *i == start {
            out.push(base);
            return;
        }
        base.push(b[start..*i].iter().collect());
        if code_at(b, *i, "::") {
            *i += 2;
            continue;
        }
        out.push(base);
        return;
    }
}

/// File -> file imports, with the names that tie each pair.
fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeMap<Vec<String>, BTreeSet<String>>> {
    let mods = modules(src);
    let mut g: BTreeMap<_, BTreeMap<_, BTreeSet<String>>> = BTreeMap::new();
    for (me, path) in &mods {
        let is_mod_rs = path.file_name().is_some_and(|f| f == "mod.rs");
        g.entry(me.clone()).or_default();
        for p in named_paths(&code(path), me, is_mod_rs) {
            // The longest prefix of `p` that is a file of ours.
            let Some(k) = (1..=p.len()).rev().find(|k| mods.contains_key(&p[..*k])) else {
                continue;
            };
            let target = p[..k].to_vec();
            if &target == me {
                continue;
            }
            // A file naming a module inside itself (its own child) is not an import of it.
            if target.starts_with(me) && !me.is_empty() {
                continue;
            }
            let names = p[k..].join("::");
            g.entry(me.clone())
                .or_default()
                .entry(target)
                .or_default()
                .insert(if names.is_empty() { "*".into() } else { names });
        }
    }
    g
}

/// Strongly connected components with more than one member (Tarjan).
fn circles<N: Ord + Clone>(g: &BTreeMap<N, BTreeSet<N>>) -> Vec<Vec<N>> {
    struct T<N> {
        index: BTreeMap<N, usize>,
        low: BTreeMap<N, usize>,
        on: BTreeSet<N>,
        stack: Vec<N>,
        next: usize,
        out: Vec<Vec<N>>,
    }
    fn visit<N: Ord + Clone>(t: &mut T<N>, g: &BTreeMap<N, BTreeSet<N>>, v: &N) {
        t.index.insert(v.clone(), t.next);
        t.low.insert(v.clone(), t.next);
        t.next += 1;
        t.stack.push(v.clone());
        t.on.insert(v.clone());
        for w in g.get(v).into_iter().flatten() {
            if !t.index.contains_key(w) {
                visit(t, g, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            loop {
                let w = t.stack.pop().expect("on stack");
                t.on.remove(&w);
                comp.push(w.clone());
                if &w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        on: BTreeSet::new(),
        stack: Vec::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, g, v);
        }
    }
    t.out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn describe(
    comps: &[Vec<Vec<String>>],
    g: &BTreeMap<Vec<String>, BTreeMap<Vec<String>, BTreeSet<String>>>,
) -> String {
    let mut s = String::new();
    for c in comps {
        s.push_str(&format!(
            "circle of {}: {}\n",
            c.len(),
            c.iter()
                .map(|m| m.join("::"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
        for a in c {
            for (b, names) in g.get(a).into_iter().flatten() {
                if c.contains(b) {
                    let names: Vec<_> = names.iter().take(6).cloned().collect();
                    s.push_str(&format!(
                        "  {} -> {}: {}\n",
                        a.join("::"),
                        b.join("::"),
                        names.join(", ")
                    ));
                }
            }
        }
    }
    s
}

/// Invariant: no source file imports itself through others (no import circle among files).
#[test]
fn no_import_circle_among_source_files() {
    let g = graph(&src());
    let plain: BTreeMap<_, BTreeSet<_>> = g
        .iter()
        .map(|(a, bs)| (a.clone(), bs.keys().cloned().collect()))
        .collect();
    let found = circles(&plain);
    assert!(
        found.is_empty(),
        "import circles among files:\n{}",
        describe(&found, &g)
    );
}

/// The modules every role shares: none of them may import a role's runtime.
const SHARED: &[&str] = &["boot", "clock", "http", "limits", "ops"];
/// The roles' runtimes (and what sits above them: the dispatcher, the CLI, the demos).
const ROLES: &[&str] = &[
    "datacenter",
    "cluster",
    "roles",
    "cli",
    "demo",
    "demo_cluster",
    "demo_sip",
];

/// Invariant: the shared layers (`http`, `ops`, `boot`, `clock`, `limits`) import no role, and
/// the datacenter and the cluster roles do not import each other: no arrow runs from a shared
/// piece up to a runtime.
#[test]
fn shared_layers_import_no_role_and_roles_not_each_other() {
    let g = graph(&src());
    let mut wrong = Vec::new();
    for (a, bs) in &g {
        let ta = a.first().map(String::as_str).unwrap_or("");
        for (b, names) in bs {
            let tb = b.first().map(String::as_str).unwrap_or("");
            let up = SHARED.contains(&ta) && ROLES.contains(&tb);
            let across = matches!(
                (ta, tb),
                ("datacenter", "cluster") | ("cluster", "datacenter")
            );
            if up || across {
                wrong.push(format!(
                    "{} -> {}: {}",
                    a.join("::"),
                    b.join("::"),
                    names.iter().cloned().collect::<Vec<_>>().join(", ")
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "arrows from a shared layer up to a role, or between roles:\n{}",
        wrong.join("\n")
    );
}

/// The reader must see imports, or the two checks above could never fail: the graph of this
/// crate has hundreds of arrows, and a made-up circle is found.
#[test]
fn the_import_reader_sees_arrows_and_finds_a_planted_circle() {
    let g = graph(&src());
    let arrows: usize = g.values().map(|b| b.len()).sum();
    assert!(arrows > 200, "only {arrows} imports read");
    let dc = vec!["datacenter".to_string()];
    assert!(
        g.get(&dc)
            .is_some_and(|b| b.contains_key(&vec!["store".to_string()])),
        "datacenter -> store not seen"
    );
    let mut planted: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    planted.entry("a").or_default().insert("b");
    planted.entry("b").or_default().insert("c");
    planted.entry("c").or_default().insert("a");
    planted.entry("d").or_default().insert("a");
    assert_eq!(circles(&planted), vec![vec!["a", "b", "c"]]);
}
