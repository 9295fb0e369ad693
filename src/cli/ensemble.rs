//! `kiln ensemble`: builds an ensemble from checkpoints, from a study's
//! best or greedily selected trials, or from several seeds of one model;
//! reports each member, the ensemble and their diversity; and writes the
//! ensemble file.

use super::exit;
use super::predictor::{restore_or_explain, Member, Predictor};
use super::train::{
    instantiate, interrupt_flag, label_column, restore_checkpoint, test_split, train_error,
    ExecArgs, Restored, INTERRUPTED,
};
use crate::check::Instance;
use crate::data::{self, Dataset};
use crate::ensemble::{self, file, Predictions, Rule};
use crate::runtime::checkpoint::Checkpoint;
use crate::runtime::{self, Output, TrainSetup};
use crate::tune::report;
use crate::tune::storage::{SqliteStorage, Storage, TrialState};
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RuleArg {
    /// Mean of the members' probabilities.
    Mean,
    /// Softmax of the mean of the members' logits.
    Logits,
    /// Majority vote of the members' classes.
    Vote,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SelectArg {
    /// Greedy ensemble selection with replacement on validation data
    /// (Caruana et al., 2004); members get weights.
    Greedy,
}

#[derive(Args)]
pub struct EnsembleArgs {
    /// Checkpoints to pool, or one `.model` file with `--seeds`.
    pub inputs: Vec<PathBuf>,
    /// The data the members were trained on; its validation split (as each
    /// member recorded it) drives selection and the report.
    #[arg(long)]
    pub data: PathBuf,
    /// Test data; a folder's test split is used when this is omitted.
    #[arg(long)]
    pub test_data: Option<PathBuf>,
    /// CSV label column: a 0-based index or a header name (default: a
    /// column named label, class, target or y, else the last).
    #[arg(long)]
    pub label_column: Option<String>,
    /// Train this many copies of the `.model` file, with seeds 0, 1, ...
    /// and one shared validation split, and pool them.
    #[arg(long)]
    pub seeds: Option<usize>,
    /// With --seeds: train each member on a bootstrap resample of the
    /// training part, as many samples drawn with replacement and seeded by
    /// the member's seed. The validation split is never resampled.
    #[arg(long)]
    pub bootstrap: bool,
    /// Epochs per seed member, instead of the model's `epochs`.
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Take members from this study (written by `kiln tune`).
    #[arg(long)]
    pub study: Option<PathBuf>,
    /// With --study: the best K complete trials.
    #[arg(long)]
    pub top: Option<usize>,
    /// With --study: choose members among all complete trials.
    #[arg(long, value_enum)]
    pub select: Option<SelectArg>,
    /// Rounds of greedy selection.
    #[arg(long, default_value_t = 25)]
    pub rounds: usize,
    #[arg(long, value_enum, default_value_t = RuleArg::Mean)]
    pub rule: RuleArg,
    /// The ensemble file to write.
    #[arg(long, default_value = "ensemble.safetensors")]
    pub out: PathBuf,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub exec: ExecArgs,
}

pub fn run(args: EnsembleArgs) -> u8 {
    match build(args) {
        Ok(status) => status,
        Err((status, message)) => {
            eprintln!("kiln: {message}");
            status
        }
    }
}

/// The largest `--seeds`, the same cap as `seeds(M, K)` in an ensemble
/// item.
const MAX_SEEDS: usize = 1024;

/// Rejects option values that no run can use, before any data loads.
fn validate_options(args: &EnsembleArgs) -> Result<(), String> {
    if args.exec.threads == Some(0) {
        return Err("--threads must be at least 1".into());
    }
    if args.seeds.is_none() {
        let seed_only = [
            (args.bootstrap, "--bootstrap"),
            (args.epochs.is_some(), "--epochs"),
        ];
        if let Some((_, option)) = seed_only.iter().find(|(given, _)| *given) {
            return Err(format!(
                "{option} applies to members trained with --seeds; checkpoints and study trials are already trained"
            ));
        }
    }
    if args.epochs == Some(0) {
        return Err("--epochs must be at least 1".into());
    }
    if let Some(seeds) = args.seeds.filter(|&k| k > MAX_SEEDS) {
        return Err(format!(
            "--seeds must be at most {MAX_SEEDS}, found {seeds}"
        ));
    }
    if args.select.is_some() && args.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    Ok(())
}

/// Rejects an `--out` that is one of the files the run reads: the `.model`
/// file, a member checkpoint, the data or the study. Writing the ensemble
/// there would destroy that input.
fn reject_out_among_inputs(args: &EnsembleArgs) -> Result<(), String> {
    let input_kind = if args.seeds.is_some() {
        "the `.model` file"
    } else {
        "a member checkpoint"
    };
    let mut inputs: Vec<(&Path, &str)> = args
        .inputs
        .iter()
        .map(|path| (path.as_path(), input_kind))
        .collect();
    inputs.push((&args.data, "the --data file"));
    if let Some(test_data) = &args.test_data {
        inputs.push((test_data, "the --test-data file"));
    }
    if let Some(study) = &args.study {
        inputs.push((study, "the --study database"));
    }
    match inputs.iter().find(|(path, _)| same_file(path, &args.out)) {
        Some((_, kind)) => Err(format!(
            "--out `{}` is one of the input files ({kind}); choose another path",
            args.out.display()
        )),
        None => Ok(()),
    }
}

/// Checks whether two paths name the same existing file, following symbolic
/// links and `..`.
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Members named by the arguments.
fn member_sources(
    args: &EnsembleArgs,
    train: &Dataset,
    test: Option<&Dataset>,
    interrupt: Arc<AtomicBool>,
) -> Result<Vec<MemberSource>, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    if let Some(seeds) = args.seeds {
        let [model] = args.inputs.as_slice() else {
            return Err(usage("--seeds takes exactly one `.model` file".into()));
        };
        return train_seeds(args, model, seeds, train, test, interrupt);
    }
    if let Some(study) = &args.study {
        if !args.inputs.is_empty() {
            return Err(usage("give checkpoints or --study, not both".into()));
        }
        let keep = match (args.top, args.select) {
            (Some(0), None) => return Err(usage("--top must be at least 1".into())),
            (Some(k), None) => Some(k),
            (None, Some(SelectArg::Greedy)) => None,
            _ => {
                return Err(usage(
                    "with --study, give --top K or --select greedy".into(),
                ))
            }
        };
        return study_members(study, keep);
    }
    if args.inputs.len() < 2 {
        return Err(usage(
            "give two or more checkpoints, a `.model` file with --seeds, or --study".into(),
        ));
    }
    warn_repeated(&args.inputs);
    Ok(args
        .inputs
        .iter()
        .cloned()
        .map(MemberSource::File)
        .collect())
}

