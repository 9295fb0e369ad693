//! `kiln tune`: sweeps a model's declared search space.
//!
//! Workers (`--jobs`) repeat one loop. Under the study lock, a worker marks
//! trials of dead workers as failed, picks the next point (a retry of such
//! a trial, or a new sample) and claims a trial number for it in the
//! database. It then checks the point statically, trains it with a pruner
//! watching every epoch, and records how it ended. A trial that fails never
//! stops the sweep. The study aims at `--trials` finished trials (complete or
//! pruned); failed and rejected trials do not count towards it. A command
//! stops after twice `--trials` (at least 10) failed or rejected trials of
//! its own, and failures of earlier commands never stop a later one.

pub mod logdir;
pub mod pruner;
pub mod report;
pub mod sampler;
pub mod storage;
pub mod tensorboard;

use crate::check::space::{Point, Space};
use crate::check::{Budget, Program};
use crate::data::Dataset;
use crate::runtime::checkpoint::EpochRecord;
use crate::runtime::engine::ExecutorKind;
use crate::runtime::Output;
use crate::runtime::{self, TrainSetup};
use pruner::Pruner;
use sampler::{Direction, Draws, Observation, SamplerKind};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use storage::{NewTrial, Storage, StorageError, Trial, TrialEnd, TrialState};
use tensorboard::TrialLog;

#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Setup(String),
}

/// Errors of trials that stopped without finishing (their worker died or
/// the sweep was interrupted) start with this; such a trial is retried
/// once.
pub const UNFINISHED: &str = "unfinished: ";

/// The metric a sweep optimises: the best value over a trial's epochs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    ValAccuracy,
    ValLoss,
}

impl Metric {
    pub fn direction(self) -> Direction {
        match self {
            Metric::ValAccuracy => Direction::Maximize,
            Metric::ValLoss => Direction::Minimize,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Metric::ValAccuracy => "val_accuracy",
            Metric::ValLoss => "val_loss",
        }
    }

    /// Reads the metric from an epoch's record, or the training metric when
    /// the run has no validation split.
    fn of(self, record: &EpochRecord) -> f64 {
        match self {
            Metric::ValAccuracy => record.val_accuracy.unwrap_or(record.accuracy),
            Metric::ValLoss => record.val_loss.unwrap_or(record.loss),
        }
    }
}

pub struct TuneConfig {
    /// Finished trials to reach.
    pub trials: usize,
    pub jobs: usize,
    /// Threads per trial.
    pub threads: usize,
    pub sampler: SamplerKind,
    pub pruner: Pruner,
    pub seed: u64,
    /// Overrides the model's `epochs`.
    pub epochs: Option<usize>,
    pub metric: Metric,
    /// Per-trial wall-time limit.
    pub timeout: Option<Duration>,
    /// Checkpoints go to `trial_dir/trial-N`.
    pub trial_dir: PathBuf,
    /// TensorBoard summaries: the HParams experiment, and each trial's
    /// session and training summaries in `logdir/trial-N`.
    pub logdir: Option<PathBuf>,
    pub val_split: f64,
    /// `--limit`: the data holds only the first this many training
    /// samples. Checkpoints record it, so the validation split can be
    /// rebuilt from the full file.
    pub limit: Option<usize>,
}

/// The model being swept and its data.
pub struct Problem {
    pub program: Program,
    pub model_name: String,
    pub source: String,
    pub space: Space,
    pub budget: Budget,
    pub train: Dataset,
    pub test: Option<Dataset>,
}

/// What a sweep reports as it goes.
pub enum Event<'a> {
    /// A trial ended; `trials` is the whole study afterwards.
    Finished {
        trial: &'a Trial,
        trials: &'a [Trial],
    },
    /// A line of information.
    Note(String),
}

type Shared = Arc<Mutex<Box<dyn Storage>>>;

/// Whether a worker has reported that failures stopped the sweep.
static STOP_ANNOUNCED: AtomicBool = AtomicBool::new(false);

/// The next trial a worker runs.
struct Next {
    trial: Trial,
    point: Point,
}

