//! Training, evaluation and prediction on real data: the loop behind
//! `kiln train`, with schedules, callbacks, progress, TensorBoard logs and
//! checkpoints.
//!
//! A run is deterministic: shuffling, augmentation, dropout and
//! initialisation all draw from the counter-based generator keyed by the
//! seed, the epoch and the step, and the reference executor computes in a
//! fixed order. The same seed, data and model give bit-identical weights,
//! and resuming from a checkpoint with the same data continues exactly where
//! the run stopped.

pub mod augment;
pub mod checkpoint;
pub mod engine;
pub mod evaluate;
mod progress;
pub mod schedule;
pub mod tensorboard;

use crate::check::train::{Callback, Monitor, Save, TrainConfig};
use crate::check::Instance;
use crate::data::{Dataset, Normalization};
use crate::interp::optim::OptimizerState;
use crate::interp::Weights;
use checkpoint::{CallbackState, Checkpoint, CheckpointError, EpochRecord, Metadata};
use engine::{Engine, EngineError, ExecutorKind};
use evaluate::{batch_tensor, evaluate, Metrics};
pub use progress::Output;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error("training diverged at epoch {epoch}, step {step}: the loss is {loss}; the first non-finite value is {tensor}")]
    Diverged {
        epoch: usize,
        step: usize,
        loss: f32,
        tensor: String,
    },
    #[error("cannot write logs to `{path}`: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "a validation split of {fraction} leaves no {side} sample out of {samples}; \
         choose a split that leaves at least one sample on each side, or 0 for no validation"
    )]
    Split {
        fraction: f64,
        samples: usize,
        side: &'static str,
    },
}

/// Notes each callback that follows a training metric because the run has
/// no validation data for the validation metric it names.
fn note_training_fallback(callbacks: &[Callback], output: &Output) {
    for callback in callbacks {
        let (name, monitor) = match callback {
            Callback::EarlyStopping { monitor, .. } => ("early_stopping", *monitor),
            Callback::Checkpoint { monitor, .. } => ("checkpoint", *monitor),
            Callback::ReduceLrOnPlateau { monitor, .. } => ("reduce_lr_on_plateau", *monitor),
            _ => continue,
        };
        let fallback = monitor.on_training_data();
        if fallback != monitor {
            output.note(&format!(
                "no validation split: `{name}` follows the training {}, not `{}`",
                fallback.name(),
                monitor.name()
            ));
        }
    }
}

/// Everything a run needs, resolved by the command line.
pub struct TrainSetup {
    pub model_name: String,
    pub source: String,
    /// The hyperparameters of the trained point, as source text.
    pub point: Vec<(String, String)>,
    pub instance: Instance,
    pub train: Dataset,
    pub test: Option<Dataset>,
    pub val_split: f64,
    /// `--limit`, recorded so that a resumed run uses the same samples.
    pub limit: Option<usize>,
    pub checkpoint_dir: PathBuf,
    pub logdir: Option<PathBuf>,
    /// Scalars are also logged every this many steps.
    pub log_every: usize,
    pub output: Output,
    pub resume: Option<(Checkpoint, PathBuf)>,
    pub interrupt: Arc<AtomicBool>,
    pub executor: ExecutorKind,
    pub threads: usize,
    /// Training steps to also run on the reference executor and compare.
    pub verify: usize,
    /// Called after every epoch with its record; returning `false` stops
    /// the run, as a sweep's pruner does.
    pub on_epoch: Option<EpochHook>,
    /// Called with the first error writing `logdir`'s event files. When it
    /// is set, the run stops logging and trains on, as a sweep's trials do,
    /// because the summaries are not the record of the run. Without it, such
    /// an error fails the run.
    pub on_log_error: Option<LogErrorHook>,
    /// Seed of the validation split, when it should not follow the model's
    /// seed: members of a seed ensemble share one split, so that their
    /// validation predictions can be pooled.
    pub split_seed: Option<u64>,
    /// Train on a bootstrap resample of the training part, drawn with the
    /// model's seed after the validation split is taken out, so that
    /// members of an ensemble see different data. Validation and test data
    /// are never resampled.
    pub bootstrap: bool,
    /// Keep a copy of the best checkpoint in memory and return it as
    /// [`Summary::best_checkpoint`], so that a caller can use the trained
    /// weights even when the file could not be written.
    pub keep_best: bool,
}

