//! Output of a training run: a progress bar per epoch on a terminal, one line per
//! epoch otherwise, JSON records with `--json`, nothing with `--quiet`.

use super::checkpoint::EpochRecord;
use super::evaluate::Metrics;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Bar,
    Lines,
    Json,
    Quiet,
}

impl Output {
    /// Creates a bar for the epoch's steps, when bars are shown.
    pub fn start_epoch(
        &self,
        epoch: usize,
        epochs: usize,
        steps: usize,
        samples: usize,
    ) -> Option<ProgressBar> {
        if *self != Output::Bar {
            return None;
        }
        let bar = ProgressBar::new(steps as u64);
        let style = ProgressStyle::with_template(
            "epoch {prefix} [{bar:30}] {pos}/{len} {per_sec} {msg} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("{}/{epochs}", epoch + 1));
        bar.set_message(format!("({samples} samples)"));
        Some(bar)
    }

    pub fn epoch(&self, record: &EpochRecord, epochs: usize) {
        match self {
            Output::Quiet => {}
            Output::Json => {
                let mut value = serde_json::to_value(record).unwrap_or_default();
                value["event"] = "epoch".into();
                println!("{value}");
            }
            Output::Bar | Output::Lines => println!("{}", epoch_line(record, epochs)),
        }
    }

    /// Prints a line of information on stderr, such as restored weights.
    pub fn note(&self, message: &str) {
        if !matches!(self, Output::Quiet | Output::Json) {
            eprintln!("{message}");
        }
    }

    /// Reports a training step run on both executors: every tensor's
    /// difference as a JSON record, or the five furthest on stderr.
    pub fn verify(&self, report: &super::engine::VerifyReport) {
        match self {
            Output::Quiet => {}
            Output::Json => {
                let mut value = serde_json::to_value(report).unwrap_or_default();
                value["event"] = "verify".into();
                println!("{value}");
            }
            Output::Bar | Output::Lines => {
                let mut tensors = report.tensors.clone();
                tensors.sort_by(|a, b| b.relative.total_cmp(&a.relative));
                eprintln!(
                    "verify step {}: JIT against the reference, {} tensors, furthest first",
                    report.step,
                    tensors.len()
                );
                for t in tensors.iter().take(5) {
                    eprintln!(
                        "  {:<40} max |diff| {:.3e}  relative {:.3e}",
                        t.name, t.max_abs, t.relative
                    );
                }
            }
        }
    }

    /// Prints a warning, once: quiet runs (ensemble members, sweep
    /// trials) leave it to the log, which prints warnings by default.
    pub fn warn(&self, message: &str) {
        if *self == Output::Quiet {
            tracing::warn!("{message}");
        } else {
            eprintln!("warning: {message}");
        }
    }
}

fn percent(v: f64) -> String {
    format!("{:.2}%", 100.0 * v)
}

/// `epoch 3/20  loss 0.1234  accuracy 96.50%  val_loss ...  lr 3e-3  1.2s`.
pub fn epoch_line(r: &EpochRecord, epochs: usize) -> String {
    let mut line = format!(
        "epoch {}/{epochs}  loss {:.4}  accuracy {}",
        r.epoch,
        r.loss,
        percent(r.accuracy)
    );
    if let (Some(loss), Some(acc)) = (r.val_loss, r.val_accuracy) {
        line += &format!("  val_loss {loss:.4}  val_accuracy {}", percent(acc));
    }
    if let (Some(loss), Some(acc)) = (r.test_loss, r.test_accuracy) {
        line += &format!("  test_loss {loss:.4}  test_accuracy {}", percent(acc));
    }
    line + &format!("  lr {:.3e}  {:.1}s", r.lr, r.seconds)
}

/// Moves the bar by one step and shows the running loss and accuracy.
pub fn advance(bar: &Option<ProgressBar>, metrics: &Metrics, samples: usize) {
    if let Some(bar) = bar {
        bar.inc(1);
        bar.set_message(format!(
            "loss {:.4} acc {} ({} samples/step)",
            metrics.loss(),
            percent(metrics.accuracy()),
            samples
        ));
    }
}

pub fn finish(bar: Option<ProgressBar>) {
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
}
