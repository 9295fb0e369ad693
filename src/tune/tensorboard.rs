//! TensorBoard's HParams dashboard for a sweep (`kiln tune --logdir DIR`).
//!
//! `DIR` contains the experiment: the search space and the study's metric.
//! Each trial is a session whose run is `DIR/trial-<number>`. That folder
//! contains the session's start, the trial's training summaries (written by
//! `runtime`, including the metric's scalars after every epoch) and the
//! session's end, each in its own event file, written one after another.

use super::storage::{Trial, TrialState};
use super::Metric;
use crate::check::space::{Domain, HParam, Point, Space};
use crate::check::value::Value;
use crate::runtime::tensorboard::hparams::{
    DataType, DatasetType, HParamDomain, HParamInfo, HParamValue, MetricInfo, SessionStart, Status,
};
use crate::runtime::tensorboard::EventWriter;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Integer ranges with at most this many values are shown as a list of
/// values (one checkbox each in the dashboard's filter), larger ones as an
/// interval.
const MAX_DISCRETE_INTS: u64 = 16;

/// Returns the run folder of trial `number`.
pub fn run_dir(logdir: &Path, number: i64) -> PathBuf {
    logdir.join(format!("trial-{number}"))
}

/// The summaries of one trial in `--logdir`. A failed write is logged once
/// per trial, with the trial's number, and never fails the trial: the study
/// database, not the summaries, is the record of the sweep.
pub struct TrialLog {
    logdir: Option<PathBuf>,
    number: i64,
    failed: Arc<AtomicBool>,
}

impl TrialLog {
    pub fn new(logdir: Option<&Path>, number: i64) -> TrialLog {
        TrialLog {
            logdir: logdir.map(Path::to_path_buf),
            number,
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Runs `write` on the logdir, if the sweep has one.
    pub fn write(&self, write: impl FnOnce(&Path) -> std::io::Result<()>) {
        let Some(logdir) = &self.logdir else {
            return;
        };
        if let Err(e) = write(logdir) {
            warn_once(&self.failed, self.number, logdir, &e);
        }
    }

    /// Returns the folder for the trial's training summaries, or `None`
    /// after a failed write, so that a full or broken logdir costs one
    /// warning and not an error every epoch.
    pub fn training_dir(&self) -> Option<PathBuf> {
        let logdir = self.logdir.as_ref()?;
        if self.failed.load(Ordering::SeqCst) {
            return None;
        }
        Some(run_dir(logdir, self.number))
    }

    /// Returns the hook through which training reports a failed write.
    pub fn training_hook(&self) -> crate::runtime::LogErrorHook {
        let failed = self.failed.clone();
        let number = self.number;
        let logdir = self.logdir.clone().unwrap_or_default();
        Box::new(move |error| warn_once(&failed, number, &logdir, error))
    }
}

fn warn_once(failed: &AtomicBool, number: i64, logdir: &Path, error: &dyn Display) {
    if failed.swap(true, Ordering::SeqCst) {
        return;
    }
    tracing::warn!(
        trial = number,
        run = %run_dir(logdir, number).display(),
        error = %error,
        "cannot write TensorBoard summaries; the trial goes on without them"
    );
}

/// Returns the scalar tag under which `runtime` logs the metric each
/// epoch.
pub fn metric_tag(metric: Metric) -> String {
    format!("epoch/{}", metric.name())
}

/// Writes the experiment summary into `logdir`.
///
/// # Errors
/// When the folder or the file cannot be written.
pub fn write_experiment(logdir: &Path, space: &Space, metric: Metric) -> std::io::Result<()> {
    let hparams: Vec<HParamInfo> = space.params.iter().map(hparam_info).collect();
    let metrics = [MetricInfo {
        tag: metric_tag(metric),
        dataset: DatasetType::Validation,
    }];
    EventWriter::create(logdir)?.hparams_experiment(&hparams, &metrics)
}

/// Writes the start of `trial`'s session: its active hyperparameters.
///
/// # Errors
/// When the folder or the file cannot be written.
pub fn start_session(
    logdir: &Path,
    space: &Space,
    trial: &Trial,
    point: &Point,
) -> std::io::Result<()> {
    let hparams = point
        .0
        .iter()
        .filter_map(|(name, value)| {
            let param = space.get(name)?;
            Some((name.clone(), hparam_value(&param.domain, value)))
        })
        .collect();
    let run = run_dir(logdir, trial.number);
    let start = SessionStart {
        hparams,
        // Every trial is its own group: a retried trial repeats a point, but
        // only because its first run never finished.
        group_name: format!("trial-{}", trial.number),
        start_time_secs: trial.started,
    };
    EventWriter::create(&run)?.hparams_session_start(&start)
}

/// Writes the end of trial `number`'s session with the status that
/// matches `state`.
///
/// # Errors
/// When the folder or the file cannot be written.
pub fn end_session(logdir: &Path, number: i64, state: TrialState) -> std::io::Result<()> {
    EventWriter::create(&run_dir(logdir, number))?.hparams_session_end(status(state))
}

/// Maps a trial's state to a session status.
///
/// NOTE: TensorBoard has no status for a session stopped early on purpose,
/// so pruned trials end as failures. The dashboard's "Success" filter then
/// keeps the trials that the pruner let finish.
fn status(state: TrialState) -> Status {
    match state {
        TrialState::Complete => Status::Success,
        TrialState::Pruned | TrialState::Failed | TrialState::Rejected => Status::Failure,
        TrialState::Running => Status::Running,
    }
}

fn data_type(domain: &Domain) -> DataType {
    match domain {
        Domain::Int { .. } | Domain::Float { .. } => DataType::Float64,
        Domain::Choice(options) if options.iter().all(|v| v.as_f64().is_some()) => {
            DataType::Float64
        }
        Domain::Choice(options) if options.iter().all(|v| matches!(v, Value::Bool(_))) => {
            DataType::Bool
        }
        Domain::Choice(_) => DataType::String,
    }
}

/// Converts `value` to the type the dashboard expects for `domain`, so that
/// a session's value matches one of the domain's values.
fn hparam_value(domain: &Domain, value: &Value) -> HParamValue {
    let data_type = data_type(domain);
    match value {
        Value::Bool(b) if data_type == DataType::Bool => HParamValue::Bool(*b),
        // Strings lose the quotes of their source text, so they read like
        // the names of words and blocks.
        Value::Str(s) => HParamValue::Text(s.clone()),
        _ => match value.as_f64() {
            Some(x) if data_type == DataType::Float64 => HParamValue::Number(x),
            _ => HParamValue::Text(value.to_string()),
        },
    }
}

fn hparam_info(param: &HParam) -> HParamInfo {
    let domain = match &param.domain {
        Domain::Choice(options) => HParamDomain::Discrete(
            options
                .iter()
                .map(|v| hparam_value(&param.domain, v))
                .collect(),
        ),
        Domain::Int { low, step, .. }
            if param.domain.size().unwrap_or(u64::MAX) <= MAX_DISCRETE_INTS =>
        {
            let size = param.domain.size().unwrap_or(0) as i64;
            HParamDomain::Discrete(
                (0..size)
                    .map(|k| HParamValue::Number((low + k * step) as f64))
                    .collect(),
            )
        }
        Domain::Int { low, high, .. } => HParamDomain::Interval {
            min: *low as f64,
            max: *high as f64,
        },
        Domain::Float { low, high, .. } => HParamDomain::Interval {
            min: *low,
            max: *high,
        },
    };
    HParamInfo {
        name: param.name.clone(),
        data_type: data_type(&param.domain),
        domain,
    }
}