/// See [`TrainSetup::on_epoch`].
pub type EpochHook = Box<dyn FnMut(&EpochRecord) -> bool + Send>;

/// See [`TrainSetup::on_log_error`].
pub type LogErrorHook = Box<dyn FnMut(&TrainError) + Send>;

/// Outcome of a training run.
#[derive(Debug)]
pub struct Summary {
    pub history: Vec<EpochRecord>,
    pub best: Option<(f64, usize)>,
    pub monitor: Monitor,
    pub seconds: f64,
    pub checkpoint: PathBuf,
    pub interrupted: bool,
    pub stopped_early: bool,
    /// Whether [`TrainSetup::on_epoch`] stopped the run.
    pub pruned: bool,
    /// The best checkpoint's contents, with [`TrainSetup::keep_best`].
    pub best_checkpoint: Option<Checkpoint>,
    /// The error of the latest write of the best checkpoint, or `None` when
    /// that write succeeded and the file at [`Summary::checkpoint`] is
    /// this run's.
    pub best_write_error: Option<String>,
    /// Checkpoint writes that failed in this run, best and last together.
    pub failed_writes: usize,
}

struct Run {
    setup: TrainSetup,
    config: TrainConfig,
    engine: Engine,
    weights: Weights,
    optimizer: OptimizerState,
    meta: Metadata,
    shape: Vec<usize>,
    classes: usize,
    train: Dataset,
    val: Option<Dataset>,
    test: Option<Dataset>,
    best_weights: Option<Weights>,
    events: Option<tensorboard::EventWriter>,
    pruned: bool,
    best_checkpoint: Option<Checkpoint>,
    best_write_error: Option<String>,
    failed_writes: usize,
}

/// Trains a model.
///
/// # Errors
/// When the data does not fit the model, the engine or a checkpoint write
/// fails, or training diverges.
pub fn train(setup: TrainSetup) -> Result<Summary, TrainError> {
    let started = Instant::now();
    let mut run = Run::new(setup)?;
    let result = run.epochs();
    let seconds = started.elapsed().as_secs_f64();
    let (interrupted, stopped_early) = result?;
    if run.failed_writes > 1 {
        let message = format!(
            "{} checkpoint writes to `{}` failed in this run",
            run.failed_writes,
            run.setup.checkpoint_dir.display()
        );
        run.setup.output.warn(&message);
    }
    let summary = Summary {
        history: run.meta.history.clone(),
        best: run.meta.callbacks.best,
        monitor: run.monitor(),
        seconds,
        checkpoint: run.checkpoint_path("best"),
        interrupted,
        stopped_early,
        pruned: run.pruned,
        best_checkpoint: run.best_checkpoint.take(),
        best_write_error: run.best_write_error.take(),
        failed_writes: run.failed_writes,
    };
    Ok(summary)
}

