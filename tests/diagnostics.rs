//! Golden tests of rendered diagnostics: every `tests/diagnostics/NAME.model`
//! is checked and its rendered diagnostics are compared with `NAME.stderr`
//! beside it. Run with `BLESS=1` to rewrite the expected files after an
//! intended change, then review the diff.

use kiln::check::check_source;
use kiln::diag::render::{render_text, SourceFile};
use std::fs;
use std::path::{Path, PathBuf};

fn cases() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/diagnostics");
    let mut cases: Vec<PathBuf> = fs::read_dir(&dir)
        .expect("tests/diagnostics exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "model"))
        .collect();
    cases.sort();
    cases
}

#[test]
fn diagnostics_match_golden_files() {
    let bless = std::env::var_os("BLESS").is_some();
    let mut failures = Vec::new();
    let cases = cases();
    assert!(
        cases.len() >= 25,
        "expected the full set of cases, found {}",
        cases.len()
    );
    for case in &cases {
        let text = fs::read_to_string(case).expect("readable case");
        let name = format!(
            "tests/diagnostics/{}",
            case.file_name().unwrap().to_string_lossy()
        );
        let report = check_source(&text);
        assert!(
            !report.diagnostics.is_empty(),
            "{name} produced no diagnostic; every case must show one"
        );
        let rendered = render_text(
            &SourceFile {
                name: &name,
                text: &text,
            },
            &report.diagnostics,
        );
        let golden = case.with_extension("stderr");
        if bless {
            fs::write(&golden, &rendered).expect("writable golden file");
            continue;
        }
        let expected = fs::read_to_string(&golden).unwrap_or_default();
        if expected != rendered {
            failures.push(format!(
                "--- {}\n+++ actual\n{}",
                golden.display(),
                line_diff(&expected, &rendered)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} golden file(s) differ (run with BLESS=1 to accept):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A minimal line diff: lines only in the expected text get `-`, lines only
/// in the actual text get `+`.
fn line_diff(expected: &str, actual: &str) -> String {
    let old: Vec<&str> = expected.lines().collect();
    let new: Vec<&str> = actual.lines().collect();
    let mut out = String::new();
    for line in &old {
        if !new.contains(line) {
            out.push_str(&format!("-{line}\n"));
        }
    }
    for line in &new {
        if !old.contains(line) {
            out.push_str(&format!("+{line}\n"));
        }
    }
    out
}