/// Warns about a checkpoint given twice. It is allowed, because pooling a
/// model with itself is a valid baseline, but it is usually a mistake:
/// identical members add no diversity and only double that model's weight.
fn warn_repeated(paths: &[PathBuf]) {
    let key = |p: &PathBuf| p.canonicalize().unwrap_or_else(|_| p.clone());
    for (i, path) in paths.iter().enumerate() {
        if let Some(earlier) = paths[..i].iter().find(|q| key(q) == key(path)) {
            eprintln!(
                "warning: `{}` is given twice (also as `{}`); a repeated member adds no diversity and only counts twice in the pool",
                path.display(),
                earlier.display()
            );
        }
    }
}

/// Opens a member checkpoint file. An ensemble file or a model file is
/// rejected with a hint, because neither is a checkpoint.
fn restore_member_file(path: &Path) -> Result<Restored, (u8, String)> {
    if file::is_ensemble(path) {
        return Err((
            exit::USAGE,
            format!(
                "`{}` is an ensemble file; give its members' checkpoints",
                path.display()
            ),
        ));
    }
    let hint = "to pool copies of it, give it alone with `--seeds N`, which trains N members with seeds 0 to N-1";
    restore_or_explain(path, hint)
}

/// Checkpoints of a study's complete trials, best first: the best `keep`,
/// or all of them when `keep` is `None`.
pub(crate) fn study_members(
    study: &Path,
    keep: Option<usize>,
) -> Result<Vec<MemberSource>, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    let mut storage = SqliteStorage::open_existing(study).map_err(|e| usage(e.to_string()))?;
    let (_, _, metric) = storage.study_info().map_err(|e| usage(e.to_string()))?;
    let direction = if metric == "val_loss" {
        crate::tune::sampler::Direction::Minimize
    } else {
        crate::tune::sampler::Direction::Maximize
    };
    let mut trials: Vec<_> = storage
        .trials()
        .map_err(|e| usage(e.to_string()))?
        .into_iter()
        .filter(|t| t.state == TrialState::Complete && t.checkpoint.is_some())
        .collect();

    let mut ranked = Vec::new();
    while let Some(best) = report::best(&trials, direction).map(|t| t.id) {
        let i = trials.iter().position(|t| t.id == best).expect("present");
        ranked.push(trials.remove(i));
    }
    let paths: Vec<MemberSource> = ranked
        .iter()
        .take(keep.unwrap_or(usize::MAX))
        .filter_map(|t| t.checkpoint.as_ref())
        .map(|c| MemberSource::File(PathBuf::from(c)))
        .collect();
    if paths.is_empty() {
        return Err(usage(format!(
            "`{}` has no complete trial with a checkpoint",
            study.display()
        )));
    }
    Ok(paths)
}