impl Run {
    fn new(mut setup: TrainSetup) -> Result<Run, TrainError> {
        let config = setup.instance.train.clone();
        let graph = &setup.instance.graph;
        let input = graph.node(graph.inputs[0].1);
        let shape = input.shape.0.clone();
        let output = graph.node(graph.output.expect("checked model has an output"));
        let classes = output.shape.0.iter().product();
        setup.train.check_fits(&shape, classes)?;
        if let Some(test) = &setup.test {
            test.check_fits(&shape, classes)?;
        }

        let split_seed = match &setup.resume {
            Some((checkpoint, _)) => checkpoint.meta.split_seed.unwrap_or(checkpoint.meta.seed),
            None => setup.split_seed.unwrap_or(config.seed),
        };
        let (mut train, mut val) = crate::data::split(&setup.train, setup.val_split, split_seed);
        if setup.val_split > 0.0 && val.is_none() {
            let samples = setup.train.len();
            let side = if setup.val_split * (samples as f64) < 0.5 {
                "validation"
            } else {
                "training"
            };
            return Err(TrainError::Split {
                fraction: setup.val_split,
                samples,
                side,
            });
        }
        if val.is_none() {
            note_training_fallback(&config.callbacks, &setup.output);
        }
        let bootstrap = match &setup.resume {
            Some((checkpoint, _)) => checkpoint.meta.bootstrap,
            None => setup.bootstrap,
        };
        if bootstrap {
            train = crate::data::bootstrap(&train, config.seed);
        }
        let mut test = setup.test.clone();
        let normalization = match &setup.resume {
            Some((checkpoint, _)) => checkpoint.meta.normalization.clone(),
            None => {
                let channels = if shape.len() == 3 { shape[0] } else { 1 };
                Normalization::fit(&train, channels)
            }
        };
        for set in [Some(&mut train), val.as_mut(), test.as_mut()]
            .into_iter()
            .flatten()
        {
            normalization.apply(set);
        }

        let mut engine = Engine::new(graph.clone(), config.loss.clone())
            .with_executor(setup.executor)
            .with_verify(setup.verify)
            .with_threads(setup.threads)?;
        let train_graph = engine
            .train_graph(config.batch_size.min(train.len()).max(1))?
            .clone();
        let mut optimizer = OptimizerState::new(config.optimizer.clone());
        let (weights, meta) = match &setup.resume {
            Some((checkpoint, path)) => {
                let weights = checkpoint.weights(&train_graph, path)?;
                optimizer.buffers = checkpoint.optimizer_buffers(&train_graph);
                optimizer.step = checkpoint.meta.global_step;
                (weights, checkpoint.meta.clone())
            }
            None => {
                let meta = Metadata {
                    format: 1,
                    model: setup.model_name.clone(),
                    source: setup.source.clone(),
                    source_sha256: checkpoint::sha256_hex(&setup.source),
                    point: setup.point.clone(),
                    epoch: 0,
                    batch_in_epoch: 0,
                    global_step: 0,
                    seed: config.seed,
                    lr: config.optimizer.lr(),
                    batch_size: config.batch_size,
                    epochs: config.epochs,
                    val_split: setup.val_split,
                    split_seed: Some(split_seed),
                    limit: setup.limit,
                    bootstrap,
                    normalization,
                    input_shape: shape.clone(),
                    classes,
                    callbacks: CallbackState::default(),
                    history: Vec::new(),
                };
                (Weights::init(&train_graph, config.seed), meta)
            }
        };
        let events = match &setup.logdir {
            Some(dir) => match tensorboard::EventWriter::create(dir) {
                Ok(writer) => Some(writer),
                Err(source) => {
                    let error = TrainError::Log {
                        path: dir.clone(),
                        source,
                    };
                    match &mut setup.on_log_error {
                        Some(hook) => hook(&error),
                        None => return Err(error),
                    }
                    None
                }
            },
            None => None,
        };
        let mut run = Run {
            setup,
            config,
            engine,
            weights,
            optimizer,
            meta,
            shape,
            classes,
            train,
            val,
            test,
            best_weights: None,
            events,
            pruned: false,
            best_checkpoint: None,
            best_write_error: None,
            failed_writes: 0,
        };
        let logged = run.log_model_summary();
        run.tolerate_log_error(logged)?;
        Ok(run)
    }

    /// Returns the metric the best checkpoint follows: the checkpoint callback's
    /// monitor, else validation loss.
    fn monitor(&self) -> Monitor {
        let declared = self.config.callbacks.iter().find_map(|c| match c {
            Callback::Checkpoint { monitor, .. } => Some(*monitor),
            _ => None,
        });
        self.available(declared.unwrap_or(Monitor::ValLoss))
    }

