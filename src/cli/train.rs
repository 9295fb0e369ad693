//! `kiln train`, `kiln eval` and `kiln predict`.

use super::exit;
use super::predictor::Predictor;
use crate::check::space::Point;
use crate::check::train::Optimizer;
use crate::check::value::Value;
use crate::check::{CheckReport, Instance, Program};
use crate::data::{self, Dataset, LabelColumn};
use crate::diag::render::{self, SourceFile};
use crate::runtime::checkpoint::{self, Checkpoint, Metadata};
use crate::runtime::engine::{default_threads, Engine, ExecutorKind};
use crate::runtime::evaluate::evaluate;
use crate::runtime::{self, Output, TrainError, TrainSetup};
use clap::Args;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Exit status after Ctrl-C, as shells report a process killed by SIGINT.
pub(crate) const INTERRUPTED: u8 = 130;

#[derive(Args)]
pub struct TrainArgs {
    /// The `.model` file.
    pub file: PathBuf,
    /// Training data: an IDX, CSV, `.npy` or `.npz` file (optionally gzip),
    /// or a folder of IDX files.
    #[arg(long)]
    pub data: PathBuf,
    /// Test data, evaluated after every epoch (a folder's `t10k-*` files
    /// are used when this is omitted).
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// The model or ensemble of the file to train; the first model, or an
    /// ensemble that comes before every model, when omitted.
    #[arg(long)]
    pub model: Option<String>,
    /// Set a hyperparameter, as `--set width=32`; repeatable.
    #[arg(long = "set", value_name = "NAME=VALUE")]
    pub set: Vec<String>,
    /// Epochs, overriding the `train` section.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Samples per batch, overriding the `train` section.
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Learning rate, overriding the optimizer's.
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Random seed, overriding the `train` section.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Train on the first N samples of the training data only.
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// Fraction of the training data held out for validation (default 0.1,
    /// or the resumed checkpoint's).
    #[arg(long, allow_negative_numbers = true)]
    pub val_split: Option<f64>,
    /// CSV label column: a 0-based index or a header name (default: a
    /// column named label, class, target or y, else the last).
    #[arg(long)]
    pub label_column: Option<String>,
    /// Folder for `best.safetensors` and `last.safetensors`.
    #[arg(long, default_value = "checkpoints")]
    pub checkpoint_dir: PathBuf,
    /// Write TensorBoard event files to this folder.
    #[arg(long)]
    pub logdir: Option<PathBuf>,
    /// Also log the training loss every this many steps.
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
    /// Continue from a checkpoint written by an earlier run.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[command(flatten)]
    pub exec: ExecArgs,
    /// Also run the first N training steps (3 when N is omitted) on the
    /// reference executor, and report the largest difference per tensor.
    #[arg(long, num_args = 0..=1, require_equals = true, default_missing_value = "3", value_name = "N")]
    pub verify: Option<usize>,
    /// Print nothing but errors.
    #[arg(long)]
    pub quiet: bool,
    /// Print one JSON record per epoch and a summary record.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ExecutorArg {
    /// Kernels compiled with Cranelift, with wide-vector matrix products.
    Jit,
    /// The reference executor: plain ndarray code, the definition of every
    /// operator, and much slower.
    Reference,
}

/// How kernels run; shared by every command that runs a model.
#[derive(Args, Clone, Copy)]
pub struct ExecArgs {
    /// The executor that runs the kernels.
    #[arg(long, value_enum, default_value_t = ExecutorArg::Jit)]
    pub executor: ExecutorArg,
    /// Worker threads (default: one per core). Results are bit-identical
    /// for the same thread count.
    #[arg(long)]
    pub threads: Option<usize>,
}

impl ExecArgs {
    pub fn kind(&self) -> ExecutorKind {
        match self.executor {
            ExecutorArg::Jit => ExecutorKind::Jit,
            ExecutorArg::Reference => ExecutorKind::Reference,
        }
    }