/// Trains `seeds` copies of a model, with seeds 0, 1, ..., that share one
/// validation split.
fn train_seeds(
    args: &EnsembleArgs,
    model: &Path,
    seeds: usize,
    data: &Dataset,
    test: Option<&Dataset>,
    interrupt: Arc<AtomicBool>,
) -> Result<Vec<MemberSource>, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    if seeds < 2 {
        return Err(usage("--seeds needs at least 2 members".into()));
    }
    let source = super::read_model_file(model).map_err(usage)?;
    let name = model.display().to_string();
    let (model_name, instance, point) =
        instantiate(&source, &name, None, &[]).map_err(|m| (exit::INVALID_MODEL, m))?;

    let split_seed = instance.train.seed;
    let plans = (0..seeds as u64)
        .map(|seed| {
            let mut instance = instance.clone();
            instance.train.seed = seed;
            if let Some(epochs) = args.epochs {
                instance.train.epochs = epochs;
            }
            MemberPlan {
                model_name: model_name.clone(),
                instance,
                point: point.clone(),
                bootstrap: args.bootstrap,
                label: format!("seed-{seed}"),
            }
        })
        .collect();
    let shared = SharedTraining {
        source: &source,
        train: data,
        test,
        val_split: 0.1,
        limit: None,
        split_seed,
        members_dir: with_suffix(&args.out, ".members"),
        exec: args.exec,
        interrupt,
        quiet: args.json,
    };
    train_members(plans, &shared)
}

/// One member to train: a model at one point, with its own seed.
pub(crate) struct MemberPlan {
    pub model_name: String,
    pub instance: Instance,
    pub point: Vec<(String, String)>,
    pub bootstrap: bool,
    /// The member's folder under the members folder, and its name in
    /// progress messages.
    pub label: String,
}

/// Settings that every member of a trained ensemble shares.
pub(crate) struct SharedTraining<'a> {
    /// The `.model` file's text, stored in every member's checkpoint.
    pub source: &'a str,
    pub train: &'a Dataset,
    pub test: Option<&'a Dataset>,
    pub val_split: f64,
    pub limit: Option<usize>,
    /// Seed of the one validation split every member holds out, so that
    /// their validation predictions can be pooled and compared.
    pub split_seed: u64,
    pub members_dir: PathBuf,
    pub exec: ExecArgs,
    pub interrupt: Arc<AtomicBool>,
    /// Print no progress line per member.
    pub quiet: bool,
}

