//! kiln: a declarative model-definition compiler for deep learning.
//!
//! The modules follow the pipeline that a `.model` file travels through:
//! [`syntax`] parses it, [`check`] resolves names and infers shapes, and
//! [`diag`] reports what is wrong. `ARCHITECTURE.md` describes each stage.

pub mod autodiff;
pub mod check;
pub mod cli;
pub mod data;
pub mod diag;
pub mod ensemble;
pub mod fuse;
pub mod interp;
pub mod ir;
pub mod jit;
pub mod rng;
pub mod runtime;
pub mod syntax;
pub mod tune;
