//! Rendering of diagnostics: rustc-style text through `codespan-reporting`,
//! and JSON records with the same content.

use super::{Diagnostic, Severity};
use codespan_reporting::diagnostic::{self as cs, LabelStyle};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, Chars, Config};
use serde::Serialize;

/// A source file as diagnostics refer to it.
pub struct SourceFile<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

/// Renders diagnostics as plain text (no colour), the way golden tests and
/// pipes see them.
pub fn render_text(file: &SourceFile, diagnostics: &[Diagnostic]) -> String {
    let mut out = term::termcolor::NoColor::new(Vec::new());
    write_text(file, diagnostics, &mut out);
    String::from_utf8_lossy(&out.into_inner()).into_owned()
}

/// Renders diagnostics to a terminal stream, coloured when it supports it.
pub fn write_text(
    file: &SourceFile,
    diagnostics: &[Diagnostic],
    out: &mut dyn term::termcolor::WriteColor,
) {
    let files = SimpleFile::new(file.name, file.text);
    let config = Config {
        chars: Chars::ascii(),
        ..Config::default()
    };
    for diagnostic in diagnostics {
        // Writing to a buffer or a terminal fails only when the stream is
        // closed, and then there is nobody left to report to.
        let _ = term::emit(out, &config, &files, &to_codespan(diagnostic));
    }
}

fn to_codespan(d: &Diagnostic) -> cs::Diagnostic<()> {
    let severity = match d.severity {
        Severity::Error => cs::Severity::Error,
        Severity::Warning => cs::Severity::Warning,
    };
    let labels = d
        .labels
        .iter()
        .map(|l| {
            let style = if l.primary {
                LabelStyle::Primary
            } else {
                LabelStyle::Secondary
            };
            cs::Label::new(style, (), l.span.clone()).with_message(&l.message)
        })
        .collect();
    let mut notes = d.notes.clone();
    if let Some(help) = &d.help {
        notes.push(format!("help: {help}"));
    }
    cs::Diagnostic::new(severity)
        .with_code(d.code)
        .with_message(&d.message)
        .with_labels(labels)
        .with_notes(notes)
}

/// One diagnostic as a JSON record.
#[derive(Serialize)]
pub struct JsonDiagnostic<'a> {
    pub severity: Severity,
    pub code: &'a str,
    pub message: &'a str,
    pub file: &'a str,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub labels: Vec<JsonLabel<'a>>,
    pub notes: &'a [String],
    pub help: Option<&'a str>,
}

#[derive(Serialize)]
pub struct JsonLabel<'a> {
    pub primary: bool,
    pub message: &'a str,
    pub start: usize,
    pub end: usize,
    pub line: usize,
    pub column: usize,
}

/// Converts diagnostics to JSON records with 1-based lines and columns.
pub fn to_json<'a>(file: &'a SourceFile, diagnostics: &'a [Diagnostic]) -> Vec<JsonDiagnostic<'a>> {
    diagnostics
        .iter()
        .map(|d| {
            let labels: Vec<JsonLabel> = d
                .labels
                .iter()
                .map(|l| {
                    let (line, column) = line_column(file.text, l.span.start);
                    JsonLabel {
                        primary: l.primary,
                        message: &l.message,
                        start: l.span.start,
                        end: l.span.end,
                        line,
                        column,
                    }
                })
                .collect();
            let primary = labels.iter().find(|l| l.primary);
            JsonDiagnostic {
                severity: d.severity,
                code: d.code,
                message: &d.message,
                file: file.name,
                line: primary.map(|l| l.line),
                column: primary.map(|l| l.column),
                notes: &d.notes,
                help: d.help.as_deref(),
                labels,
            }
        })
        .collect()
}

/// Returns the 1-based line and character column of a byte offset.
pub fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}