/// A member to pool: a checkpoint file, or a member trained in this run.
pub(crate) enum MemberSource {
    File(PathBuf),
    /// A trained member's best checkpoint as held in memory, and the path
    /// it was written to. Pooling reads the copy in memory, because the
    /// file may hold another run's weights when the write failed or another
    /// run wrote to the same folder.
    Trained {
        path: PathBuf,
        checkpoint: Box<Checkpoint>,
    },
}

impl MemberSource {
    fn path(&self) -> &Path {
        match self {
            MemberSource::File(path) | MemberSource::Trained { path, .. } => path,
        }
    }
}

/// Trains the members one after another and returns their best
/// checkpoints.
///
/// # Errors
/// When a run fails, or with status 130 when Ctrl-C stops one.
pub(crate) fn train_members(
    plans: Vec<MemberPlan>,
    shared: &SharedTraining,
) -> Result<Vec<MemberSource>, (u8, String)> {
    let mut members = Vec::new();
    let mut finished: Vec<String> = Vec::new();
    for plan in plans {
        let label = plan.label.clone();
        let setup = TrainSetup {
            model_name: plan.model_name,
            source: shared.source.to_string(),
            point: plan.point,
            instance: plan.instance,
            train: shared.train.clone(),
            test: shared.test.cloned(),
            val_split: shared.val_split,
            limit: shared.limit,
            checkpoint_dir: shared.members_dir.join(&label),
            logdir: None,
            log_every: 50,
            output: Output::Quiet,
            resume: None,
            interrupt: shared.interrupt.clone(),
            executor: shared.exec.kind(),
            threads: shared
                .exec
                .threads
                .unwrap_or_else(crate::runtime::engine::default_threads),
            verify: 0,
            on_epoch: None,
            on_log_error: None,
            split_seed: Some(shared.split_seed),
            bootstrap: plan.bootstrap,
            keep_best: true,
        };
        let summary = runtime::train(setup).map_err(train_error)?;
        if summary.interrupted {
            return Err((
                INTERRUPTED,
                interrupted_message(&label, &finished, &shared.members_dir),
            ));
        }
        if !shared.quiet {
            eprintln!(
                "trained {label}: {} epochs in {:.1}s",
                summary.history.len(),
                summary.seconds
            );
        }
        members.push(trained_member(&label, summary)?);
        finished.push(label);
    }
    Ok(members)
}

/// Takes a finished member's best checkpoint from memory, and warns when
/// its file could not be written.
fn trained_member(label: &str, summary: runtime::Summary) -> Result<MemberSource, (u8, String)> {
    let path = summary.checkpoint;
    let checkpoint = summary.best_checkpoint.ok_or_else(|| {
        (
            exit::USAGE,
            format!("member {label} finished no epoch, so it has no checkpoint"),
        )
    })?;
    if let Some(error) = summary.best_write_error {
        eprintln!(
            "warning: member {label}: {error}. The ensemble uses the member's weights held in memory, so `{}` does not hold this member's weights",
            path.display()
        );
    }
    Ok(MemberSource::Trained {
        path,
        checkpoint: Box::new(checkpoint),
    })
}

/// Formats the error of an ensemble run stopped by Ctrl-C while `label`
/// trained.
fn interrupted_message(label: &str, finished: &[String], members_dir: &Path) -> String {
    let stopped = format!("interrupted while training {label}; the ensemble was not written");
    if finished.is_empty() {
        return format!("{stopped}, and no member had finished");
    }
    format!(
        "{stopped}. The checkpoints of the finished members ({}) are kept in `{}`",
        finished.join(", "),
        members_dir.display()
    )
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(suffix);
    path.with_file_name(name)
}