/// Runs the sweep until the study has `config.trials` finished trials, the
/// failures pass a limit, or `interrupt` is set. Returns the study's
/// trials.
///
/// # Errors
/// On storage errors; trial errors are recorded, not returned.
pub fn run(
    problem: &Problem,
    config: &TuneConfig,
    storage: Box<dyn Storage>,
    interrupt: Arc<AtomicBool>,
    events: &(dyn Fn(Event) + Sync),
) -> Result<Vec<Trial>, TuneError> {
    let shared: Shared = Arc::new(Mutex::new(storage));
    let grid = match config.sampler {
        SamplerKind::Grid => {
            let mut points = sampler::grid(&problem.space, 1_000_000).ok_or_else(|| {
                TuneError::Setup(
                    "the grid sampler needs a discrete space: give every float range a `step`, or use --sampler tpe".into(),
                )
            })?;
            sampler::shuffle(&mut points, config.seed);
            points
        }
        _ => Vec::new(),
    };
    if let Some(logdir) = &config.logdir {
        tensorboard::write_experiment(logdir, &problem.space, config.metric).map_err(|e| {
            TuneError::Setup(format!(
                "cannot write TensorBoard summaries in `{}`: {e}",
                logdir.display()
            ))
        })?;
    }
    let first = {
        let trials = shared.lock().expect("storage lock").trials()?;
        trials.iter().map(|t| t.number + 1).max().unwrap_or(0)
    };
    let errors: Mutex<Vec<TuneError>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..config.jobs.max(1) {
            scope.spawn(|| {
                let sweep = Sweep {
                    problem,
                    config,
                    shared: &shared,
                    grid: &grid,
                    first,
                };
                if let Err(e) = worker(&sweep, &interrupt, events) {
                    interrupt.store(true, Ordering::SeqCst);
                    errors.lock().expect("errors lock").push(e);
                }
            });
        }
    });
    if let Some(e) = errors.into_inner().expect("workers joined").pop() {
        return Err(e);
    }
    let trials = shared.lock().expect("storage lock").trials()?;
    Ok(trials)
}

/// What every worker of one `kiln tune` command shares.
struct Sweep<'a> {
    problem: &'a Problem,
    config: &'a TuneConfig,
    shared: &'a Shared,
    grid: &'a [Point],
    /// The number of the first trial this command may run. Only failures
    /// from here on count toward the limit, so that a study stopped by
    /// failures resumes once their cause is fixed.
    first: i64,
}

fn worker(
    sweep: &Sweep,
    interrupt: &Arc<AtomicBool>,
    events: &(dyn Fn(Event) + Sync),
) -> Result<(), TuneError> {
    let Sweep {
        problem,
        config,
        shared,
        ..
    } = *sweep;
    while !interrupt.load(Ordering::SeqCst) {
        let Some(next) = claim_next(sweep, events)? else {
            return Ok(());
        };
        let log = TrialLog::new(config.logdir.as_deref(), next.trial.number);
        log.write(|logdir| {
            tensorboard::start_session(logdir, &problem.space, &next.trial, &next.point)
        });
        let end = run_trial(problem, config, shared, &next, &log, interrupt);
        let mut storage = shared.lock().expect("storage lock");
        storage.finish(next.trial.id, &end)?;
        let trials = storage.trials()?;
        drop(storage);
        // The end is written even after a failed write, because space may
        // have been freed since, and a session without an end shows as
        // running forever.
        log.write(|logdir| tensorboard::end_session(logdir, next.trial.number, end.state));
        if let Some(trial) = trials.iter().find(|t| t.id == next.trial.id) {
            events(Event::Finished {
                trial,
                trials: &trials,
            });
        }
    }
    Ok(())
}

/// Runs `write` on the sweep's `--logdir`, if it has one. A failed write
/// is logged and does not stop the sweep, because the study database, not
/// the summaries, is the record of the trials.
fn write_summaries(
    config: &TuneConfig,
    number: i64,
    write: impl FnOnce(&Path) -> std::io::Result<()>,
) {
    let Some(logdir) = &config.logdir else {
        return;
    };
    if let Err(e) = write(logdir) {
        tracing::warn!(
            trial = number,
            logdir = %logdir.display(),
            error = %e,
            "cannot write TensorBoard summaries"
        );
    }
}

fn finished(trials: &[Trial]) -> usize {
    trials
        .iter()
        .filter(|t| matches!(t.state, TrialState::Complete | TrialState::Pruned))
        .count()
}

/// Failed and rejected trials numbered `first` or later, not counting
/// unfinished ones that are retried.
fn failures(trials: &[Trial], first: i64) -> usize {
    trials
        .iter()
        .filter(|t| t.number >= first)
        .filter(|t| match t.state {
            TrialState::Rejected => true,
            TrialState::Failed => !t.error.as_deref().unwrap_or("").starts_with(UNFINISHED),
            _ => false,
        })
        .count()
}

