//! Checks every ```model code block of docs/language.md with kiln's checker,
//! so that the language reference cannot show a model that kiln rejects.

use kiln::check::check_source;
use kiln::diag::render::{render_text, SourceFile};

const LANGUAGE_DOC: &str = include_str!("../docs/language.md");

/// A fenced code block: the 1-based line of its opening fence and its text.
struct CodeBlock {
    line: usize,
    text: String,
}

/// Extracts the fenced code blocks whose info string is exactly `tag`.
///
/// Fences are lines that start with three backticks. As in CommonMark, a
/// closing fence has no info string, so a line such as ```model inside another
/// block is part of that block. Panics on an unclosed block.
fn code_blocks(markdown: &str, tag: &str) -> Vec<CodeBlock> {
    let mut blocks = Vec::new();
    // The open block: its opening line, whether it has `tag`, and its text.
    let mut open: Option<(usize, bool, String)> = None;
    for (index, line) in markdown.lines().enumerate() {
        let line_number = index + 1;
        let fence_info = line.strip_prefix("```").map(str::trim);
        match (&mut open, fence_info) {
            (None, Some(info)) => open = Some((line_number, info == tag, String::new())),
            (None, None) => {}
            (Some(_), Some("")) => {
                if let Some((start, true, text)) = open.take() {
                    blocks.push(CodeBlock { line: start, text });
                }
            }
            (Some((_, _, text)), _) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    if let Some((start, _, _)) = open {
        panic!("the code block that starts at line {start} is never closed");
    }
    blocks
}

#[test]
fn language_doc_models_check_without_errors() {
    let blocks = code_blocks(LANGUAGE_DOC, "model");
    assert!(
        !blocks.is_empty(),
        "docs/language.md has no ```model code blocks"
    );
    let mut failures = Vec::new();
    for block in &blocks {
        let report = check_source(&block.text);
        if report.has_errors() {
            let file = SourceFile {
                name: "docs/language.md",
                text: &block.text,
            };
            let rendered = render_text(&file, &report.diagnostics);
            failures.push(format!(
                "the ```model block at line {} of docs/language.md has errors \
                 (diagnostic lines count from the block's first line):\n{rendered}",
                block.line
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} ```model blocks failed:\n\n{}",
        failures.len(),
        blocks.len(),
        failures.join("\n")
    );
}

#[test]
fn code_blocks_keep_only_the_tag() {
    let markdown = "text\n```model\nmodel a {}\n```\n```\n```model\n```\n```model\nb\n```\n";
    let blocks = code_blocks(markdown, "model");
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].line, 2);
    assert_eq!(blocks[0].text, "model a {}\n");
    assert_eq!(blocks[1].line, 8);
    assert_eq!(blocks[1].text, "b\n");
}

#[test]
#[should_panic(expected = "never closed")]
fn code_blocks_reject_unclosed_fence() {
    code_blocks("```model\nmodel a {}\n", "model");
}
