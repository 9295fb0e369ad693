//! The command line: argument parsing, dispatch to one function per
//! subcommand, and exit codes (0 success, 1 invalid model, 2 usage or I/O
//! error).

mod bench;
mod check;
mod compile;
mod ensemble;
mod ensemble_item;
mod predictor;
mod train;
mod tune;

use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "A declarative model-definition compiler for deep learning"
)]
struct Cli {
    /// More log output on stderr (-v debug, -vv trace); `KILN_LOG` overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a `.model` file: names, shapes and every point of its search
    /// space. Prints a summary of each valid model.
    Check {
        /// The `.model` file.
        file: PathBuf,
        /// Output format of diagnostics and summaries.
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Train a model on data, with checkpoints, logs and callbacks.
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint: loss, accuracy and a confusion matrix.
    Eval(train::EvalArgs),
    /// Write the predicted class and probabilities of every sample.
    Predict(train::PredictArgs),
    /// Time training steps and inference of a model on random data.
    Bench(bench::BenchArgs),
    /// Sweep a model's search space: sample, train, prune, and record every
    /// trial in a study database.
    Tune(Box<tune::TuneArgs>),
    /// Show a study's trials and parameter importances, plot them, or
    /// export the best trial as a model file.
    Study(tune::StudyArgs),
    /// Pool several trained models into one predictor and report how much
    /// pooling gains.
    Ensemble(Box<ensemble::EnsembleArgs>),
    /// Compile a model at its default point and print an intermediate form.
    Compile {
        /// The `.model` file.
        file: PathBuf,
        /// The form to print: `ir`, the lowered graph (with its backward
        /// operators in training mode); `clif`, the Cranelift IR of every
        /// generated kernel; `asm`, their machine code.
        #[arg(long, value_enum, default_value_t = compile::Emit::Ir)]
        emit: compile::Emit,
        /// The model of the file to use; the first when omitted.
        #[arg(long)]
        model: Option<String>,
        /// Samples per batch, the leading axis of every shape.
        #[arg(long, default_value_t = 128)]
        batch: usize,
        /// Graph to build: a training step, evaluation, or inference.
        #[arg(long, value_enum, default_value_t = compile::GraphMode::Train)]
        mode: compile::GraphMode,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Exit statuses shared by every subcommand.
pub mod exit {
    pub const OK: u8 = 0;
    pub const INVALID_MODEL: u8 = 1;
    pub const USAGE: u8 = 2;
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version requests print to stdout and succeed.
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    init_logging(cli.verbose);
    let status = match cli.command {
        Command::Check { file, format } => check::run(&file, format),
        Command::Train(args) => train::train(*args),
        Command::Bench(args) => bench::run(args),
        Command::Tune(args) => tune::tune(*args),
        Command::Study(args) => tune::study(args),
        Command::Ensemble(args) => ensemble::run(*args),
        Command::Eval(args) => train::eval(args),
        Command::Predict(args) => train::predict(args),
        Command::Compile {
            file,
            emit,
            model,
            batch,
            mode,
        } => compile::run(&file, emit, model.as_deref(), batch, mode),
    };
    ExitCode::from(status)
}

/// The largest `.model` file kiln reads; real models are a few kilobytes.
const MAX_MODEL_BYTES: u64 = 1 << 20;

/// Reads a `.model` file as UTF-8 text, rejecting special files, files over
/// [`MAX_MODEL_BYTES`] and invalid UTF-8 with a message that gives the position.
///
/// # Errors
/// Returns the message to print.
pub fn read_model_file(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    let shown = path.display();
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if !metadata.is_file() {
        return Err(format!("cannot read `{shown}`: not a regular file"));
    }
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    let mut bytes = Vec::new();
    file.take(MAX_MODEL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read `{shown}`: {e}"))?;
    if bytes.len() as u64 > MAX_MODEL_BYTES {
        return Err(format!(
            "`{shown}` is larger than {} MiB; a model file is text of a few kilobytes",
            MAX_MODEL_BYTES >> 20
        ));
    }
    String::from_utf8(bytes).map_err(|e| {
        let valid = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line = valid.iter().filter(|b| **b == b'\n').count() + 1;
        let column = valid.iter().rev().take_while(|b| **b != b'\n').count() + 1;
        format!("`{shown}` is not valid UTF-8 text: invalid byte at {line}:{column}")
    })
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