    /// An engine for `graph` configured by these options.
    ///
    /// # Errors
    /// When the worker threads cannot be started.
    pub fn engine(
        &self,
        graph: crate::check::graph::Graph,
        loss: crate::check::train::Loss,
    ) -> Result<Engine, (u8, String)> {
        Engine::new(graph, loss)
            .with_executor(self.kind())
            .with_threads(self.threads.unwrap_or_else(default_threads))
            .map_err(|e| (exit::USAGE, e.to_string()))
    }
}

#[derive(Args)]
pub struct EvalArgs {
    /// A checkpoint written by `kiln train`.
    pub checkpoint: PathBuf,
    /// Data to evaluate on (a folder's test split when it has one).
    #[arg(long)]
    pub data: PathBuf,
    /// CSV label column: a 0-based index or a header name (default: a
    /// column named label, class, target or y, else the last).
    #[arg(long)]
    pub label_column: Option<String>,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

#[derive(Args)]
pub struct PredictArgs {
    /// A checkpoint written by `kiln train`.
    pub checkpoint: PathBuf,
    /// Samples to classify; a label column, if present, is ignored.
    #[arg(long)]
    pub data: PathBuf,
    /// The CSV file to write: row, class, then one probability per class.
    #[arg(long)]
    pub out: PathBuf,
    /// CSV label column to skip: a 0-based index or a header name.
    #[arg(long)]
    pub label_column: Option<String>,
    #[command(flatten)]
    pub exec: ExecArgs,
}

/// Installs the Ctrl-C handler of a long run and returns its flag: the
/// first Ctrl-C sets the flag, on which the run checkpoints and stops, and
/// a second one exits at once with status 130.
pub(crate) fn interrupt_flag() -> Arc<AtomicBool> {
    let interrupt = Arc::new(AtomicBool::new(false));
    let flag = interrupt.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(INTERRUPTED as i32);
        }
    });
    interrupt
}

/// The test data: `--test-data` when given, else the split that `--data`
/// brought (a folder's `t10k-*` files).
pub(crate) fn test_split(
    test_data: Option<&Path>,
    loaded_test: Option<Dataset>,
    label: &Option<String>,
) -> Result<Option<Dataset>, (u8, String)> {
    match test_data {
        Some(path) => data::load(path, &label_column(label))
            .map(|loaded| Some(loaded.train))
            .map_err(|e| (exit::USAGE, e.to_string())),
        None => Ok(loaded_test),
    }
}

pub(crate) fn label_column(arg: &Option<String>) -> LabelColumn {
    match arg {
        None => LabelColumn::Auto,
        Some(text) => match text.parse() {
            Ok(i) => LabelColumn::Index(i),
            Err(_) => LabelColumn::Name(text.clone()),
        },
    }
}

/// Parses `--set` text: an integer, a number, or a word.
fn parse_value(text: &str) -> Value {
    if let Ok(i) = text.parse::<i64>() {
        return Value::Int(i);
    }
    if let Ok(f) = text.parse::<f64>() {
        return Value::Float(f);
    }
    match text {
        "true" => Value::Bool(true),
        "false" => Value::Bool(false),
        _ => Value::Word(text.to_string()),
    }
}

/// Hyperparameter names and values, as source text.
type Assignments = Vec<(String, String)>;

/// Checks a model file and instantiates one of its models at the point the
/// assignments select; prints diagnostics on failure.
pub(crate) fn instantiate(
    source: &str,
    file_name: &str,
    model: Option<&str>,
    assignments: &[(String, String)],
) -> Result<(String, Instance, Assignments), String> {
    let (program, _) = check_file(source, file_name)?;
    let ast = match model {
        Some(name) => program.model(name),
        None => program.file.models.first(),
    }
    .ok_or_else(|| {
        let (models, ensembles) = item_names(&program.file);
        missing_model(model.unwrap_or(""), file_name, &models, &ensembles)
    })?;
    let (instance, point) = instantiate_model(&program, ast, source, file_name, assignments)?;
    Ok((ast.name.name.clone(), instance, point))
}

