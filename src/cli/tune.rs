//! `kiln tune MODEL --data ...` sweeps a model's search space into a study
//! database; `kiln study STUDY` shows, plots and exports its results.

use super::exit;
use super::train::{interrupt_flag, label_column, test_split};
use crate::check::Program;
use crate::data::{self, Dataset};
use crate::diag::render::{self, SourceFile};
use crate::runtime::engine::default_threads;
use crate::tune::pruner::Pruner;
use crate::tune::sampler::{Direction, SamplerKind};
use crate::tune::storage::{self, RunSettings, SqliteStorage, Storage, Trial, TrialState};
use crate::tune::{self, logdir, report, Event, Metric, Problem, TuneConfig};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SamplerArg {
    /// Tree-structured Parzen Estimator, after 10 random trials.
    Tpe,
    Random,
    /// Every point of a discrete space, in a seeded order.
    Grid,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PrunerArg {
    None,
    /// Stop trials whose best value is below the median of others at the
    /// same epoch.
    Median,
    /// Asynchronous successive halving: rungs at epochs 1, 3, 9, ...; the
    /// top third goes on.
    Asha,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MetricArg {
    ValAccuracy,
    ValLoss,
}

#[derive(Args)]
pub struct TuneArgs {
    /// The `.model` file with a `search` section.
    pub file: PathBuf,
    /// Which model of the file; the first when omitted.
    #[arg(long)]
    pub model: Option<String>,
    /// Training data (as for `kiln train`).
    #[arg(long)]
    pub data: PathBuf,
    /// Test data; a folder's test split is used when this is omitted.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// CSV label column: a 0-based index or a header name (default: a
    /// column named label, class, target or y, else the last).
    #[arg(long)]
    pub label_column: Option<String>,
    /// Use only the first N training samples.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Finished trials (complete or pruned) the study should reach.
    #[arg(long, default_value_t = 20)]
    pub trials: usize,
    #[arg(long, value_enum, default_value_t = SamplerArg::Tpe)]
    pub sampler: SamplerArg,
    #[arg(long, value_enum, default_value_t = PrunerArg::Asha)]
    pub pruner: PrunerArg,
    /// The objective: the best value over a trial's epochs.
    #[arg(long, value_enum, default_value_t = MetricArg::ValAccuracy)]
    pub metric: MetricArg,
    /// Trials run at once (default: one per core, each single-threaded).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Threads per trial (default: the cores divided among the jobs).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Epochs per trial, instead of the model's `epochs`.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Fraction of the training data held out for validation.
    #[arg(long, default_value_t = 0.1)]
    pub val_split: f64,
    /// Wall-time limit per trial, in seconds; a trial over it fails.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// The study database (SQLite); default `NAME.study` in the current
    /// folder, where NAME is the name in `model NAME { }`. An existing
    /// study is resumed, and only with the --data, --test-data, --limit,
    /// --epochs, --val-split and --metric it was created with.
    #[arg(long)]
    pub study: Option<PathBuf>,
    /// Write TensorBoard summaries here: the HParams dashboard's experiment,
    /// and each trial's session and training summaries in `trial-<number>/`.
    /// The folder belongs to one study; a folder holding another study's
    /// runs is rejected.
    #[arg(long)]
    pub logdir: Option<PathBuf>,
    /// Print only errors and the final summary.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SortArg {
    Value,
    Number,
    Seconds,
}

#[derive(Args)]
pub struct StudyArgs {
    /// The study database written by `kiln tune`.
    pub study: PathBuf,
    /// Order of the trials table (best first for `value`).
    #[arg(long, value_enum, default_value_t = SortArg::Value)]
    pub sort: SortArg,
    /// Print the trials and importances as JSON.
    #[arg(long)]
    pub json: bool,
    /// Write the model file with every search range replaced by the best
    /// trial's value.
    #[arg(long)]
    pub export_best: Option<PathBuf>,
    /// Write `history.svg` and `params.svg` into this folder.
    #[arg(long)]
    pub plots: Option<PathBuf>,
    /// Let `--export-best` replace an existing file.
    #[arg(long)]
    pub force: bool,
}

/// Complete trials below which importances are not shown: with fewer,
/// every parameter that differs between two trials explains everything.
const MIN_IMPORTANCE_TRIALS: usize = 5;

fn metric_of(name: &str) -> Metric {
    if name == Metric::ValLoss.name() {
        Metric::ValLoss
    } else {
        Metric::ValAccuracy
    }
}

/// Loads and checks the model and its data for a sweep.
fn problem(args: &TuneArgs) -> Result<Problem, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    let source = super::read_model_file(&args.file).map_err(usage)?;
    let name = args.file.display().to_string();
    let report = crate::check::check_source(&source);
    let file = SourceFile {
        name: &name,
        text: &source,
    };
    eprint!("{}", render::render_text(&file, &report.diagnostics));
    if report.has_errors() {
        return Err((
            exit::INVALID_MODEL,
            format!("`{name}` is not a valid model"),
        ));
    }
    let program = Program::parse(&source).map_err(|d| usage(d.message))?;
    let found = match &args.model {
        Some(wanted) => report.models.iter().find(|m| &m.name == wanted),
        None => report.models.first(),
    };
    let model = found.ok_or_else(|| {
        let requested = args.model.clone().unwrap_or_default();
        let (models, ensembles) = super::train::item_names(&program.file);
        usage(super::train::missing_model(
            &requested, &name, &models, &ensembles,
        ))
    })?;
    if model.space.is_empty() {
        return Err(usage(format!(
            "model `{}` declares no search space; add a `search` section, or use `kiln train`",
            model.name
        )));
    }
    let mut loaded = data::load(&args.data, &label_column(&args.label_column))
        .map_err(|e| usage(e.to_string()))?;
    loaded.train.truncate(args.limit);
    let test = test_split(args.test_data.as_deref(), loaded.test, &args.label_column)?;
    Ok(Problem {
        model_name: model.name.clone(),
        space: model.space.clone(),
        budget: model.budget.clone(),
        program,
        source,
        train: loaded.train,
        test,
    })
}

pub fn tune(args: TuneArgs) -> u8 {
    match run_tune(args) {
        Ok(status) => status,
        Err((status, message)) => {
            eprintln!("kiln: {message}");
            status
        }
    }
}

fn run_tune(args: TuneArgs) -> Result<u8, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    let interrupt = interrupt_flag();
    let counts = [
        ("--trials", Some(args.trials)),
        ("--jobs", args.jobs),
        ("--threads", args.threads),
        ("--epochs", args.epochs),
        ("--timeout", args.timeout.map(|t| t as usize)),
    ];
    if let Some((flag, _)) = counts.iter().find(|(_, v)| *v == Some(0)) {
        return Err(usage(format!("{flag} must be at least 1")));
    }
    if !(args.val_split > 0.0 && args.val_split < 1.0) {
        return Err(usage(format!(
            "--val-split {} is outside (0, 1): a sweep judges trials on a validation split",
            args.val_split
        )));
    }
    let problem = problem(&args)?;
    let settings = run_settings(&args, &problem.train);
    if args.sampler == SamplerArg::Grid
        && crate::tune::sampler::grid(&problem.space, 1_000_000).is_none()
    {
        return Err(usage(
            "the grid sampler needs a discrete space of at most 1,000,000 points: give every float range a `step`, or use --sampler tpe".into(),
        ));
    }
    let cores = default_threads();
    let jobs = args.jobs.unwrap_or(cores).min(args.trials);
    let threads = args.threads.unwrap_or((cores / jobs).max(1));
    let metric = match args.metric {
        MetricArg::ValAccuracy => Metric::ValAccuracy,
        MetricArg::ValLoss => Metric::ValLoss,
    };
    let study_path = args
        .study
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.study", problem.model_name)));
    // Checked before the path is made absolute, so that messages show the
    // path as given.
    storage::check_path(&study_path).map_err(|e| usage(e.to_string()))?;
    // Trials record their checkpoints by absolute path, so the study can be
    // used from any folder.
    let study_path = std::path::absolute(&study_path)
        .map_err(|e| usage(format!("cannot resolve `{}`: {e}", study_path.display())))?;
    let storage = open_study(
        &study_path,
        &problem,
        metric,
        &settings,
        args.logdir.as_deref(),
    )?;
    if storage.settings_adopted() && !args.quiet {
        eprintln!(
            "note: `{}` was created by a kiln version that did not store run settings, so its earlier trials may have used other --data, --epochs or --limit. This run's settings are stored now, and later resumes must match them",
            study_path.display()
        );
    }
    let config = TuneConfig {
        trials: args.trials,
        jobs,
        threads,
        sampler: match args.sampler {
            SamplerArg::Tpe => SamplerKind::Tpe,
            SamplerArg::Random => SamplerKind::Random,
            SamplerArg::Grid => SamplerKind::Grid,
        },
        pruner: match args.pruner {
            PrunerArg::None => Pruner::None,
            PrunerArg::Median => Pruner::median(),
            PrunerArg::Asha => Pruner::asha(),
        },
        seed: args.seed,
        epochs: args.epochs,
        metric,
        timeout: args.timeout.map(Duration::from_secs),
        trial_dir: trials_dir(&study_path),
        logdir: args.logdir.clone(),
        val_split: args.val_split,
        limit: args.limit,
    };
    if !args.quiet {
        eprintln!(
            "tuning `{}`: {} trials, {} at once with {} thread(s) each; study {}",
            problem.model_name,
            config.trials,
            jobs,
            threads,
            study_path.display()
        );
    }
    let quiet = args.quiet;
    let direction = metric.direction();
    let events = move |event: Event| match event {
        Event::Note(text) if !quiet => eprintln!("{text}"),
        Event::Finished { trial, trials } if !quiet => {
            println!("{}", finished_line(trial, trials, direction, metric.name()));
        }
        _ => {}
    };
    let started = std::time::Instant::now();
    let trials = tune::run(
        &problem,
        &config,
        Box::new(storage),
        interrupt.clone(),
        &events,
    )
    .map_err(|e| usage(e.to_string()))?;
    let finished = trials
        .iter()
        .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
        .count();
    print_summary(
        &trials,
        direction,
        metric.name(),
        started.elapsed().as_secs_f64(),
    );
    if interrupt.load(Ordering::SeqCst) {
        return Ok(130);
    }
    if finished < config.trials {
        return Err((
            exit::INVALID_MODEL,
            format!(
                "the sweep stopped with {finished} of {} trials finished; see the errors above, or `kiln study {}`",
                config.trials,
                study_path.display()
            ),
        ));
    }
    Ok(exit::OK)
}