    /// Without a validation split, validation metrics fall back to the
    /// training ones.
    fn available(&self, monitor: Monitor) -> Monitor {
        if self.val.is_some() {
            monitor
        } else {
            monitor.on_training_data()
        }
    }

    fn checkpoint_path(&self, which: &str) -> PathBuf {
        self.setup
            .checkpoint_dir
            .join(format!("{which}.safetensors"))
    }

    /// Runs the remaining epochs. Returns (interrupted, stopped early).
    fn epochs(&mut self) -> Result<(bool, bool), TrainError> {
        let epochs = self.config.epochs;
        while self.meta.epoch < epochs {
            let started = Instant::now();
            let epoch = self.meta.epoch;
            let Some(train_metrics) = self.train_epoch(epoch)? else {
                return Ok((true, false));
            };
            let record =
                self.finish_epoch(epoch, &train_metrics, started.elapsed().as_secs_f64())?;
            self.setup.output.epoch(&record, epochs);
            if self.callbacks(&record)? {
                return Ok((false, true));
            }
            // A run that has finished its last epoch is complete, whatever
            // the hook says about going on.
            if let Some(hook) = self.setup.on_epoch.as_mut() {
                if !hook(&record) && self.meta.epoch < epochs {
                    self.pruned = true;
                    return Ok((false, true));
                }
            }
        }
        Ok((false, false))
    }

    /// Runs one pass over the training data. Returns `None` when interrupted.
    fn train_epoch(&mut self, epoch: usize) -> Result<Option<Metrics>, TrainError> {
        let batch_size = self.config.batch_size.max(1);
        let order = crate::data::permutation(self.train.len(), self.config.seed, epoch as u64);
        let batches: Vec<&[usize]> = order.chunks(batch_size).collect();
        let steps = batches.len();
        let mut metrics = Metrics::new(self.classes);
        let bar = self
            .setup
            .output
            .start_epoch(epoch, self.config.epochs, steps, self.train.len());
        for (step, indices) in batches.iter().enumerate().skip(self.meta.batch_in_epoch) {
            self.optimizer.lr = schedule::learning_rate(
                &self.config.schedule,
                self.meta.lr,
                epoch,
                step,
                steps,
                self.config.epochs,
            );
            let (x, labels) = self.training_batch(indices);
            let out = self.engine.train_step(
                &mut self.weights,
                &mut self.optimizer,
                &x,
                &labels,
                self.meta.global_step,
            )?;
            if let Some(report) = self.engine.take_verify_report() {
                self.setup.output.verify(&report);
            }
            if !out.loss.is_finite() {
                return Err(TrainError::Diverged {
                    epoch: epoch + 1,
                    step: step + 1,
                    loss: out.loss,
                    tensor: out.first_non_finite.unwrap_or_else(|| "unknown".into()),
                });
            }
            metrics.add(&out.logits, &labels, out.loss as f64);
            self.meta.global_step += 1;
            self.meta.batch_in_epoch = step + 1;
            let logged = self.log_step(out.loss);
            self.tolerate_log_error(logged)?;
            progress::advance(&bar, &metrics, labels.len());
            if self.setup.interrupt.load(Ordering::SeqCst) {
                progress::finish(bar);
                self.save("last")?;
                return Ok(None);
            }
        }
        progress::finish(bar);
        self.meta.batch_in_epoch = 0;
        Ok(Some(metrics))
    }

    fn training_batch(&self, indices: &[usize]) -> (crate::interp::Tensor, Vec<usize>) {
        let mut x = batch_tensor(&self.train, indices, &self.shape);
        if !self.config.augment.is_empty() {
            let features = self.train.features;
            let step = self.meta.global_step;
            for (i, sample) in x
                .as_slice_mut()
                .expect("contiguous")
                .chunks_exact_mut(features)
                .enumerate()
            {
                let key = step * batch_key_stride(indices.len()) + i as u64;
                augment::apply(
                    sample,
                    &self.shape,
                    &self.config.augment,
                    self.config.seed,
                    key,
                );
            }
        }
        let labels = indices.iter().map(|&i| self.train.labels[i]).collect();
        (x, labels)
    }