/// Checks a model file, printing its diagnostics, and returns it parsed
/// with the check's report.
pub(crate) fn check_file(source: &str, file_name: &str) -> Result<(Program, CheckReport), String> {
    let file = SourceFile {
        name: file_name,
        text: source,
    };
    let report = crate::check::check_source(source);
    eprint!("{}", render::render_text(&file, &report.diagnostics));
    if report.has_errors() {
        return Err(format!("`{file_name}` is not a valid model"));
    }
    let program = Program::parse(source).map_err(|d| d.message)?;
    Ok((program, report))
}

/// Instantiates a model of a checked file at the point the assignments
/// select, completed with defaults; prints diagnostics on failure.
pub(crate) fn instantiate_model(
    program: &Program,
    ast: &crate::syntax::ast::Model,
    source: &str,
    file_name: &str,
    assignments: &[(String, String)],
) -> Result<(Instance, Assignments), String> {
    let (space, _) = program.space(ast);
    let mut partial = Point::default();
    for (name, text) in assignments {
        let hparam = space.get(name).ok_or_else(|| {
            let names: Vec<&str> = space.params.iter().map(|p| p.name.as_str()).collect();
            let hint = match crate::check::args::suggest(name, names.iter().copied()) {
                Some(close) => format!("; did you mean `{close}`?"),
                None if names.is_empty() => "; it declares none".to_string(),
                None => format!("; it declares {}", names.join(", ")),
            };
            format!("`--set {name}`: the model has no hyperparameter `{name}`{hint}")
        })?;
        let value = parse_value(text);
        if !hparam.domain.contains(&value) {
            return Err(format!(
                "`--set {name}={text}`: {text} is outside {}",
                hparam.domain
            ));
        }
        partial.set(name, value);
    }
    let point = space.complete(partial);
    let instance = program.instantiate(ast, &space, &point).map_err(|errors| {
        let file = SourceFile {
            name: file_name,
            text: source,
        };
        eprint!("{}", render::render_text(&file, &errors));
        format!("the model is invalid at {point}")
    })?;
    let point_text = point
        .0
        .iter()
        .map(|(n, v)| (n.clone(), v.to_string()))
        .collect();
    Ok((instance, point_text))
}

fn with_lr(optimizer: &Optimizer, lr: f64) -> Optimizer {
    let mut optimizer = optimizer.clone();
    match &mut optimizer {
        Optimizer::Sgd { lr: l, .. }
        | Optimizer::Adam { lr: l, .. }
        | Optimizer::AdamW { lr: l, .. }
        | Optimizer::RmsProp { lr: l, .. } => *l = lr,
    }
    optimizer
}

fn split_assignment(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .ok_or_else(|| format!("`--set {text}`: expected NAME=VALUE"))
}

pub fn train(args: TrainArgs) -> u8 {
    match run_train(args) {
        Ok(status) => status,
        Err((status, message)) => {
            eprintln!("kiln: {message}");
            status
        }
    }
}

/// Rejects a resume whose model file is not the one the checkpoint was
/// trained from: the run would go on training the checkpoint's model and
/// ignore the file named on the command line.
fn check_resumed_source(file: &Path, checkpoint: &Path, meta: &Metadata) -> Result<(), String> {
    let source = super::read_model_file(file)?;
    if checkpoint::sha256_hex(&source) == meta.source_sha256 {
        return Ok(());
    }
    Err(format!(
        "`{}` was trained from a different model file than `{}` (its model is `{}`); \
         pass the file it was trained from to resume it, or drop --resume to start a new run",
        checkpoint.display(),
        file.display(),
        meta.model
    ))
}

/// Warns when a resumed run changes which samples it trains and
/// validates on.
fn warn_changed_split(args: &TrainArgs, meta: &Metadata) {
    if let Some(split) = args.val_split.filter(|s| *s != meta.val_split) {
        eprintln!(
            "warning: --val-split {split} differs from the checkpoint's {}; the validation set changes mid-run",
            meta.val_split
        );
    }
    if args.limit.is_some() && args.limit != meta.limit {
        let before = meta.limit.map_or("no limit".to_string(), |l| l.to_string());
        eprintln!(
            "warning: --limit {} differs from the checkpoint's ({before}); the training set changes mid-run",
            args.limit.unwrap_or_default()
        );
    }
}