/// Opens (creating if needed) the study database and claims the sweep's
/// logdir for it.
fn open_study(
    study_path: &Path,
    problem: &Problem,
    metric: Metric,
    settings: &RunSettings,
    logdir: Option<&Path>,
) -> Result<SqliteStorage, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    let owner = logdir::Owner {
        study: study_path.to_path_buf(),
        model: problem.model_name.clone(),
    };
    // The logdir is checked first, so that a rejected one leaves no new
    // study database behind.
    if let Some(dir) = logdir {
        logdir::check(dir, &owner, study_path.exists()).map_err(usage)?;
    }
    let storage = SqliteStorage::open(
        study_path,
        &problem.model_name,
        &problem.source,
        metric.name(),
        settings,
    )
    .map_err(|e| usage(e.to_string()))?;
    if let Some(dir) = logdir {
        logdir::claim(dir, &owner).map_err(|e| {
            usage(format!(
                "cannot write TensorBoard summaries in `{}`: {e}",
                dir.display()
            ))
        })?;
    }
    Ok(storage)
}

/// Collects the settings that every trial of the study must share, from
/// the arguments and the training data after `--limit`.
fn run_settings(args: &TuneArgs, train: &Dataset) -> RunSettings {
    RunSettings {
        data: resolved_path(&args.data),
        data_sha256: dataset_sha256(train),
        test_data: args.test_data.as_deref().map(resolved_path),
        limit: args.limit,
        epochs: args.epochs,
        val_split: args.val_split,
    }
}