/// The validation split the first member trained with, recomputed from the
/// raw data; a warning when other members used another split.
fn validation_data(raw: &Dataset, members: &[Member], json: bool) -> Option<Dataset> {
    let meta = &members[0].restored.meta;
    let key = |m: &crate::runtime::checkpoint::Metadata| {
        (
            m.val_split.to_bits(),
            m.split_seed.unwrap_or(m.seed),
            m.limit,
        )
    };
    if members.iter().any(|m| key(&m.restored.meta) != key(meta)) && !json {
        eprintln!(
            "warning: members used different validation splits, so some validation samples were training samples of other members; judge the ensemble on test data"
        );
    }
    let mut data = raw.clone();
    if let Some(limit) = meta.limit {
        let first: Vec<usize> = (0..limit.min(data.len())).collect();
        data = data.subset(&first);
    }
    let (_, val) = data::split(&data, meta.val_split, meta.split_seed.unwrap_or(meta.seed));
    val
}

/// Loss and accuracy of predictions on labelled data.
#[derive(Debug, Clone, Copy, serde::Serialize)]
struct Score {
    loss: f64,
    accuracy: f64,
}

/// Returns the index of the member with the highest accuracy. Ties go to
/// the lower loss, then to the first member (for a study, the better-ranked
/// trial).
fn best_member(members: &[Score]) -> usize {
    (0..members.len())
        .max_by(|&a, &b| {
            let by_accuracy = members[a].accuracy.total_cmp(&members[b].accuracy);
            let by_loss = members[b].loss.total_cmp(&members[a].loss);
            by_accuracy.then(by_loss).then(b.cmp(&a))
        })
        .unwrap_or(0)
}

fn score(probabilities: &ndarray::Array2<f32>, classes: &[usize], labels: &[usize]) -> Score {
    Score {
        loss: ensemble::log_loss(probabilities, labels),
        accuracy: ensemble::accuracy(classes, labels),
    }
}

fn build(args: EnsembleArgs) -> Result<u8, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    // Installed first, as `kiln train` does: the first Ctrl-C stops the
    // member in training after its step, and a second one exits at once.
    let interrupt = interrupt_flag();
    validate_options(&args).map_err(usage)?;
    reject_out_among_inputs(&args).map_err(usage)?;
    let loaded = data::load(&args.data, &label_column(&args.label_column))
        .map_err(|e| usage(e.to_string()))?;
    let test = test_split(
        args.test_data.as_deref(),
        loaded.test.clone(),
        &args.label_column,
    )?;
    let sources = member_sources(&args, &loaded.train, test.as_ref(), interrupt)?;
    let options = PoolOptions {
        rule: match args.rule {
            RuleArg::Mean => Rule::MeanProbability,
            RuleArg::Logits => Rule::MeanLogits,
            RuleArg::Vote => Rule::Vote,
        },
        select: args.select,
        rounds: args.rounds,
        out: args.out.clone(),
        json: args.json,
        quiet: false,
        exec: args.exec,
    };
    pool(sources, &loaded.train, test.as_ref(), &options)
}

/// Options of [`pool`]: the combination rule and the output path.
pub(crate) struct PoolOptions {
    pub rule: Rule,
    pub select: Option<SelectArg>,
    /// Rounds of greedy selection, with `select`.
    pub rounds: usize,
    pub out: PathBuf,
    pub json: bool,
    /// Print neither the report nor the path written.
    pub quiet: bool,
    pub exec: ExecArgs,
}