    fn evaluate_on(&mut self, data: &Dataset) -> Result<Metrics, TrainError> {
        Ok(evaluate(
            &mut self.engine,
            &self.weights,
            data,
            &self.shape,
            self.classes,
            &self.config.loss,
            self.config.batch_size.max(1),
        )?)
    }

    fn finish_epoch(
        &mut self,
        epoch: usize,
        train: &Metrics,
        seconds: f64,
    ) -> Result<EpochRecord, TrainError> {
        let val = match self.val.clone() {
            Some(val) => Some(self.evaluate_on(&val)?),
            None => None,
        };
        let test = match self.test.clone() {
            Some(test) => Some(self.evaluate_on(&test)?),
            None => None,
        };
        let record = EpochRecord {
            epoch: epoch + 1,
            loss: train.loss(),
            accuracy: train.accuracy(),
            top5_accuracy: train.top5(),
            val_loss: val.as_ref().map(Metrics::loss),
            val_accuracy: val.as_ref().map(Metrics::accuracy),
            test_loss: test.as_ref().map(Metrics::loss),
            test_accuracy: test.as_ref().map(Metrics::accuracy),
            lr: self.optimizer.lr,
            seconds,
        };
        self.meta.epoch = epoch + 1;
        self.meta.history.push(record.clone());
        let logged = self.log_epoch(&record);
        self.tolerate_log_error(logged)?;
        Ok(record)
    }

    fn monitored(&self, record: &EpochRecord, monitor: Monitor) -> f64 {
        let value = match monitor {
            Monitor::Loss => Some(record.loss),
            Monitor::Accuracy => Some(record.accuracy),
            Monitor::ValLoss => record.val_loss,
            Monitor::ValAccuracy => record.val_accuracy,
        };
        value.unwrap_or(match monitor {
            Monitor::Loss | Monitor::ValLoss => record.loss,
            Monitor::Accuracy | Monitor::ValAccuracy => record.accuracy,
        })
    }

    /// Applies the callbacks after an epoch. Returns whether to stop.
    fn callbacks(&mut self, record: &EpochRecord) -> Result<bool, TrainError> {
        let monitor = self.monitor();
        let value = self.monitored(record, monitor);
        let improved = improves(monitor, value, self.meta.callbacks.best.map(|b| b.0), 0.0);
        if improved {
            self.meta.callbacks.best = Some((value, record.epoch));
        }

        self.reduce_lr_on_plateau(record);
        let save = self.config.callbacks.iter().find_map(|c| match c {
            Callback::Checkpoint { save, .. } => Some(*save),
            _ => None,
        });
        let save = save.unwrap_or(Save::Both);
        if improved && matches!(save, Save::Best | Save::Both) {
            self.save("best")?;
        }
        if matches!(save, Save::Last | Save::Both) {
            self.save("last")?;
        }
        self.csv_log(record)?;
        Ok(self.early_stopping(record))
    }

    /// Keras' rule: stop once the monitor has not improved by `min_delta`
    /// for `patience` epochs in a row, restoring the best weights if asked.
    fn early_stopping(&mut self, record: &EpochRecord) -> bool {
        let Some(Callback::EarlyStopping {
            monitor,
            patience,
            min_delta,
            restore_best,
        }) = self
            .config
            .callbacks
            .iter()
            .find(|c| matches!(c, Callback::EarlyStopping { .. }))
            .cloned()
        else {
            return false;
        };
        let monitor = self.available(monitor);
        let value = self.monitored(record, monitor);
        let state = &mut self.meta.callbacks;
        if improves(monitor, value, state.stop_best.map(|b| b.0), min_delta) {
            state.stop_best = Some((value, record.epoch));
            state.stale_epochs = 0;
            if restore_best {
                self.best_weights = Some(self.weights.clone());
            }
            return false;
        }
        state.stale_epochs += 1;
        if state.stale_epochs < patience.max(1) {
            return false;
        }
        if let (Some(best), Some((_, epoch))) = (self.best_weights.take(), state.stop_best) {
            self.weights = best;
            self.setup.output.note(&format!(
                "restored the weights of epoch {epoch}, the best {}",
                monitor.name()
            ));
        }
        true
    }