/// Resolves `path` to an absolute path without links or `..`, so that the
/// same file compares equal from any folder. Falls back to the path as
/// given when it cannot be resolved.
fn resolved_path(path: &Path) -> String {
    std::fs::canonicalize(path)
        .or_else(|_| std::path::absolute(path))
        .unwrap_or_else(|_| path.to_path_buf())
        .display()
        .to_string()
}

/// Hashes the features and labels of `data` with SHA-256, returned in hex.
fn dataset_sha256(data: &Dataset) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update((data.features as u64).to_le_bytes());
    hasher.update((data.len() as u64).to_le_bytes());
    let labels: Vec<u8> = data
        .labels
        .iter()
        .flat_map(|&label| (label as u64).to_le_bytes())
        .collect();
    hasher.update(&labels);
    // Converting a block at a time keeps the copy small for large data.
    let mut bytes = Vec::with_capacity(4 * 4096);
    for block in data.x.chunks(4096) {
        bytes.clear();
        bytes.extend(block.iter().flat_map(|v| v.to_le_bytes()));
        hasher.update(&bytes);
    }
    hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Checkpoints of a study's trials live beside it: `<study>.trials/`.
fn trials_dir(study: &Path) -> PathBuf {
    let mut name = study.file_name().unwrap_or_default().to_os_string();
    name.push(".trials");
    study.with_file_name(name)
}

