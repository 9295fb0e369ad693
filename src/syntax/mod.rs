//! Parsing: `.model` source text to a syntax tree ([`ast`]).
//!
//! The grammar lives in `grammar/model.pest`; [`parse`] runs it and converts
//! the parse tree into owned AST nodes with byte spans.

pub mod ast;
mod parse;

pub use parse::parse;