    fn reduce_lr_on_plateau(&mut self, record: &EpochRecord) {
        for callback in self.config.callbacks.clone() {
            let Callback::ReduceLrOnPlateau {
                monitor,
                factor,
                patience,
                min_delta,
                min_lr,
                cooldown,
            } = callback
            else {
                continue;
            };
            let value = self.monitored(record, self.available(monitor));
            let state = &mut self.meta.callbacks;
            // Keras' rule: count epochs without improvement outside the
            // cooldown, and reduce once the count reaches `patience`.
            if state.cooldown > 0 {
                state.cooldown -= 1;
                state.plateau_stale = 0;
            }
            if improves(monitor, value, state.plateau_best, min_delta) {
                state.plateau_best = Some(value);
                state.plateau_stale = 0;
            } else if state.cooldown == 0 {
                state.plateau_stale += 1;
                if state.plateau_stale >= patience.max(1) {
                    self.meta.lr = (self.meta.lr * factor).max(min_lr);
                    state.cooldown = cooldown;
                    state.plateau_stale = 0;
                }
            }
        }
    }

    fn save(&mut self, which: &str) -> Result<(), TrainError> {
        let batch = self.config.batch_size.min(self.train.len()).max(1);
        let graph = self.engine.train_graph(batch)?.clone();
        let path = self.checkpoint_path(which);
        if which == "best" && self.setup.keep_best {
            self.best_checkpoint = Some(Checkpoint::in_memory(&graph, &self.weights, &self.meta));
        }
        // Whether a file was there before this write: a failed write leaves
        // it unchanged, but it may come from an earlier run.
        let existed = path.is_file();
        let result = checkpoint::save(&path, &graph, &self.weights, &self.optimizer, &self.meta);
        let error = result.err().map(|e| e.to_string());
        if which == "best" {
            self.best_write_error = error.clone();
        }
        if let Some(e) = error {
            self.report_failed_write(&e, existed);
        }
        Ok(())
    }

    /// Logs the first failed checkpoint write of the run and counts the
    /// rest, which [`train`] reports once at the end. Training goes on, and
    /// the next epoch tries again.
    fn report_failed_write(&mut self, error: &str, existed: bool) {
        self.failed_writes += 1;
        if self.failed_writes > 1 {
            return;
        }
        let file_state = if existed {
            "the file already at that path is kept unchanged"
        } else {
            "no file is at that path"
        };
        let message =
            format!("{error}; {file_state}; training goes on and retries after each epoch");
        self.setup.output.warn(&message);
    }

    fn csv_log(&self, record: &EpochRecord) -> Result<(), TrainError> {
        for callback in &self.config.callbacks {
            let Callback::CsvLog { path } = callback else {
                continue;
            };
            let path = path
                .as_ref()
                .map_or_else(|| self.setup.checkpoint_dir.join("log.csv"), PathBuf::from);
            append_csv(&path, record).map_err(|source| TrainError::Log { path, source })?;
        }
        Ok(())
    }

    /// Passes an event-file error to [`TrainSetup::on_log_error`], if set,
    /// and stops logging. Every other result is returned as it is.
    fn tolerate_log_error(&mut self, result: Result<(), TrainError>) -> Result<(), TrainError> {
        let Err(error @ TrainError::Log { .. }) = result else {
            return result;
        };
        let Some(hook) = &mut self.setup.on_log_error else {
            return Err(error);
        };
        hook(&error);
        self.events = None;
        Ok(())
    }

