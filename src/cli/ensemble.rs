//! `kiln ensemble`: builds an ensemble from checkpoints, from a study's
//! best or greedily selected trials, or from several seeds of one model;
//! reports each member, the ensemble and their diversity; and writes the
//! ensemble file.

use super::exit;
use super::predictor::{Member, Predictor};
use super::train::{instantiate, label_column, restore, test_split, ExecArgs};
use crate::data::{self, Dataset};
use crate::ensemble::{self, file, Predictions, Rule};
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

/// Member checkpoints named by the arguments.
fn member_paths(args: &EnsembleArgs) -> Result<Vec<PathBuf>, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    if let Some(seeds) = args.seeds {
        let [model] = args.inputs.as_slice() else {
            return Err(usage("--seeds takes exactly one `.model` file".into()));
        };
        return train_seeds(args, model, seeds);
    }
    if let Some(study) = &args.study {
        if !args.inputs.is_empty() {
            return Err(usage("give checkpoints or --study, not both".into()));
        }
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
        let keep = match (args.top, args.select) {
            (Some(0), None) => return Err(usage("--top must be at least 1".into())),
            (Some(k), None) => k,
            (None, Some(SelectArg::Greedy)) => ranked.len(),
            _ => {
                return Err(usage(
                    "with --study, give --top K or --select greedy".into(),
                ))
            }
        };
        let paths: Vec<PathBuf> = ranked
            .iter()
            .take(keep)
            .filter_map(|t| t.checkpoint.as_ref().map(PathBuf::from))
            .collect();
        if paths.is_empty() {
            return Err(usage(format!(
                "`{}` has no complete trial with a checkpoint",
                study.display()
            )));
        }
        return Ok(paths);
    }
    if args.inputs.len() < 2 {
        return Err(usage(
            "give two or more checkpoints, a `.model` file with --seeds, or --study".into(),
        ));
    }
    Ok(args.inputs.clone())
}

/// Trains `seeds` copies of a model that share one validation split.
fn train_seeds(
    args: &EnsembleArgs,
    model: &Path,
    seeds: usize,
) -> Result<Vec<PathBuf>, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    if seeds < 2 {
        return Err(usage("--seeds needs at least 2 members".into()));
    }
    let source = super::read_model_file(model).map_err(usage)?;
    let name = model.display().to_string();
    let (model_name, instance, point) =
        instantiate(&source, &name, None, &[]).map_err(|m| (exit::INVALID_MODEL, m))?;
    let loaded = data::load(&args.data, &label_column(&args.label_column))
        .map_err(|e| usage(e.to_string()))?;
    let test = test_split(args.test_data.as_deref(), loaded.test, &args.label_column)?;
    let members_dir = with_suffix(&args.out, ".members");
    let mut paths = Vec::new();
    for seed in 0..seeds {
        let mut instance = instance.clone();
        let split_seed = instance.train.seed;
        instance.train.seed = seed as u64;
        if let Some(epochs) = args.epochs {
            instance.train.epochs = epochs;
        }
        let dir = members_dir.join(format!("seed-{seed}"));
        let setup = TrainSetup {
            model_name: model_name.clone(),
            source: source.clone(),
            point: point.clone(),
            instance,
            train: loaded.train.clone(),
            test: test.clone(),
            val_split: 0.1,
            limit: None,
            checkpoint_dir: dir,
            logdir: None,
            log_every: 50,
            output: Output::Quiet,
            resume: None,
            interrupt: Arc::new(AtomicBool::new(false)),
            executor: args.exec.kind(),
            threads: args
                .exec
                .threads
                .unwrap_or_else(crate::runtime::engine::default_threads),
            verify: 0,
            on_epoch: None,
            split_seed: Some(split_seed),
            bootstrap: false,
        };
        let summary = runtime::train(setup).map_err(|e| usage(e.to_string()))?;
        if !args.json {
            eprintln!(
                "trained seed {seed}: {} epochs in {:.1}s",
                summary.history.len(),
                summary.seconds
            );
        }
        paths.push(summary.checkpoint);
    }
    Ok(paths)
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

fn score(probabilities: &ndarray::Array2<f32>, classes: &[usize], labels: &[usize]) -> Score {
    Score {
        loss: ensemble::log_loss(probabilities, labels),
        accuracy: ensemble::accuracy(classes, labels),
    }
}

fn build(args: EnsembleArgs) -> Result<u8, (u8, String)> {
    let usage = |m: String| (exit::USAGE, m);
    let paths = member_paths(&args)?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if paths.iter().any(|p| same(p, &args.out)) {
        return Err(usage(format!(
            "--out `{}` is one of the members; choose another path",
            args.out.display()
        )));
    }
    let threads = args
        .exec
        .threads
        .unwrap_or_else(crate::runtime::engine::default_threads);
    let per_member = (threads / paths.len()).max(1);
    let mut members = Vec::new();
    for path in &paths {
        let restored = restore(path)?;
        members.push(Member::new(
            restored,
            1.0,
            path.display().to_string(),
            &args.exec,
            per_member,
        )?);
    }
    let rule = match args.rule {
        RuleArg::Mean => Rule::MeanProbability,
        RuleArg::Logits => Rule::MeanLogits,
        RuleArg::Vote => Rule::Vote,
    };
    let mut predictor = Predictor { members, rule };
    predictor.check_agreement()?;

    let loaded = data::load(&args.data, &label_column(&args.label_column))
        .map_err(|e| usage(e.to_string()))?;
    let test = test_split(
        args.test_data.as_deref(),
        loaded.test.clone(),
        &args.label_column,
    )?;
    let val = validation_data(&loaded.train, &predictor.members, args.json);
    let val_predictions = match &val {
        Some(v) => Some(predictor.member_predictions(v)?),
        None => None,
    };
    if args.select == Some(SelectArg::Greedy) {
        let (Some(v), Some(preds)) = (&val, &val_predictions) else {
            return Err(usage(
                "greedy selection needs a validation split; the members trained without one".into(),
            ));
        };
        let refs: Vec<&Predictions> = preds.iter().collect();
        let counts = ensemble::greedy_selection(&refs, &v.labels, args.rounds);
        for (m, c) in predictor.members.iter_mut().zip(&counts) {
            m.weight = *c as f64;
        }
    }
    let test_predictions = match &test {
        Some(t) => Some(predictor.member_predictions(t)?),
        None => None,
    };
    let report = Report::new(
        &predictor,
        val.as_ref().zip(val_predictions.as_ref()),
        test.as_ref().zip(test_predictions.as_ref()),
    );
    report.print(&predictor, args.json);
    save(&predictor, &args.out)?;
    if !args.json {
        eprintln!("wrote {}", args.out.display());
    }
    Ok(exit::OK)
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
        let best_member = (0..members.len())
            .max_by(|&a, &b| members[a].accuracy.total_cmp(&members[b].accuracy))
            .unwrap_or(0);
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
                .map(|m| serde_json::json!({"name": m.name, "weight": m.weight}))
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
                println!(
                    "  m{i:<3} {:>6} {:>8.4} {:>8.2}%  {}",
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
