//! Syntax tree of a `.model` file.
//!
//! Spans are byte ranges into the source, so the tree has no lifetime and
//! can outlive the text it was parsed from.

use crate::diag::Span;

/// A whole `.model` file: its models, its top-level blocks and its
/// ensembles.
#[derive(Debug, Clone, Default)]
pub struct File {
    pub models: Vec<Model>,
    pub blocks: Vec<Block>,
    pub ensembles: Vec<Ensemble>,
}

/// A name together with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub name: Ident,
    pub body: Vec<Stmt>,
    pub span: Span,
}

/// `ensemble NAME { settings }`: models of the file pooled into one
/// predictor. The checker gives the settings their meaning.
#[derive(Debug, Clone)]
pub struct Ensemble {
    pub name: Ident,
    pub settings: Vec<Setting>,
    pub span: Span,
}

/// A reusable sub-network. Every call instantiates it with fresh weights.
#[derive(Debug, Clone)]
pub struct Block {
    pub name: Ident,
    /// Tensor inputs, bound positionally at the call.
    pub inputs: Vec<Ident>,
    /// Settings, bound by keyword at the call; `None` means required.
    pub params: Vec<(Ident, Option<Expr>)>,
    pub body: Vec<Stmt>,
    pub result: Expr,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub enum Stmt {
    Input {
        name: Ident,
        shape: Vec<Expr>,
        span: Span,
    },
    Output {
        name: Ident,
        shape: Option<Vec<Expr>>,
        span: Span,
    },
    Assign {
        name: Ident,
        value: Expr,
    },
    /// `layer NAME = call`: one set of weights shared by every use.
    Layer {
        name: Ident,
        call: Call,
    },
    Repeat {
        count: Expr,
        body: Vec<Stmt>,
        span: Span,
    },
    Block(Block),
    Search {
        entries: Vec<SearchEntry>,
        span: Span,
    },
    Train {
        settings: Vec<Setting>,
        span: Span,
    },
    Budget {
        settings: Vec<Setting>,
        span: Span,
    },
}

/// One hyperparameter of a `search` section.
#[derive(Debug, Clone)]
pub struct SearchEntry {
    pub name: Ident,
    pub domain: Call,
    pub condition: Option<Condition>,
}

/// `when NAME == value` or `when NAME in [values]`.
#[derive(Debug, Clone)]
pub struct Condition {
    pub param: Ident,
    pub values: Vec<Expr>,
    pub span: Span,
}

/// `key = value` in a `train` or `budget` section or an ensemble.
#[derive(Debug, Clone)]
pub struct Setting {
    pub key: Ident,
    pub value: Expr,
}

#[derive(Debug, Clone)]
pub struct Call {
    pub callee: Ident,
    pub args: Vec<Arg>,
    pub span: Span,
}

#[derive(Debug, Clone)]
pub struct Arg {
    /// `None` for a positional argument.
    pub keyword: Option<Ident>,
    pub value: Expr,
}

impl Call {
    pub fn positional(&self) -> impl Iterator<Item = &Expr> {
        self.args
            .iter()
            .filter(|a| a.keyword.is_none())
            .map(|a| &a.value)
    }

    pub fn keywords(&self) -> impl Iterator<Item = (&Ident, &Expr)> {
        self.args
            .iter()
            .filter_map(|a| a.keyword.as_ref().map(|k| (k, &a.value)))
    }
}

#[derive(Debug, Clone)]
pub struct Expr {
    pub kind: ExprKind,
    pub span: Span,
    /// Nesting depth, 1 for a leaf. The parser rejects expressions deeper
    /// than [`MAX_DEPTH`], so recursive passes over the tree stay shallow.
    pub depth: usize,
}

/// The deepest expression the parser accepts. Pipelines, operator chains and
/// brackets each add a level; real models stay below 50.
pub const MAX_DEPTH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinOp {
    Add,
    Sub,
    Mul,
    Div,
}

impl BinOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinOp::Add => "+",
            BinOp::Sub => "-",
            BinOp::Mul => "*",
            BinOp::Div => "/",
        }
    }
}

#[derive(Debug, Clone)]
pub enum ExprKind {
    /// A numeric literal; `integer` is false when it had a `.` or an exponent.
    Number {
        value: f64,
        integer: bool,
    },
    Str(String),
    Name(String),
    Call(Call),
    List(Vec<Expr>),
    Neg(Box<Expr>),
    Binary(BinOp, Box<Expr>, Box<Expr>),
}
