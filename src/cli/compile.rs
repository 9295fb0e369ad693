//! `kiln compile FILE --emit ir|clif|asm`: lowers a model at its default
//! point and prints the IR, or compiles it and prints the Cranelift IR or
//! the machine code of every generated kernel.

use super::exit;
use crate::check::{check_source, CheckReport, Instance};
use crate::diag::render::{self, SourceFile};
use crate::ir::{self, Mode};
use crate::jit::{Listing, Program};
use clap::ValueEnum;
use std::path::Path;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Emit {
    /// kiln's graph IR.
    Ir,
    /// The Cranelift IR of each generated kernel.
    Clif,
    /// The machine code of each generated kernel, as Cranelift lists it.
    Asm,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphMode {
    Train,
    Eval,
    Infer,
}

pub fn run(path: &Path, emit: Emit, model: Option<&str>, batch: usize, mode: GraphMode) -> u8 {
    let Some(instance) = load_instance(path, model) else {
        return exit::INVALID_MODEL;
    };
    let text = match emit {
        Emit::Ir => compile_text(&instance, batch, mode),
        Emit::Clif | Emit::Asm => kernel_text(&instance, batch, mode, emit),
    };
    match text {
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

/// Compiles an instance with the JIT and renders each generated function's
/// Cranelift IR or machine code.
fn kernel_text(
    instance: &Instance,
    batch: usize,
    mode: GraphMode,
    emit: Emit,
) -> Result<String, String> {
    let loss = instance.train.loss.clone();
    let (ir_mode, optimizer) = match mode {
        GraphMode::Train => (Mode::Train { loss }, Some(&instance.train.optimizer)),
        GraphMode::Eval => (Mode::Eval { loss }, None),
        GraphMode::Infer => (Mode::Infer, None),
    };
    let training = optimizer.is_some();
    let mut graph = ir::lower(&instance.graph, batch, ir_mode).map_err(|e| e.to_string())?;
    if training {
        crate::autodiff::differentiate(&mut graph).map_err(|e| e.to_string())?;
    }
    let listing = Listing {
        clif: emit == Emit::Clif,
        asm: emit == Emit::Asm,
    };
    let program = Program::compile(&graph, optimizer, listing).map_err(|e| e.to_string())?;
    let mut out = format!(
        "; {} kernels, compiled in {:.1} ms\n",
        program.kernel_count(),
        program.compile_time.as_secs_f64() * 1e3
    );
    for (name, text) in &program.listing {
        out += &format!("\n; {name}\n{text}");
    }
    Ok(out)
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
            let models: Vec<&str> = report.models.iter().map(|m| m.name.as_str()).collect();
            let ensembles: Vec<&str> = report.ensembles.iter().map(|e| e.name.as_str()).collect();
            let message =
                super::train::missing_model(model.unwrap_or(""), &name, &models, &ensembles);
            eprintln!("kiln: {message}");
            None
        }
    }
}