/// Picks and claims the next trial, or returns `None` when the study has
/// enough.
fn claim_next(sweep: &Sweep, events: &(dyn Fn(Event) + Sync)) -> Result<Option<Next>, TuneError> {
    let Sweep {
        problem,
        config,
        shared,
        grid,
        first,
    } = *sweep;
    // Failures do not count toward `--trials`, so without a limit a cause
    // that fails every trial would keep the sweep going forever. Failures
    // caused by the machine (a full disk, a missing folder) count as well
    // for that reason.
    let max_failures = (2 * config.trials).max(10);
    let target = config.trials;
    let mut storage = shared.lock().expect("storage lock");
    reap_dead(storage.as_mut(), config, events)?;
    let trials = storage.trials()?;
    let failed = failures(&trials, first);
    if failed >= max_failures {
        // Every worker stops here, and the first one to see the limit
        // prints the note.
        if !STOP_ANNOUNCED.swap(true, Ordering::SeqCst) {
            events(Event::Note(format!(
                "stopping: {failed} trials failed or were rejected in this run \
                 (the limit is twice --trials, at least 10); fix what their errors \
                 show and run the same command again to resume the study"
            )));
        }
        return Ok(None);
    }
    let Some((params, retry_of)) = choose(problem, config, &trials, grid) else {
        return Ok(None);
    };
    let limit = |trials: &[Trial]| {
        let running = trials
            .iter()
            .filter(|t| t.state == TrialState::Running)
            .count();
        finished(trials) + running >= target
    };
    let claimed = storage.claim(
        NewTrial {
            params: sampler::format_point(&params),
            retry_of,
        },
        &limit,
    )?;
    Ok(claimed.map(|trial| Next {
        trial,
        point: params,
    }))
}

/// Marks the trials of dead workers as failed and ends their sessions.
fn reap_dead(
    storage: &mut dyn Storage,
    config: &TuneConfig,
    events: &(dyn Fn(Event) + Sync),
) -> Result<(), TuneError> {
    for dead in storage.reap_dead()? {
        events(Event::Note(format!(
            "trial {} was left running by a stopped process; marked failed",
            dead.number
        )));
        // Only a session that was started gets an end: a sweep without
        // --logdir may have run the trial.
        write_summaries(config, dead.number, |logdir| {
            if !tensorboard::run_dir(logdir, dead.number).is_dir() {
                return Ok(());
            }
            tensorboard::end_session(logdir, dead.number, TrialState::Failed)
        });
    }
    Ok(())
}

/// The next point: a retry of an unfinished trial, the next grid point, or
/// a sample.
fn choose(
    problem: &Problem,
    config: &TuneConfig,
    trials: &[Trial],
    grid: &[Point],
) -> Option<(Point, Option<i64>)> {
    let retried: Vec<i64> = trials.iter().filter_map(|t| t.retry_of).collect();
    let retry = trials.iter().find(|t| {
        t.state == TrialState::Failed
            && t.retry_of.is_none()
            && t.error.as_deref().unwrap_or("").starts_with(UNFINISHED)
            && !retried.contains(&t.number)
    });
    if let Some(t) = retry {
        if let Some(point) = sampler::parse_point(&problem.space, &t.params) {
            return Some((point, Some(t.number)));
        }
    }
    let number = trials.iter().map(|t| t.number + 1).max().unwrap_or(0) as u64;
    let mut draws = Draws::new(config.seed, number);
    let point = match config.sampler {
        SamplerKind::Grid => {
            let seen: Vec<&Vec<(String, String)>> = trials.iter().map(|t| &t.params).collect();
            grid.iter()
                .find(|p| !seen.contains(&&sampler::format_point(p)))?
                .clone()
        }
        SamplerKind::Random => sampler::random_point(&problem.space, &mut draws),
        SamplerKind::Tpe => {
            let history: Vec<Observation> = trials
                .iter()
                .filter(|t| t.state == TrialState::Complete)
                .filter_map(|t| {
                    Some(Observation {
                        point: sampler::parse_point(&problem.space, &t.params)?,
                        value: t.value?,
                    })
                })
                .collect();
            sampler::tpe_point(
                &problem.space,
                &history,
                config.metric.direction(),
                &mut draws,
            )
        }
    };
    Some((problem.space.complete(point), None))
}

/// Checks, trains and judges one trial.
fn run_trial(
    problem: &Problem,
    config: &TuneConfig,
    shared: &Shared,
    next: &Next,
    log: &TrialLog,
    interrupt: &Arc<AtomicBool>,
) -> TrialEnd {
    let rejected = |error: String| TrialEnd {
        state: TrialState::Rejected,
        value: None,
        test_accuracy: None,
        error: Some(error),
        checkpoint: None,
    };
    let model = problem
        .program
        .model(&problem.model_name)
        .expect("the checked model");
    let mut instance = match problem
        .program
        .instantiate(model, &problem.space, &next.point)
    {
        Ok(instance) => instance,
        Err(diagnostics) => {
            let messages: Vec<String> = diagnostics.iter().map(|d| d.message.clone()).collect();
            return rejected(format!(
                "invalid at {}: {}",
                next.point,
                messages.join("; ")
            ));
        }
    };
    if let Some(violation) = problem.budget.violation(&instance.graph) {
        return rejected(format!("over budget at {}: {violation}", next.point));
    }
    if let Some(epochs) = config.epochs {
        instance.train.epochs = epochs;
    }
    train_trial(problem, config, shared, next, instance, log, interrupt)
}