/// Opens member checkpoints, scores them and their pool on the validation
/// split of `raw_train` and on `test`, prints the report and writes the
/// ensemble file.
///
/// # Errors
/// When a member cannot be opened, members disagree on their inputs or
/// classes, or the file cannot be written.
pub(crate) fn pool(
    sources: Vec<MemberSource>,
    raw_train: &Dataset,
    test: Option<&Dataset>,
    options: &PoolOptions,
) -> Result<u8, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    if sources.iter().any(|s| same_file(s.path(), &options.out)) {
        return Err(usage(format!(
            "--out `{}` is one of the members; choose another path",
            options.out.display()
        )));
    }
    let mut predictor = open_members(sources, options)?;
    predictor.check_agreement()?;

    let val = validation_data(raw_train, &predictor.members, options.json);
    let val_predictions = match &val {
        Some(v) => Some(predictor.member_predictions(v)?),
        None => None,
    };
    if options.select == Some(SelectArg::Greedy) {
        let (Some(v), Some(preds)) = (&val, &val_predictions) else {
            return Err(usage(
                "greedy selection needs a validation split; the members trained without one".into(),
            ));
        };
        let refs: Vec<&Predictions> = preds.iter().collect();
        let counts = ensemble::greedy_selection(&refs, &v.labels, options.rounds);
        for (m, c) in predictor.members.iter_mut().zip(&counts) {
            m.weight = *c as f64;
        }
    }
    let test_predictions = match test {
        Some(t) => Some(predictor.member_predictions(t)?),
        None => None,
    };

    let report = Report::new(
        &predictor,
        val.as_ref().zip(val_predictions.as_ref()),
        test.zip(test_predictions.as_ref()),
    );
    if !options.quiet {
        report.print(&predictor, options.json);
    }
    save(&predictor, &options.out)?;
    if !options.json && !options.quiet {
        eprintln!("wrote {}", options.out.display());
    }
    Ok(exit::OK)
}

/// Opens every member checkpoint with an equal share of the threads.
fn open_members(
    sources: Vec<MemberSource>,
    options: &PoolOptions,
) -> Result<Predictor, (u8, String)> {
    let threads = options
        .exec
        .threads
        .unwrap_or_else(crate::runtime::engine::default_threads);
    let per_member = (threads / sources.len().max(1)).max(1);
    let mut members = Vec::new();
    for source in sources {
        let name = source.path().display().to_string();
        let restored = match source {
            MemberSource::File(path) => restore_member_file(&path)?,
            MemberSource::Trained { checkpoint, .. } => restore_checkpoint(*checkpoint, &name)?,
        };
        members.push(Member::new(restored, 1.0, name, &options.exec, per_member)?);
    }
    Ok(Predictor {
        members,
        rule: options.rule,
    })
}

/// Figures on one data set: each member's, the ensemble's, and diversity.
#[derive(serde::Serialize)]
struct SetReport {
    members: Vec<Score>,
    ensemble: Score,
    best_member: usize,
    /// Ensemble accuracy minus the best member's.
    gain: f64,
    diversity: Vec<ensemble::Diversity>,
}

impl SetReport {
    fn new(predictor: &Predictor, data: &Dataset, predictions: &[Predictions]) -> SetReport {
        let labels = &data.labels;
        let members: Vec<Score> = predictions
            .iter()
            .map(|p| score(&p.probabilities, &p.classes(), labels))
            .collect();
        let used: Vec<usize> = (0..predictions.len())
            .filter(|&i| predictor.members[i].weight > 0.0)
            .collect();
        let refs: Vec<&Predictions> = used.iter().map(|&i| &predictions[i]).collect();
        let weights: Vec<f64> = used.iter().map(|&i| predictor.members[i].weight).collect();
        let (probabilities, classes) = ensemble::combine(predictor.rule, &refs, &weights);
        let ensemble = score(&probabilities, &classes, labels);
        let best_member = best_member(&members);
        let mut diversity = ensemble::diversity(&refs, labels);
        for d in &mut diversity {
            (d.a, d.b) = (used[d.a], used[d.b]);
        }
        SetReport {
            gain: ensemble.accuracy - members[best_member].accuracy,
            members,
            ensemble,
            best_member,
            diversity,
        }
    }
}

#[derive(serde::Serialize)]
struct Report {
    validation: Option<SetReport>,
    test: Option<SetReport>,
}

impl Report {
    fn new(
        predictor: &Predictor,
        val: Option<(&Dataset, &Vec<Predictions>)>,
        test: Option<(&Dataset, &Vec<Predictions>)>,
    ) -> Report {
        Report {
            validation: val.map(|(d, p)| SetReport::new(predictor, d, p)),
            test: test.map(|(d, p)| SetReport::new(predictor, d, p)),
        }
    }