fn run_train(args: TrainArgs) -> Result<u8, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    // Installed first, so that a Ctrl-C while the data loads also stops the
    // run cleanly. The first Ctrl-C sets a flag on which the loop checkpoints and stops, and a
    // second one exits at once.
    let interrupt = interrupt_flag();
    if args.exec.threads == Some(0) {
        return Err(usage("--threads must be at least 1".into()));
    }
    validate_numbers(&args).map_err(usage)?;
    prepare_checkpoint_dir(&args.checkpoint_dir).map_err(usage)?;
    reject_ensemble_resume(&args).map_err(usage)?;
    let resume = match &args.resume {
        Some(path) => Some((
            Checkpoint::load(path).map_err(|e| usage(e.to_string()))?,
            path.clone(),
        )),
        None => None,
    };
    let (source, assignments) = match &resume {
        // A resumed run trains the checkpoint's own model and point.
        Some((checkpoint, path)) => {
            check_resumed_source(&args.file, path, &checkpoint.meta).map_err(usage)?;
            warn_changed_split(&args, &checkpoint.meta);
            if !args.set.is_empty() || args.lr.is_some() || args.model.is_some() {
                eprintln!("warning: --resume continues the checkpoint's own model, hyperparameters and learning rate; --set, --lr and --model are ignored");
            }
            (
                checkpoint.meta.source.clone(),
                checkpoint.meta.point.clone(),
            )
        }
        None => {
            let source = super::read_model_file(&args.file).map_err(usage)?;
            let assignments = args
                .set
                .iter()
                .map(|s| split_assignment(s))
                .collect::<Result<_, _>>()
                .map_err(usage)?;
            (source, assignments)
        }
    };
    let name = args.file.display().to_string();
    if resume.is_none() && names_ensemble(&source, args.model.as_deref()) {
        return super::ensemble_item::train(&args, &source, interrupt);
    }
    let (model_name, mut instance, point) =
        instantiate(&source, &name, args.model.as_deref(), &assignments)
            .map_err(|m| (exit::INVALID_MODEL, m))?;
    apply_overrides(&mut instance, &args, resume.as_ref().map(|(c, _)| &c.meta));

    let mut loaded = data::load(&args.data, &label_column(&args.label_column))
        .map_err(|e| usage(e.to_string()))?;
    let resumed = resume.as_ref().map(|(c, _)| &c.meta);
    let limit = args.limit.or(resumed.and_then(|m| m.limit));
    let val_split = args
        .val_split
        .or(resumed.map(|m| m.val_split))
        .unwrap_or(0.1);
    loaded.train.truncate(limit);
    let test = test_split(args.test_data.as_deref(), loaded.test, &args.label_column)?;
    let output = if args.json {
        Output::Json
    } else if args.quiet {
        Output::Quiet
    } else if std::io::stdout().is_terminal() {
        Output::Bar
    } else {
        Output::Lines
    };
    let setup = TrainSetup {
        model_name,
        source,
        point,
        instance,
        train: loaded.train,
        test,
        val_split,
        limit,
        checkpoint_dir: args.checkpoint_dir.clone(),
        logdir: args.logdir.clone(),
        log_every: args.log_every,
        output,
        resume,
        interrupt,
        executor: args.exec.kind(),
        threads: args.exec.threads.unwrap_or_else(default_threads),
        verify: args.verify.unwrap_or(0),
        on_epoch: None,
        on_log_error: None,
        split_seed: None,
        bootstrap: false,
        keep_best: false,
    };
    let summary = runtime::train(setup).map_err(train_error)?;
    print_summary(&summary, output, &args.checkpoint_dir);
    Ok(if summary.interrupted {
        INTERRUPTED
    } else {
        exit::OK
    })
}