    fn log_model_summary(&mut self) -> Result<(), TrainError> {
        let Some(events) = &mut self.events else {
            return Ok(());
        };
        let graph = &self.setup.instance.graph;
        let mut text = String::from("| layer | op | shape | params |\n|---|---|---|---|\n");
        for node in &graph.nodes {
            text += &format!(
                "| {} | {} | {} | {} |\n",
                node.name,
                node.op.name(),
                node.shape,
                node.params()
            );
        }
        text += &format!("\nTrainable parameters: {}", graph.params());
        let path = events.path.clone();
        events
            .text("model/summary", 0, &text)
            .map_err(|source| TrainError::Log { path, source })
    }

    fn log_step(&mut self, loss: f32) -> Result<(), TrainError> {
        let step = self.meta.global_step;
        let every = self.setup.log_every.max(1) as u64;
        let lr = self.optimizer.lr;
        let Some(events) = &mut self.events else {
            return Ok(());
        };
        if !step.is_multiple_of(every) {
            return Ok(());
        }
        let path = events.path.clone();
        let result = events
            .scalar("step/loss", step, loss as f64)
            .and_then(|()| events.scalar("step/lr", step, lr));
        result.map_err(|source| TrainError::Log { path, source })
    }

    fn log_epoch(&mut self, record: &EpochRecord) -> Result<(), TrainError> {
        if self.events.is_none() {
            return Ok(());
        }
        let epoch = record.epoch as u64;
        let mut scalars = vec![
            ("epoch/loss", Some(record.loss)),
            ("epoch/accuracy", Some(record.accuracy)),
            ("epoch/top5_accuracy", record.top5_accuracy),
            ("epoch/val_loss", record.val_loss),
            ("epoch/val_accuracy", record.val_accuracy),
            ("epoch/test_loss", record.test_loss),
            ("epoch/test_accuracy", record.test_accuracy),
        ];
        scalars.push(("epoch/lr", Some(record.lr)));
        let activations = {
            let sample: Vec<usize> = (0..self.train.len().min(32)).collect();
            let x = batch_tensor(&self.train, &sample, &self.shape);
            self.engine.activations(&self.weights, &x)?
        };
        let batch = self.config.batch_size.min(self.train.len()).max(1);
        let graph = self.engine.train_graph(batch)?.clone();
        let events = self.events.as_mut().expect("checked above");
        let path = events.path.clone();
        let write = |events: &mut tensorboard::EventWriter| -> std::io::Result<()> {
            for (tag, value) in &scalars {
                if let Some(value) = value {
                    events.scalar(tag, epoch, *value)?;
                }
            }
            for (info, tensor) in graph.params.iter().zip(&self.weights.params) {
                events.histogram(
                    &format!("weights/{}", info.name),
                    epoch,
                    tensor.as_slice().unwrap_or(&[]),
                )?;
            }
            for (name, value) in &activations {
                events.histogram(
                    &format!("activations/{name}"),
                    epoch,
                    value.as_slice().unwrap_or(&[]),
                )?;
            }
            events.flush()
        };
        write(events).map_err(|source| TrainError::Log { path, source })
    }
}

/// Returns whether `value` improves on `best` by more than `delta` in the
/// monitor's direction. Any value improves on no value.
fn improves(monitor: Monitor, value: f64, best: Option<f64>, delta: f64) -> bool {
    match best {
        None => true,
        Some(best) if monitor.maximize() => value > best + delta,
        Some(best) => value < best - delta,
    }
}

/// Distinct augmentation keys per step: room for any batch size.
fn batch_key_stride(batch: usize) -> u64 {
    batch.next_power_of_two().max(1) as u64
}

fn append_csv(path: &Path, record: &EpochRecord) -> std::io::Result<()> {
    use std::io::Write;
    let new = !path.exists();
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    if new {
        writeln!(
            file,
            "epoch,loss,accuracy,val_loss,val_accuracy,test_loss,test_accuracy,lr,seconds"
        )?;
    }
    let opt = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    writeln!(
        file,
        "{},{:.6},{:.6},{},{},{},{},{:e},{:.3}",
        record.epoch,
        record.loss,
        record.accuracy,
        opt(record.val_loss),
        opt(record.val_accuracy),
        opt(record.test_loss),
        opt(record.test_accuracy),
        record.lr,
        record.seconds
    )
}
