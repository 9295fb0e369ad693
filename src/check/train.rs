//! The `train` section: optimizer, schedule, loss, callbacks and the rest of
//! a training recipe, validated into a [`TrainConfig`].

use super::args::{bind, param, suggest, Args, Default as D, Kind, Param};
use super::errors::{bind_error, quote_list, KeywordArg};
use super::value::Value;
use crate::diag::{codes, Diagnostic};
use crate::syntax::ast::{Call, Expr, ExprKind, Setting};

#[derive(Debug, Clone, PartialEq)]
pub enum Optimizer {
    Sgd {
        lr: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    Adam {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// Adam with decoupled weight decay (Loshchilov and Hutter, 2019).
    AdamW {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    RmsProp {
        lr: f64,
        alpha: f64,
        eps: f64,
        momentum: f64,
        weight_decay: f64,
    },
}

impl Optimizer {
    pub fn lr(&self) -> f64 {
        match *self {
            Optimizer::Sgd { lr, .. }
            | Optimizer::Adam { lr, .. }
            | Optimizer::AdamW { lr, .. }
            | Optimizer::RmsProp { lr, .. } => lr,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    Constant,
    /// Multiplies the rate by `gamma` every `every` epochs.
    Step {
        every: usize,
        gamma: f64,
    },
    /// Linear warm-up over `warmup` epochs, then cosine decay to `min_lr`.
    Cosine {
        warmup: usize,
        min_lr: f64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Loss {
    CrossEntropy { label_smoothing: f64 },
    Mse,
}

/// A metric that callbacks watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Monitor {
    Loss,
    Accuracy,
    ValLoss,
    ValAccuracy,
}

impl Monitor {
    /// Returns whether larger values are better.
    pub fn maximize(self) -> bool {
        matches!(self, Monitor::Accuracy | Monitor::ValAccuracy)
    }

    pub fn name(self) -> &'static str {
        match self {
            Monitor::Loss => "loss",
            Monitor::Accuracy => "accuracy",
            Monitor::ValLoss => "val_loss",
            Monitor::ValAccuracy => "val_accuracy",
        }
    }

    /// Returns the training metric that replaces this one in a run without
    /// validation data.
    pub fn on_training_data(self) -> Monitor {
        match self {
            Monitor::ValLoss => Monitor::Loss,
            Monitor::ValAccuracy => Monitor::Accuracy,
            other => other,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Save {
    Best,
    Last,
    Both,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Callback {
    EarlyStopping {
        monitor: Monitor,
        patience: usize,
        min_delta: f64,
        restore_best: bool,
    },
    Checkpoint {
        monitor: Monitor,
        save: Save,
    },
    ReduceLrOnPlateau {
        monitor: Monitor,
        factor: f64,
        patience: usize,
        min_delta: f64,
        min_lr: f64,
        cooldown: usize,
    },
    CsvLog {
        path: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Augment {
    /// Mirrors an image left to right with probability `p`.
    Flip { p: f64 },
    /// Shifts an image by up to `pixels` in each direction, filling with 0.
    Translate { pixels: usize },
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub optimizer: Optimizer,
    pub schedule: Schedule,
    pub loss: Loss,
    pub batch_size: usize,
    pub epochs: usize,
    pub seed: u64,
    pub callbacks: Vec<Callback>,
    pub augment: Vec<Augment>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optimizer: Optimizer::Adam {
                lr: 1e-3,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.0,
            },
            schedule: Schedule::Constant,
            loss: Loss::CrossEntropy {
                label_smoothing: 0.0,
            },
            batch_size: 32,
            epochs: 10,
            seed: 0,
            callbacks: Vec::new(),
            augment: Vec::new(),
        }
    }
}

const KEYS: &[&str] = &[
    "optimizer",
    "schedule",
    "loss",
    "batch_size",
    "epochs",
    "seed",
    "callbacks",
    "augment",
];

const MONITOR: Kind = Kind::Word(&["val_loss", "val_accuracy", "loss", "accuracy"]);

const SGD: &[Param] = &[
    param("lr", Kind::Float, D::Float(0.01)),
    param("momentum", Kind::Float, D::Float(0.0)),
    param("nesterov", Kind::Bool, D::Bool(false)),
    param("weight_decay", Kind::Float, D::Float(0.0)),
];
const ADAM: &[Param] = &[
    param("lr", Kind::Float, D::Float(1e-3)),
    param("beta1", Kind::Float, D::Float(0.9)),
    param("beta2", Kind::Float, D::Float(0.999)),
    param("eps", Kind::Float, D::Float(1e-8)),
    param("weight_decay", Kind::Float, D::Float(0.0)),
];
const ADAMW: &[Param] = &[
    param("lr", Kind::Float, D::Float(1e-3)),
    param("beta1", Kind::Float, D::Float(0.9)),
    param("beta2", Kind::Float, D::Float(0.999)),
    param("eps", Kind::Float, D::Float(1e-8)),
    param("weight_decay", Kind::Float, D::Float(0.01)),
];
const RMSPROP: &[Param] = &[
    param("lr", Kind::Float, D::Float(0.01)),
    param("alpha", Kind::Float, D::Float(0.99)),
    param("eps", Kind::Float, D::Float(1e-8)),
    param("momentum", Kind::Float, D::Float(0.0)),
    param("weight_decay", Kind::Float, D::Float(0.0)),
];
const STEP: &[Param] = &[
    param("every", Kind::Int, D::Required),
    param("gamma", Kind::Float, D::Float(0.1)),
];
const COSINE: &[Param] = &[
    param("warmup", Kind::Int, D::Int(0)),
    param("min_lr", Kind::Float, D::Float(0.0)),
];
const CROSS_ENTROPY: &[Param] = &[param("label_smoothing", Kind::Float, D::Float(0.0))];
const EARLY_STOPPING: &[Param] = &[
    param("monitor", MONITOR, D::Word("val_loss")),
    param("patience", Kind::Int, D::Int(5)),
    param("min_delta", Kind::Float, D::Float(0.0)),
    param("restore_best", Kind::Bool, D::Bool(true)),
];
const CHECKPOINT: &[Param] = &[
    param("monitor", MONITOR, D::Word("val_loss")),
    param(
        "save",
        Kind::Word(&["best", "last", "both"]),
        D::Word("both"),
    ),
];
const REDUCE_LR: &[Param] = &[
    param("monitor", MONITOR, D::Word("val_loss")),
    param("factor", Kind::Float, D::Float(0.1)),
    param("patience", Kind::Int, D::Int(10)),
    param("min_delta", Kind::Float, D::Float(1e-4)),
    param("min_lr", Kind::Float, D::Float(0.0)),
    param("cooldown", Kind::Int, D::Int(0)),
];
const CSV_LOG: &[Param] = &[param("path", Kind::Str, D::Unset)];
const FLIP: &[Param] = &[param("p", Kind::Float, D::Float(0.5))];
const TRANSLATE: &[Param] = &[param("pixels", Kind::Int, D::Int(2))];

/// Builds a training recipe from a `train` section's settings and their
/// evaluated values. Errors are gathered, one per bad setting.
pub fn parse_train(settings: &[(&Setting, Value)]) -> Result<TrainConfig, Vec<Diagnostic>> {
    let mut config = TrainConfig::default();
    let mut errors = Vec::new();
    let mut seen: Vec<&str> = Vec::new();
    for (setting, value) in settings {
        let key = setting.key.name.as_str();
        if seen.contains(&key) {
            errors.push(
                Diagnostic::error(codes::DUPLICATE, format!("`{key}` is set twice"))
                    .primary(setting.key.span.clone(), "set again here"),
            );
            continue;
        }
        seen.push(key);
        if let Err(d) = apply(&mut config, setting, value) {
            errors.push(d);
        }
    }
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

fn apply(config: &mut TrainConfig, setting: &Setting, value: &Value) -> Result<(), Diagnostic> {
    let expr = &setting.value;
    match setting.key.name.as_str() {
        "optimizer" => config.optimizer = optimizer(expr, value)?,
        "schedule" => config.schedule = schedule(expr, value)?,
        "loss" => config.loss = loss(expr, value)?,
        "batch_size" => config.batch_size = count(expr, value, "batch_size", 1)?,
        "epochs" => config.epochs = count(expr, value, "epochs", 1)?,
        "seed" => config.seed = count(expr, value, "seed", 0)? as u64,
        "callbacks" => {
            config.callbacks = list(expr, value)
                .into_iter()
                .map(|(e, v)| callback(e, v))
                .collect::<Result<_, _>>()?
        }
        "augment" => {
            config.augment = list(expr, value)
                .into_iter()
                .map(|(e, v)| augment(e, v))
                .collect::<Result<_, _>>()?
        }
        other => {
            let mut d = Diagnostic::error(
                codes::BAD_TRAIN_SETTING,
                format!("unknown training setting `{other}`"),
            )
            .primary(setting.key.span.clone(), "unknown setting");
            d = match suggest(other, KEYS.iter().copied()) {
                Some(close) => d.help(format!("did you mean `{close}`?")),
                None => d.note(format!("settings are {}", quote_list(KEYS))),
            };
            return Err(d);
        }
    }
    Ok(())
}

/// Rejects a setting outside its valid range.
fn ensure(ok: bool, expr: &Expr, message: String) -> Result<(), Diagnostic> {
    if ok {
        Ok(())
    } else {
        Err(Diagnostic::error(codes::BAD_TRAIN_SETTING, message)
            .primary(expr.span.clone(), "invalid value"))
    }
}

/// Checks the ranges shared by several settings, by name.
fn check_ranges(what: &str, expr: &Expr, a: &Args) -> Result<(), Diagnostic> {
    let nonnegative_ints = ["patience", "warmup", "cooldown", "pixels"];
    for key in nonnegative_ints {
        if let Some(v) = a.get(key).and_then(Value::as_i64) {
            ensure(
                v >= 0,
                expr,
                format!("`{key}` of {what} must not be negative, found {v}"),
            )?;
        }
    }
    for key in [
        "min_delta",
        "min_lr",
        "weight_decay",
        "momentum",
        "label_smoothing",
        "eps",
    ] {
        if let Some(v) = a.get(key).and_then(Value::as_f64) {
            ensure(
                v >= 0.0,
                expr,
                format!("`{key}` of {what} must not be negative, found {v}"),
            )?;
        }
    }
    for key in ["p", "beta1", "beta2", "alpha", "label_smoothing"] {
        if let Some(v) = a.get(key).and_then(Value::as_f64) {
            ensure(
                (0.0..=1.0).contains(&v),
                expr,
                format!("`{key}` of {what} must be between 0 and 1, found {v}"),
            )?;
        }
    }
    if let Some(v) = a.get("every").and_then(Value::as_i64) {
        ensure(
            v >= 1,
            expr,
            format!("`every` of {what} must be at least 1, found {v}"),
        )?;
    }
    if let Some(v) = a.get("gamma").and_then(Value::as_f64) {
        ensure(
            v > 0.0,
            expr,
            format!("`gamma` of {what} must be positive, found {v}"),
        )?;
    }
    if let Some(v) = a.get("factor").and_then(Value::as_f64) {
        ensure(
            v > 0.0 && v < 1.0,
            expr,
            format!("`factor` of {what} must be between 0 and 1, found {v}"),
        )?;
    }
    Ok(())
}

fn count(expr: &Expr, value: &Value, key: &str, min: i64) -> Result<usize, Diagnostic> {
    if let Value::Word(word) = value {
        return Err(Diagnostic::error(
            codes::UNKNOWN_HPARAM,
            format!("unknown hyperparameter `{word}`"),
        )
        .primary(
            expr.span.clone(),
            "not a number or a declared hyperparameter",
        )
        .help(format!(
            "declare it in the model's `search` section, or write a number for `{key}`"
        )));
    }
    match value.as_i64() {
        Some(n) if n >= min => Ok(n as usize),
        _ => Err(Diagnostic::error(
            codes::BAD_TRAIN_SETTING,
            format!("`{key}` must be an integer of at least {min}, found {value}"),
        )
        .primary(expr.span.clone(), "invalid value")),
    }
}

/// Returns the items of a list setting with their source expressions; a single
/// value counts as a list of one.
fn list<'a>(expr: &'a Expr, value: &'a Value) -> Vec<(&'a Expr, &'a Value)> {
    match (&expr.kind, value) {
        (ExprKind::List(exprs), Value::List(values)) => exprs.iter().zip(values).collect(),
        _ => vec![(expr, value)],
    }
}

/// Arguments of a call value: keyword (or `None`) and value.
type CallArgs = Vec<(Option<String>, Value)>;

/// Splits a setting into the name it calls and its bound arguments, checked
/// against the table of that name in `choices`.
fn call_of<'t>(
    what: &str,
    expr: &Expr,
    value: &Value,
    choices: &[(&'t str, &'t [Param])],
) -> Result<(&'t str, Args), Diagnostic> {
    let (name, ast_call, values): (&str, Option<&Call>, CallArgs) = match (value, &expr.kind) {
        (Value::Word(w), _) => (w, None, Vec::new()),
        (Value::Call(c), ExprKind::Call(call)) => (&c.name, Some(call), c.args.clone()),
        _ => {
            return Err(Diagnostic::error(
                codes::BAD_TRAIN_SETTING,
                format!(
                    "invalid {what}: expected a name or a call, found {}",
                    value.kind_name()
                ),
            )
            .primary(expr.span.clone(), "invalid value"))
        }
    };
    let names: Vec<&str> = choices.iter().map(|(n, _)| *n).collect();
    let Some((name, table)) = choices.iter().find(|(n, _)| *n == name) else {
        let span = ast_call.map_or(expr.span.clone(), |c| c.callee.span.clone());
        let mut d = Diagnostic::error(codes::BAD_TRAIN_SETTING, format!("unknown {what} `{name}`"))
            .primary(span, format!("not a known {what}"));
        d = match suggest(name, names.iter().copied()) {
            Some(close) => d.help(format!("did you mean `{close}`?")),
            None => d.note(format!("known: {}", quote_list(&names))),
        };
        return Err(d);
    };
    if let Some((None, _)) = values.iter().find(|(k, _)| k.is_none()) {
        return Err(Diagnostic::error(
            codes::BAD_TRAIN_SETTING,
            format!("`{name}` takes its settings by name, as in `{name}(lr = 0.1)`"),
        )
        .primary(expr.span.clone(), "positional argument"));
    }
    let pairs: Vec<(String, Value)> = values
        .into_iter()
        .filter_map(|(k, v)| k.map(|k| (k, v)))
        .collect();
    let bound = bind(table, &pairs).map(|args| (*name, args)).map_err(|e| {
        let Some(call) = ast_call else {
            // A bare name such as `step` binds no arguments, so only a
            // required one can be missing.
            let missing = match e {
                super::args::BindError::Missing { name: missing } => missing,
                _ => "an argument",
            };
            return Diagnostic::error(
                codes::MISSING_ARGUMENT,
                format!("missing argument `{missing}` for {what} `{name}`"),
            )
            .primary(expr.span.clone(), format!("`{missing}` is required"))
            .help(format!("write `{name}({missing} = ...)`"));
        };
        let keywords: Vec<KeywordArg> = call
            .keywords()
            .zip(&pairs)
            .map(|((key, expr), (_, value))| KeywordArg {
                key,
                expr,
                value: value.clone(),
            })
            .collect();
        bind_error(what, call, table, &keywords, e)
    })?;
    check_ranges(&format!("`{name}`"), expr, &bound.1)?;
    Ok(bound)
}

fn optimizer(expr: &Expr, value: &Value) -> Result<Optimizer, Diagnostic> {
    let choices = [
        ("sgd", SGD),
        ("adam", ADAM),
        ("adamw", ADAMW),
        ("rmsprop", RMSPROP),
    ];
    let (name, a) = call_of("optimizer", expr, value, &choices)?;
    let lr = a.float("lr");
    if lr <= 0.0 {
        return Err(Diagnostic::error(
            codes::BAD_TRAIN_SETTING,
            format!("learning rate must be positive, found {lr}"),
        )
        .primary(expr.span.clone(), "invalid learning rate"));
    }
    Ok(match name {
        "sgd" => Optimizer::Sgd {
            lr,
            momentum: a.float("momentum"),
            nesterov: a.bool("nesterov"),
            weight_decay: a.float("weight_decay"),
        },
        "adam" | "adamw" => {
            let (beta1, beta2, eps, weight_decay) = (
                a.float("beta1"),
                a.float("beta2"),
                a.float("eps"),
                a.float("weight_decay"),
            );
            if name == "adam" {
                Optimizer::Adam {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                }
            } else {
                Optimizer::AdamW {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                }
            }
        }
        _ => Optimizer::RmsProp {
            lr,
            alpha: a.float("alpha"),
            eps: a.float("eps"),
            momentum: a.float("momentum"),
            weight_decay: a.float("weight_decay"),
        },
    })
}

fn schedule(expr: &Expr, value: &Value) -> Result<Schedule, Diagnostic> {
    let choices = [("constant", &[][..]), ("step", STEP), ("cosine", COSINE)];
    let (name, a) = call_of("schedule", expr, value, &choices)?;
    Ok(match name {
        "constant" => Schedule::Constant,
        "step" => Schedule::Step {
            every: a.int("every").max(1) as usize,
            gamma: a.float("gamma"),
        },
        _ => Schedule::Cosine {
            warmup: a.int("warmup").max(0) as usize,
            min_lr: a.float("min_lr"),
        },
    })
}

fn loss(expr: &Expr, value: &Value) -> Result<Loss, Diagnostic> {
    let choices = [("cross_entropy", CROSS_ENTROPY), ("mse", &[][..])];
    let (name, a) = call_of("loss", expr, value, &choices)?;
    Ok(match name {
        "cross_entropy" => Loss::CrossEntropy {
            label_smoothing: a.float("label_smoothing"),
        },
        _ => Loss::Mse,
    })
}

fn monitor(args: &Args) -> Monitor {
    match args.word("monitor") {
        "loss" => Monitor::Loss,
        "accuracy" => Monitor::Accuracy,
        "val_accuracy" => Monitor::ValAccuracy,
        _ => Monitor::ValLoss,
    }
}

fn callback(expr: &Expr, value: &Value) -> Result<Callback, Diagnostic> {
    let choices = [
        ("early_stopping", EARLY_STOPPING),
        ("checkpoint", CHECKPOINT),
        ("reduce_lr_on_plateau", REDUCE_LR),
        ("csv_log", CSV_LOG),
    ];
    let (name, a) = call_of("callback", expr, value, &choices)?;
    Ok(match name {
        "early_stopping" => Callback::EarlyStopping {
            monitor: monitor(&a),
            patience: a.int("patience").max(0) as usize,
            min_delta: a.float("min_delta"),
            restore_best: a.bool("restore_best"),
        },
        "checkpoint" => Callback::Checkpoint {
            monitor: monitor(&a),
            save: match a.word("save") {
                "best" => Save::Best,
                "last" => Save::Last,
                _ => Save::Both,
            },
        },
        "reduce_lr_on_plateau" => Callback::ReduceLrOnPlateau {
            monitor: monitor(&a),
            factor: a.float("factor"),
            patience: a.int("patience").max(0) as usize,
            min_delta: a.float("min_delta"),
            min_lr: a.float("min_lr"),
            cooldown: a.int("cooldown").max(0) as usize,
        },
        _ => {
            let path = a.string("path").map(str::to_string);
            if path.as_deref() == Some("") {
                return Err(Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    "`csv_log` needs a file path, found an empty string",
                )
                .primary(expr.span.clone(), "empty `path`")
                .help("write a path such as `path = \"history.csv\"`, or leave `path` out to write `log.csv` in the checkpoint folder"));
            }
            Callback::CsvLog { path }
        }
    })
}

fn augment(expr: &Expr, value: &Value) -> Result<Augment, Diagnostic> {
    let choices = [("flip", FLIP), ("translate", TRANSLATE)];
    let (name, a) = call_of("augmentation", expr, value, &choices)?;
    Ok(match name {
        "flip" => Augment::Flip { p: a.float("p") },
        _ => Augment::Translate {
            pixels: a.int("pixels").max(0) as usize,
        },
    })
}