fn train_trial(
    problem: &Problem,
    config: &TuneConfig,
    shared: &Shared,
    next: &Next,
    instance: crate::check::Instance,
    log: &TrialLog,
    interrupt: &Arc<AtomicBool>,
) -> TrialEnd {
    let failed = |error: String| TrialEnd {
        state: TrialState::Failed,
        value: None,
        test_accuracy: None,
        error: Some(error),
        checkpoint: None,
    };
    let checkpoint_dir = config
        .trial_dir
        .join(format!("trial-{}", next.trial.number));
    if let Err(e) = std::fs::create_dir_all(&checkpoint_dir) {
        return failed(format!("cannot create `{}`: {e}", checkpoint_dir.display()));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watchdog = watchdog(
        config.timeout,
        interrupt.clone(),
        stop.clone(),
        timed_out.clone(),
        done.clone(),
    );

    let setup = TrainSetup {
        model_name: problem.model_name.clone(),
        source: problem.source.clone(),
        point: sampler::format_point(&next.point),
        instance,
        train: problem.train.clone(),
        test: problem.test.clone(),
        val_split: config.val_split,
        limit: config.limit,
        checkpoint_dir: checkpoint_dir.clone(),
        logdir: log.training_dir(),
        log_every: 50,
        output: Output::Quiet,
        resume: None,
        interrupt: stop,
        executor: ExecutorKind::Jit,
        threads: config.threads,
        verify: 0,
        on_epoch: Some(pruning_hook(config, shared.clone(), next.trial.id)),
        on_log_error: Some(log.training_hook()),
        split_seed: None,
        bootstrap: false,
        keep_best: false,
    };
    let result = runtime::train(setup);
    done.store(true, Ordering::SeqCst);
    let _ = watchdog.join();

    let summary = match result {
        Ok(summary) => summary,
        Err(e) => return failed(e.to_string()),
    };
    if summary.interrupted {
        return if timed_out.load(Ordering::SeqCst) {
            failed(format!(
                "exceeded the time limit of {} s",
                config.timeout.map_or(0, |t| t.as_secs())
            ))
        } else {
            failed(format!("{UNFINISHED}the sweep was interrupted"))
        };
    }
    let direction = config.metric.direction();
    let best = summary
        .history
        .iter()
        .map(|r| (config.metric.of(r), r.test_accuracy))
        .reduce(|a, b| match direction {
            Direction::Maximize if b.0 > a.0 => b,
            Direction::Minimize if b.0 < a.0 => b,
            _ => a,
        });
    TrialEnd {
        state: if summary.pruned {
            TrialState::Pruned
        } else {
            TrialState::Complete
        },
        value: best.map(|b| b.0),
        test_accuracy: best.and_then(|b| b.1),
        error: None,
        // A best checkpoint that could not be written leaves no file, or an
        // older run's, at that path, so the trial records none.
        checkpoint: summary
            .best_write_error
            .is_none()
            .then(|| summary.checkpoint.display().to_string()),
    }
}

/// Stops a trial (through its `stop` flag) when the sweep is interrupted or
/// the trial passes its time limit.
fn watchdog(
    timeout: Option<Duration>,
    interrupt: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    timed_out: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let started = Instant::now();
    std::thread::spawn(move || {
        while !done.load(Ordering::SeqCst) {
            if interrupt.load(Ordering::SeqCst) {
                stop.store(true, Ordering::SeqCst);
            }
            if timeout.is_some_and(|t| started.elapsed() > t) {
                timed_out.store(true, Ordering::SeqCst);
                stop.store(true, Ordering::SeqCst);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    })
}

/// Records each epoch's metric and returns the pruner's decision to go on.
fn pruning_hook(config: &TuneConfig, shared: Shared, id: i64) -> runtime::EpochHook {
    let (metric, pruner) = (config.metric, config.pruner);
    let mut values: Vec<f64> = Vec::new();
    Box::new(move |record: &EpochRecord| {
        let value = metric.of(record);
        values.push(value);
        let Ok(mut storage) = shared.lock() else {
            return true;
        };
        if let Err(e) = storage.report(id, record.epoch, value) {
            tracing::warn!(trial = id, error = %e, "cannot record an epoch's value");
        }
        let Ok(trials) = storage.trials() else {
            return true;
        };
        let others: Vec<Vec<f64>> = trials
            .iter()
            .filter(|t| t.id != id && t.state != TrialState::Failed)
            .map(|t| t.epochs.clone())
            .collect();
        !pruner.should_prune(&values, &others, finished(&trials), metric.direction())
    })
}
