//! User-facing diagnostics: what is wrong with a `.model` file, and where.
//!
//! The checker gathers diagnostics instead of stopping at the first one, so a
//! single `kiln check` run reports every independent mistake. Rendering to
//! text (rustc style) and to JSON lives in [`render`].

pub mod render;

use serde::Serialize;

/// A byte range into the source text.
pub type Span = std::ops::Range<usize>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// A span with a message. The primary label says what is wrong at that spot;
/// secondary labels point at related places, such as a value's definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Label {
    pub span: Span,
    pub message: String,
    pub primary: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub severity: Severity,
    /// A stable code such as `E0201`; `docs/language.md` lists them all.
    pub code: &'static str,
    /// One line, lowercase, no final period, identifiers in backticks.
    pub message: String,
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
    /// The suggested fix, when one is known.
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Error,
            code,
            message: message.into(),
            labels: Vec::new(),
            notes: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: &'static str, message: impl Into<String>) -> Self {
        Diagnostic {
            severity: Severity::Warning,
            ..Diagnostic::error(code, message)
        }
    }

    pub fn primary(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: message.into(),
            primary: true,
        });
        self
    }

    pub fn secondary(mut self, span: Span, message: impl Into<String>) -> Self {
        self.labels.push(Label {
            span,
            message: message.into(),
            primary: false,
        });
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.notes.push(note.into());
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The primary span, used to order diagnostics by position.
    pub fn primary_span(&self) -> Option<&Span> {
        self.labels.iter().find(|l| l.primary).map(|l| &l.span)
    }
}

/// Diagnostic codes, one per kind of mistake.
pub mod codes {
    pub const SYNTAX: &str = "E0001";
    pub const UNKNOWN_LAYER: &str = "E0101";
    pub const UNKNOWN_VALUE: &str = "E0102";
    pub const UNKNOWN_ARGUMENT: &str = "E0103";
    pub const UNKNOWN_HPARAM: &str = "E0104";
    pub const MISSING_ARGUMENT: &str = "E0105";
    pub const INVALID_ARGUMENT: &str = "E0106";
    pub const USE_BEFORE_DEFINITION: &str = "E0107";
    pub const DUPLICATE: &str = "E0108";
    pub const MISSING_DECLARATION: &str = "E0109";
    pub const UNKNOWN_MODEL: &str = "E0110";
    pub const ADD_SHAPE_MISMATCH: &str = "E0201";
    pub const CONCAT_SHAPE_MISMATCH: &str = "E0202";
    pub const WINDOW_TOO_LARGE: &str = "E0203";
    pub const ZERO_SIZE: &str = "E0204";
    pub const NOT_POSITIVE: &str = "E0205";
    pub const SHARED_LAYER_SHAPE: &str = "E0206";
    pub const WRONG_RANK: &str = "E0207";
    pub const OUTPUT_SHAPE: &str = "E0208";
    pub const BAD_RANGE: &str = "E0301";
    pub const BAD_DOMAIN: &str = "E0302";
    pub const BAD_CONDITION: &str = "E0303";
    pub const INACTIVE_HPARAM: &str = "E0304";
    pub const BAD_TRAIN_SETTING: &str = "E0401";
    pub const BAD_ENSEMBLE: &str = "E0501";
    pub const ENSEMBLE_SHAPE: &str = "E0502";
    pub const UNREACHABLE: &str = "W0001";
    pub const UNUSED_HPARAM: &str = "W0002";
    pub const OVER_BUDGET: &str = "W0003";
    pub const CHANNELS_LAST: &str = "W0004";
    pub const TOO_MANY: &str = "E0002";
}
