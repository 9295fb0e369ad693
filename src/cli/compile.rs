//! `kiln compile FILE --emit ir`: lowers a model at its default point and
//! prints the IR.

use super::exit;
use crate::check::{check_source, CheckReport, Instance};
use crate::diag::render::{self, SourceFile};
use crate::ir::{self, Mode};
use clap::ValueEnum;
use std::path::Path;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    Ir,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphMode {
    Train,
    Eval,
    Infer,
}

pub fn run(path: &Path, _emit: Emit, model: Option<&str>, batch: usize, mode: GraphMode) -> u8 {
    let Some(instance) = load_instance(path, model) else {
        return exit::INVALID_MODEL;
    };
    match compile_text(&instance, batch, mode) {
        Ok(text) => {
            print!("{text}");
            exit::OK
        }
        Err(message) => {
            eprintln!("kiln: {message}");
            exit::INVALID_MODEL
        }
    }
}

/// Lowers (and, for training, differentiates) an instance and renders the
/// IR as text.
///
/// # Errors
/// Returns the lowering or differentiation error as text.
pub fn compile_text(instance: &Instance, batch: usize, mode: GraphMode) -> Result<String, String> {
    let loss = instance.train.loss.clone();
    let mode = match mode {
        GraphMode::Train => Mode::Train { loss },
        GraphMode::Eval => Mode::Eval { loss },
        GraphMode::Infer => Mode::Infer,
    };
    let training = matches!(mode, Mode::Train { .. });
    let mut graph = ir::lower(&instance.graph, batch, mode).map_err(|e| e.to_string())?;
    if training {
        crate::autodiff::differentiate(&mut graph).map_err(|e| e.to_string())?;
    }
    Ok(graph.to_string())
}

/// Reads and checks a model file, printing diagnostics; returns the named
/// model (or the first) at its default point when the file is valid.
pub fn load_instance(path: &Path, model: Option<&str>) -> Option<Instance> {
    let text = match super::read_model_file(path) {
        Ok(text) => text,
        Err(message) => {
            eprintln!("kiln: {message}");
            return None;
        }
    };
    let name = path.display().to_string();
    let report: CheckReport = check_source(&text);
    let file = SourceFile {
        name: &name,
        text: &text,
    };
    eprint!("{}", render::render_text(&file, &report.diagnostics));
    if report.has_errors() {
        return None;
    }
    let found = match model {
        Some(wanted) => report.models.iter().find(|m| m.name == wanted),
        None => report.models.first(),
    };
    match found.and_then(|m| m.instance.clone()) {
        Some(instance) => Some(instance),
        None => {
            let names: Vec<&str> = report.models.iter().map(|m| m.name.as_str()).collect();
            eprintln!(
                "kiln: no model `{}` in `{name}`; it declares {}",
                model.unwrap_or(""),
                names.join(", ")
            );
            None
        }
    }
}