/// One leaderboard line per finished trial.
fn finished_line(trial: &Trial, trials: &[Trial], direction: Direction, metric: &str) -> String {
    let value = trial.value.map_or("-".into(), |v| format!("{v:.4}"));
    let mut line = format!(
        "trial {:>3} {:<8} {metric} {value}  ({})",
        trial.number,
        trial.state.as_str(),
        trial
            .params
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if let Some(error) = &trial.error {
        line += &format!("\n          {error}");
    }
    if let Some(best) = report::best(trials, direction) {
        line += &format!(
            "\n          best so far: trial {} with {metric} {:.4}",
            best.number,
            best.value.unwrap_or(f64::NAN)
        );
    }
    line
}

fn count(trials: &[Trial], state: TrialState) -> usize {
    trials.iter().filter(|t| t.state == state).count()
}

fn print_summary(trials: &[Trial], direction: Direction, metric: &str, seconds: f64) {
    println!(
        "study: {} complete, {} pruned, {} failed, {} rejected; {seconds:.1}s",
        count(trials, TrialState::Complete),
        count(trials, TrialState::Pruned),
        count(trials, TrialState::Failed),
        count(trials, TrialState::Rejected)
    );
    if let Some(best) = report::best(trials, direction) {
        let params: Vec<String> = best
            .params
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        let test = best.test_accuracy.map_or(String::new(), |t| {
            format!(", test accuracy {:.2}%", 100.0 * t)
        });
        println!(
            "best: trial {} with {metric} {:.4}{test}: {}",
            best.number,
            best.value.unwrap_or(f64::NAN),
            params.join(" ")
        );
        if let Some(ckpt) = &best.checkpoint {
            println!("checkpoint: {ckpt}");
        }
    }
}

pub fn study(args: StudyArgs) -> u8 {
    match run_study(args) {
        Ok(status) => status,
        Err(message) => {
            eprintln!("kiln: {message}");
            exit::USAGE
        }
    }
}

fn run_study(args: StudyArgs) -> Result<u8, String> {
    if let Some(path) = args
        .export_best
        .as_ref()
        .filter(|p| p.exists() && !args.force)
    {
        return Err(format!(
            "`{}` exists; choose another --export-best path, or add --force to replace it",
            path.display()
        ));
    }
    let mut storage = SqliteStorage::open_existing(&args.study).map_err(|e| e.to_string())?;
    let (model, source, metric_name) = storage.study_info().map_err(|e| e.to_string())?;
    let trials = storage.trials().map_err(|e| e.to_string())?;
    let metric = metric_of(&metric_name);
    let direction = metric.direction();
    let program = Program::parse(&source).map_err(|d| d.message)?;
    let ast = program
        .model(&model)
        .ok_or_else(|| format!("the study's source has no model `{model}`"))?;
    let (space, _) = program.space(ast);

    let mut order: Vec<&Trial> = trials.iter().collect();
    match args.sort {
        SortArg::Number => {}
        SortArg::Seconds => order.sort_by(|a, b| {
            b.seconds()
                .unwrap_or(0.0)
                .total_cmp(&a.seconds().unwrap_or(0.0))
        }),
        SortArg::Value => order.sort_by(|a, b| {
            let key = |t: &Trial| match (t.value, direction) {
                (Some(v), Direction::Maximize) => -v,
                (Some(v), Direction::Minimize) => v,
                (None, _) => f64::INFINITY,
            };
            key(a).total_cmp(&key(b))
        }),
    }
    let importances = report::importances(&trials, &space);
    if args.json {
        let value = serde_json::json!({
            "model": model,
            "metric": metric_name,
            "trials": order,
            "importances": if count(&trials, TrialState::Complete) >= MIN_IMPORTANCE_TRIALS {
                importances.iter().map(|(n, s)| serde_json::json!({"param": n, "share": s})).collect::<Vec<_>>()
            } else {
                Vec::new()
            },
        });
        println!("{value}");
    } else {
        println!("study of `{model}`, objective {metric_name} (best over each trial's epochs)");
        print!("{}", report::table(&order, &metric_name));
        let complete = count(&trials, TrialState::Complete);
        if complete < MIN_IMPORTANCE_TRIALS {
            println!("\nimportance: needs {MIN_IMPORTANCE_TRIALS} complete trials, the study has {complete}");
        } else {
            println!("\nimportance from {complete} complete trials (share of the objective's variance, one parameter at a time):");
            for (name, share) in &importances {
                println!("  {name:<20} {:>5.1}%", 100.0 * share);
            }
        }
    }
    if let Some(dir) = &args.plots {
        report::plots(&trials, &metric_name, direction, dir)?;
        eprintln!(
            "wrote {} and {}",
            dir.join("history.svg").display(),
            dir.join("params.svg").display()
        );
    }
    if let Some(path) = &args.export_best {
        let best = report::best(&trials, direction).ok_or("the study has no complete trial")?;
        let text = report::export_best(&source, &model, best, &space)?;
        let check = crate::check::check_source(&text);
        if let Some(error) = check.diagnostics.iter().find(|d| d.is_error()) {
            // The study's stored source was checked when the sweep started,
            // so an error here means the stored source or point was changed.
            return Err(format!(
                "the exported model does not check ({}); the model source or trial {}'s values stored in the study may be damaged",
                error.message, best.number
            ));
        }
        std::fs::write(path, text)
            .map_err(|e| format!("cannot write `{}`: {e}", path.display()))?;
        eprintln!("wrote {} (trial {})", path.display(), best.number);
    }
    Ok(exit::OK)
}
