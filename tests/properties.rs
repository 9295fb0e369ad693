//! Property tests: the parser and checker never panic. For any input they
//! return either valid models or at least one error diagnostic, and every
//! diagnostic renders.

use kiln::check::check_source;
use kiln::diag::render::{render_text, to_json, SourceFile};
use proptest::prelude::*;

const ZOO: &[&str] = &[
    include_str!("../models/mlp.model"),
    include_str!("../models/convnet.model"),
    include_str!("../models/bn_convnet.model"),
    include_str!("../models/sepconv.model"),
    include_str!("../models/resnet.model"),
    include_str!("../models/digits.model"),
    include_str!("../models/fashion_search.model"),
];

/// Words and symbols of the language, for generating plausible token soup.
const TOKENS: &[&str] = &[
    "model",
    "block",
    "return",
    "input",
    "output",
    "layer",
    "repeat",
    "search",
    "train",
    "budget",
    "when",
    "in",
    "m",
    "x",
    "y",
    "image",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    ",",
    ";",
    ":",
    "=",
    "==",
    "|>",
    "+",
    "-",
    "*",
    "/",
    "1",
    "3",
    "0",
    "-2",
    "1e-3",
    "28",
    "conv",
    "dense",
    "relu",
    "maxpool",
    "batchnorm",
    "concat",
    "add",
    "flatten",
    "global_avgpool",
    "separable_conv",
    "depthwise_conv",
    "filters",
    "kernel",
    "units",
    "stride",
    "padding",
    "same",
    "valid",
    "int",
    "float",
    "choice",
    "log",
    "step",
    "default",
    "sgd",
    "lr",
    "optimizer",
    "callbacks",
    "\n",
    " ",
];

fn assert_total(source: &str) {
    let report = check_source(source);
    let valid = report.models.iter().all(|m| m.instance.is_some());
    assert!(
        report.has_errors() || (valid && !report.models.is_empty()),
        "neither a model nor an error for:\n{source}"
    );
    let file = SourceFile {
        name: "input.model",
        text: source,
    };
    for d in &report.diagnostics {
        for label in &d.labels {
            assert!(label.span.start <= label.span.end);
            assert!(label.span.end <= source.len());
            assert!(source.is_char_boundary(label.span.start));
            assert!(source.is_char_boundary(label.span.end));
        }
    }
    let _ = render_text(&file, &report.diagnostics);
    let _ = to_json(&file, &report.diagnostics);
}

/// Applies one edit to a zoo model: delete, duplicate or replace a span, or
/// insert a token.
fn mutate(source: &str, edits: &[(usize, usize, usize, usize)]) -> String {
    let mut text: Vec<char> = source.chars().collect();
    for &(kind, at, len, token) in edits {
        if text.is_empty() {
            break;
        }
        let at = at % text.len();
        let end = (at + len % 12).min(text.len());
        match kind % 4 {
            0 => {
                text.drain(at..end);
            }
            1 => {
                let copy: Vec<char> = text[at..end].to_vec();
                text.splice(at..at, copy);
            }
            2 => {
                let token: Vec<char> = TOKENS[token % TOKENS.len()].chars().collect();
                text.splice(at..end, token);
            }
            _ => {
                let token: Vec<char> = TOKENS[token % TOKENS.len()].chars().collect();
                text.splice(at..at, token);
            }
        }
    }
    text.into_iter().collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn arbitrary_text_never_panics(source in "\\PC{0,200}") {
        assert_total(&source);
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(0..TOKENS.len(), 0..80)) {
        let source: Vec<&str> = tokens.iter().map(|&i| TOKENS[i]).collect();
        assert_total(&source.join(" "));
    }

    #[test]
    fn mutated_zoo_models_never_panic(
        model in 0..ZOO.len(),
        edits in prop::collection::vec((0usize..4, any::<usize>(), any::<usize>(), any::<usize>()), 1..6),
    ) {
        assert_total(&mutate(ZOO[model], &edits));
    }
}