/// Rejects `--resume` when `--model` (or the file's first item) selects an
/// ensemble, before the checkpoint is read, because a resumed run trains
/// the checkpoint's own single model.
fn reject_ensemble_resume(args: &TrainArgs) -> Result<(), String> {
    if args.resume.is_none() {
        return Ok(());
    }
    // An unreadable file is no ensemble here; a resumed run takes its model
    // from the checkpoint and does not need the file.
    match super::read_model_file(&args.file) {
        Ok(source) if names_ensemble(&source, args.model.as_deref()) => {
            super::ensemble_item::reject_model_options(args)
        }
        _ => Ok(()),
    }
}

/// Returns whether `--model` (or, without it, the file's first item)
/// selects an ensemble item. A file that does not parse selects none, so
/// that the model path reports its syntax error.
fn names_ensemble(source: &str, model: Option<&str>) -> bool {
    let Ok(program) = Program::parse(source) else {
        return false;
    };
    match model {
        Some(name) => program.ensemble(name).is_some(),
        None => program.first_item_ensemble().is_some(),
    }
}

/// Returns the exit status and message of a failed run. A diverged run
/// means an unusable model, and anything else a data or I/O problem.
pub(crate) fn train_error(e: TrainError) -> (u8, String) {
    match e {
        TrainError::Diverged { .. } => (exit::INVALID_MODEL, e.to_string()),
        _ => (exit::USAGE, e.to_string()),
    }
}

fn validate_numbers(args: &TrainArgs) -> Result<(), String> {
    if let Some(split) = args.val_split {
        if !(0.0..1.0).contains(&split) {
            return Err(format!(
                "--val-split must be at least 0 and below 1, found {split}"
            ));
        }
    }
    if let Some(lr) = args.lr {
        if !(lr > 0.0 && lr.is_finite()) {
            return Err(format!("--lr must be a positive number, found {lr}"));
        }
    }
    if args.epochs == Some(0) {
        return Err("--epochs must be at least 1".into());
    }
    if args.batch_size == Some(0) {
        return Err("--batch-size must be at least 1".into());
    }
    if args.limit == Some(0) {
        return Err("--limit must be at least 1".into());
    }
    Ok(())
}