    fn print(&self, predictor: &Predictor, json: bool) {
        if json {
            let members: Vec<_> = predictor
                .members
                .iter()
                .map(|m| {
                    serde_json::json!({
                        "name": m.name,
                        "weight": m.weight,
                        "bootstrap": m.restored.meta.bootstrap,
                    })
                })
                .collect();
            let value = serde_json::json!({
                "rule": predictor.rule,
                "members": members,
                "validation": self.validation,
                "test": self.test,
            });
            println!("{value}");
            return;
        }
        for (name, set) in [("validation", &self.validation), ("test", &self.test)] {
            let Some(set) = set else { continue };
            println!("{name}:");
            println!(
                "  {:<4} {:>6} {:>8} {:>9}  source",
                "", "weight", "loss", "accuracy"
            );
            for (i, (m, s)) in predictor.members.iter().zip(&set.members).enumerate() {
                let resampled = if m.restored.meta.bootstrap {
                    " (bootstrap resample)"
                } else {
                    ""
                };
                println!(
                    "  m{i:<3} {:>6} {:>8.4} {:>8.2}%  {}{resampled}",
                    m.weight,
                    s.loss,
                    100.0 * s.accuracy,
                    m.name
                );
            }
            println!(
                "  ensemble    {:>8.4} {:>8.2}%  gain over the best member (m{}): {:+.2} points",
                set.ensemble.loss,
                100.0 * set.ensemble.accuracy,
                set.best_member,
                100.0 * set.gain
            );
            if predictor.members.iter().any(|m| m.weight == 0.0) {
                println!("  members of weight 0 are not pooled and not written to the file");
            }
            if !set.diversity.is_empty() {
                let n = set.diversity.len() as f64;
                let disagreement = set.diversity.iter().map(|d| d.disagreement).sum::<f64>() / n;
                let correlations: Vec<f64> = set
                    .diversity
                    .iter()
                    .filter_map(|d| d.error_correlation)
                    .collect();
                let correlation =
                    correlations.iter().sum::<f64>() / correlations.len().max(1) as f64;
                println!(
                    "  diversity: mean pairwise disagreement {:.2}%, mean error correlation {:.3}",
                    100.0 * disagreement,
                    correlation
                );
            }
        }
    }
}

/// Writes the members with non-zero weight to the ensemble file.
fn save(predictor: &Predictor, out: &Path) -> Result<(), (u8, String)> {
    let mut entries = Vec::new();
    for m in predictor.members.iter().filter(|m| m.weight > 0.0) {
        let graph = crate::ir::lower(&m.restored.instance.graph, 1, crate::ir::Mode::Infer)
            .map_err(|e| (exit::INVALID_MODEL, e.to_string()))?;
        let mut tensors: Vec<(String, &crate::interp::Tensor)> = Vec::new();
        for (info, t) in graph.params.iter().zip(&m.restored.weights.params) {
            tensors.push((info.name.clone(), t));
        }
        for (info, t) in graph.states.iter().zip(&m.restored.weights.states) {
            tensors.push((info.name.clone(), t));
        }
        entries.push(file::MemberTensors {
            meta: m.restored.meta.clone(),
            weight: m.weight,
            tensors,
        });
    }
    file::save(out, predictor.rule, &entries).map_err(|e| (exit::USAGE, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scores(pairs: &[(f64, f64)]) -> Vec<Score> {
        pairs
            .iter()
            .map(|&(loss, accuracy)| Score { loss, accuracy })
            .collect()
    }

    #[test]
    fn best_member_prefers_accuracy() {
        assert_eq!(best_member(&scores(&[(0.1, 0.90), (0.5, 0.95)])), 1);
    }

    #[test]
    fn best_member_ties_go_to_lower_loss() {
        assert_eq!(best_member(&scores(&[(0.15, 0.9667), (0.11, 0.9667)])), 1);
    }

    #[test]
    fn best_member_full_ties_go_to_first() {
        assert_eq!(
            best_member(&scores(&[(0.2, 0.9), (0.2, 0.9), (0.3, 0.8)])),
            0
        );
    }
}