/// Creates the checkpoint folder and checks that files can be written in
/// it, so that a run never trains for an hour and then loses its weights.
fn prepare_checkpoint_dir(dir: &Path) -> Result<(), String> {
    let fail = |e: std::io::Error| {
        format!(
            "cannot write checkpoints to `{}`: {e}; pass a writable folder with --checkpoint-dir",
            dir.display()
        )
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    let probe = dir.join(format!(".kiln-write-test.{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub(crate) fn apply_overrides(
    instance: &mut Instance,
    args: &TrainArgs,
    resumed: Option<&Metadata>,
) {
    let config = &mut instance.train;
    if let Some(meta) = resumed {
        config.epochs = meta.epochs;
        config.batch_size = meta.batch_size;
        config.seed = meta.seed;
    }
    if let Some(epochs) = args.epochs {
        config.epochs = epochs.max(1);
    }
    if let Some(batch) = args.batch_size {
        config.batch_size = batch.max(1);
    }
    if let Some(seed) = args.seed {
        config.seed = seed;
    }
    if let Some(lr) = args.lr.filter(|lr| *lr > 0.0 && lr.is_finite()) {
        config.optimizer = with_lr(&config.optimizer, lr);
    }
}

fn print_summary(summary: &runtime::Summary, output: Output, dir: &Path) {
    let last = summary.history.last();
    match output {
        Output::Quiet => {}
        Output::Json => {
            let value = serde_json::json!({
                "event": "summary",
                "epochs": summary.history.len(),
                "monitor": summary.monitor.name(),
                "best": summary.best.map(|(v, e)| serde_json::json!({"value": v, "epoch": e})),
                "final": last,
                "seconds": summary.seconds,
                "checkpoint": summary.checkpoint,
                "interrupted": summary.interrupted,
                "stopped_early": summary.stopped_early,
            });
            println!("{value}");
        }
        Output::Bar | Output::Lines => {
            if summary.interrupted {
                println!(
                    "interrupted; resume with --resume {}",
                    dir.join("last.safetensors").display()
                );
                return;
            }
            if summary.stopped_early {
                println!("stopped early: the early_stopping callback's monitor did not improve");
            }
            if let Some((value, epoch)) = summary.best {
                let shown = if summary.monitor.maximize() {
                    format!("{:.2}%", 100.0 * value)
                } else {
                    format!("{value:.4}")
                };
                println!("best {} {shown} at epoch {epoch}", summary.monitor.name());
            }
            // These are the last epoch's figures, measured before early
            // stopping may have restored an earlier epoch's weights.
            if let Some(r) = last {
                let at = format!("last epoch ({})", r.epoch);
                if let (Some(loss), Some(acc)) = (r.val_loss, r.val_accuracy) {
                    println!("{at} val_loss {loss:.4}  val_accuracy {:.2}%", 100.0 * acc);
                }
                if let (Some(loss), Some(acc)) = (r.test_loss, r.test_accuracy) {
                    println!(
                        "{at} test_loss {loss:.4}  test_accuracy {:.2}%",
                        100.0 * acc
                    );
                }
            }
            let epochs = summary.history.len();
            let plural = if epochs == 1 { "" } else { "s" };
            let saved = match &summary.best_write_error {
                Some(_) => {
                    "the best checkpoint could not be written (see the warning above)".to_string()
                }
                None => format!("checkpoint {}", summary.checkpoint.display()),
            };
            println!("{epochs} epoch{plural} in {:.1}s; {saved}", summary.seconds);
        }
    }
}

/// A checkpoint with its model instantiated, its normalisation applied to
/// `data`.
/// A trained model read back from a checkpoint.
pub(crate) struct Restored {
    pub instance: Instance,
    pub meta: Metadata,
    pub weights: crate::interp::Weights,
}

pub(crate) fn restore(path: &Path) -> Result<Restored, (u8, String)> {
    let checkpoint = Checkpoint::load(path).map_err(|e| (exit::USAGE, e.to_string()))?;
    restore_checkpoint(checkpoint, &path.display().to_string())
}

/// Re-checks a checkpoint's model at its point and takes its weights;
/// `origin` names the checkpoint in messages.
pub(crate) fn restore_checkpoint(
    checkpoint: Checkpoint,
    origin: &str,
) -> Result<Restored, (u8, String)> {
    let meta = checkpoint.meta.clone();
    // Checked here, because the message of `instantiate` would name the
    // model inside its own file name.
    if Program::parse(&meta.source).is_ok_and(|p| p.model(&meta.model).is_none()) {
        return Err((
            exit::INVALID_MODEL,
            format!(
                "{origin} names the model `{}`, but the model source stored with it defines no model of that name",
                meta.model
            ),
        ));
    }
    let name = format!("{} (in {origin})", meta.model);
    let (_, instance, _) = instantiate(&meta.source, &name, Some(&meta.model), &meta.point)
        .map_err(|m| (exit::INVALID_MODEL, m))?;
    let graph = crate::ir::lower(&instance.graph, 1, crate::ir::Mode::Infer)
        .map_err(|e| (exit::INVALID_MODEL, e.to_string()))?;
    let weights = checkpoint
        .weights(&graph, Path::new(origin))
        .map_err(|e| (exit::USAGE, e.to_string()))?;
    Ok(Restored {
        instance,
        meta,
        weights,
    })
}

fn prepare(mut data: Dataset, meta: &Metadata) -> Result<Dataset, (u8, String)> {
    data.check_fits(&meta.input_shape, meta.classes)
        .map_err(|e| (exit::USAGE, e.to_string()))?;
    meta.normalization.apply(&mut data);
    Ok(data)
}

pub fn eval(args: EvalArgs) -> u8 {
    if crate::ensemble::file::is_ensemble(&args.checkpoint) {
        return eval_ensemble(&args).unwrap_or_else(|(status, message)| {
            eprintln!("kiln: {message}");
            status
        });
    }
    let result = (|| {
        let restored = super::predictor::restore_or_explain(
            &args.checkpoint,
            "train it with `kiln train` and evaluate the checkpoint that writes",
        )?;
        let loaded = data::load(&args.data, &label_column(&args.label_column))
            .map_err(|e| (exit::USAGE, e.to_string()))?;
        let (split, data) = match loaded.test {
            Some(test) => ("test split", test),
            None => ("data", loaded.train),
        };
        let data = prepare(data, &restored.meta)?;
        let mut engine = args.exec.engine(
            restored.instance.graph.clone(),
            restored.instance.train.loss.clone(),
        )?;
        let metrics = evaluate(
            &mut engine,
            &restored.weights,
            &data,
            &restored.meta.input_shape,
            restored.meta.classes,
            &restored.instance.train.loss,
            restored.meta.batch_size.max(1),
        )
        .map_err(|e| (exit::USAGE, e.to_string()))?;
        if args.json {
            let value = serde_json::json!({
                "samples": metrics.samples,
                "loss": metrics.loss(),
                "accuracy": metrics.accuracy(),
                "top5_accuracy": metrics.top5(),
                "confusion": metrics.confusion,
            });
            println!("{value}");
            return Ok(exit::OK);
        }
        println!(
            "{} samples ({split} of {})",
            metrics.samples,
            args.data.display()
        );
        print_metrics(&metrics);
        Ok(exit::OK)
    })();
    result.unwrap_or_else(|(status, message)| {
        eprintln!("kiln: {message}");
        status
    })
}

/// `kiln eval` of an ensemble file: the pooled predictions' loss (mean
/// cross-entropy of the pooled probabilities), accuracy and confusion
/// matrix.
fn eval_ensemble(args: &EvalArgs) -> Result<u8, (u8, String)> {
    let mut predictor = Predictor::open(&args.checkpoint, &args.exec)?;
    let loaded = data::load(&args.data, &label_column(&args.label_column))
        .map_err(|e| (exit::USAGE, e.to_string()))?;
    let (split, data) = match loaded.test {
        Some(test) => ("test split", test),
        None => ("data", loaded.train),
    };
    let (probabilities, _) = predictor.predict(&data)?;
    let loss = crate::ensemble::log_loss(&probabilities, &data.labels);
    let mut metrics = crate::runtime::evaluate::Metrics::new(predictor.classes());
    let scores = probabilities.mapv(|p| p.max(1e-7).ln()).into_dyn();
    metrics.add(&scores, &data.labels, loss);
    if args.json {
        let value = serde_json::json!({
            "samples": metrics.samples,
            "members": predictor.members.len(),
            "loss": metrics.loss(),
            "accuracy": metrics.accuracy(),
            "top5_accuracy": metrics.top5(),
            "confusion": metrics.confusion,
        });
        println!("{value}");
        return Ok(exit::OK);
    }
    println!(
        "{} samples ({split} of {}), ensemble of {} members",
        metrics.samples,
        args.data.display(),
        predictor.members.len()
    );
    print_metrics(&metrics);
    Ok(exit::OK)
}

/// Prints `kiln eval`'s loss, accuracy, top-5 accuracy and confusion matrix.
fn print_metrics(metrics: &crate::runtime::evaluate::Metrics) {
    println!("loss      {:.4}", metrics.loss());
    println!("accuracy  {:.2}%", 100.0 * metrics.accuracy());
    if let Some(top5) = metrics.top5() {
        println!("top-5     {:.2}%", 100.0 * top5);
    }
    println!("confusion matrix (rows: true class, columns: predicted)");
    print!("{}", confusion_table(&metrics.confusion));
}

fn confusion_table(confusion: &[Vec<usize>]) -> String {
    let width = confusion
        .iter()
        .flatten()
        .max()
        .map_or(1, |m| m.to_string().len())
        .max(3);
    let mut out = format!("{:>4}", "");
    for c in 0..confusion.len() {
        out += &format!(" {c:>width$}");
    }
    out.push('\n');
    for (t, row) in confusion.iter().enumerate() {
        out += &format!("{t:>4}");
        for count in row {
            out += &format!(" {count:>width$}");
        }
        out.push('\n');
    }
    out
}

pub fn predict(args: PredictArgs) -> u8 {
    let result = (|| {
        let mut predictor = Predictor::open(&args.checkpoint, &args.exec)?;
        let needed: usize = predictor.input_shape().iter().product();
        let column = label_column(&args.label_column);
        let mut data = match data::load(&args.data, &column) {
            Ok(loaded) if loaded.train.features == needed => loaded.train,
            // The file has no labels: a CSV file without a label column, or
            // NumPy arrays of features only.
            // When both readings fail, the unlabeled one's error is the
            // relevant one: prediction needs no labels.
            _ => data::load_unlabeled(&args.data).map_err(|e| (exit::USAGE, e.to_string()))?,
        };
        if data.features != needed {
            return Err((
                exit::USAGE,
                format!(
                    "{} has {} values per sample, but the model's input {:?} needs {needed}",
                    data.source,
                    data.features,
                    predictor.input_shape()
                ),
            ));
        }
        data.labels.iter_mut().for_each(|l| *l = 0);
        let (probabilities, classes) = predictor.predict(&data)?;
        let mut out = String::from("row,class");
        for c in 0..predictor.classes() {
            out += &format!(",p{c}");
        }
        out.push('\n');
        for (row, (p, class)) in probabilities.outer_iter().zip(&classes).enumerate() {
            out += &format!("{row},{class}");
            for v in p {
                out += &format!(",{v:.6}");
            }
            out.push('\n');
        }
        let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        };
        if same(&args.out, &args.checkpoint) || same(&args.out, &args.data) {
            return Err((
                exit::USAGE,
                format!(
                    "--out `{}` is one of the input files; choose another path",
                    args.out.display()
                ),
            ));
        }
        crate::runtime::checkpoint::write_atomic(&args.out, out.as_bytes(), |f, d| {
            std::io::Write::write_all(f, d)
        })
        .map_err(|e| match e {
            crate::runtime::checkpoint::CheckpointError::Write { source, .. } => (
                exit::USAGE,
                format!(
                    "cannot write predictions to `{}`: {source}",
                    args.out.display()
                ),
            ),
            other => (exit::USAGE, other.to_string()),
        })?;
        eprintln!("wrote {} predictions to {}", data.len(), args.out.display());
        Ok(exit::OK)
    })();
    result.unwrap_or_else(|(status, message)| {
        eprintln!("kiln: {message}");
        status
    })
}

/// Builds the error for a `--model NAME` that names no model of the file.
/// It points out when NAME is an ensemble, and lists the file's models.
pub(crate) fn missing_model(
    name: &str,
    file_name: &str,
    models: &[&str],
    ensembles: &[&str],
) -> String {
    let listed = if models.is_empty() {
        "it declares no model".to_string()
    } else {
        let quoted: Vec<String> = models.iter().map(|m| format!("`{m}`")).collect();
        format!("its models are {}", quoted.join(", "))
    };
    if ensembles.contains(&name) {
        return format!(
            "`{name}` in `{file_name}` is an ensemble, and this command needs a model; {listed}"
        );
    }
    format!("no model `{name}` in `{file_name}`; {listed}")
}

/// Returns the names of a parsed file's models and ensembles, for
/// [`missing_model`].
pub(crate) fn item_names(file: &crate::syntax::ast::File) -> (Vec<&str>, Vec<&str>) {
    let models = file.models.iter().map(|m| m.name.name.as_str()).collect();
    let ensembles = file
        .ensembles
        .iter()
        .map(|e| e.name.name.as_str())
        .collect();
    (models, ensembles)
}
