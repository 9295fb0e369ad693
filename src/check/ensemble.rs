//! Ensemble items: which models of the file to train and pool, or which
//! trials of a study to pool, and the rule that combines them, validated
//! into an [`EnsembleSpec`].
//!
//! Settings are literals: an ensemble has no search space, so names in it
//! are models, rules or `true` and `false`, never hyperparameters.

use super::args::suggest;
use super::errors::quote_list;
use super::ModelReport;
use crate::diag::{codes, Diagnostic, Span};
use crate::ensemble::Rule;
use crate::syntax::ast::{self, Call, Expr, ExprKind};

const SETTINGS: &[&str] = &["members", "rule", "bootstrap"];
const MEMBER_ARGS: &[&str] = &["seed", "bootstrap"];
const RULES: &[&str] = &["mean", "logits", "vote"];

/// The largest member count `seeds` and `top` accept. Every member is a
/// full training run, so a larger count is a typo, and the checker builds
/// one entry per member.
const MAX_MEMBERS: i64 = 1024;

/// A checked ensemble item.
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleSpec {
    pub name: String,
    pub members: Members,
    pub rule: Rule,
}

/// The source of an ensemble's members.
#[derive(Debug, Clone, PartialEq)]
pub enum Members {
    /// Models of the file that `kiln train` trains, in order.
    Trained(Vec<MemberSpec>),
    /// The `top` best complete trials of a study database, already trained.
    StudyTop { study: String, top: usize },
}

/// One model of the file to train as a member, at its default point.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberSpec {
    pub model: String,
    /// The member's training seed: the one written in the item, else the
    /// model's own `seed`.
    pub seed: u64,
    /// Whether the member trains on a bootstrap resample of the training
    /// data.
    pub bootstrap: bool,
}

/// The result of checking one ensemble item; `spec` is `None` when the
/// item has errors.
#[derive(Debug, Clone)]
pub struct EnsembleReport {
    pub name: String,
    pub spec: Option<EnsembleSpec>,
}

/// Returns the word that selects `rule` in an ensemble item and in `--rule`.
pub fn rule_word(rule: Rule) -> &'static str {
    match rule {
        Rule::MeanProbability => "mean",
        Rule::MeanLogits => "logits",
        Rule::Vote => "vote",
    }
}

/// A member as read from the source, with the span that diagnostics about
/// it point at.
struct Parsed {
    spec: MemberSpec,
    span: Span,
}

/// The settings of an item. [`read_settings`] keeps the first of a setting
/// given twice and reports the second.
#[derive(Default)]
struct Settings<'a> {
    members: Option<&'a Expr>,
    rule: Option<&'a Expr>,
    bootstrap: Option<&'a Expr>,
}

/// The names that a member may refer to.
pub struct Scope<'a> {
    /// The file's checked models.
    pub models: &'a [ModelReport],
    /// The names of the file's ensemble items, which are not valid members
    /// but get a clearer error than an unknown name.
    pub ensembles: Vec<&'a str>,
}

/// Checks an ensemble item against the file's checked models.
pub fn check_ensemble(item: &ast::Ensemble, scope: &Scope) -> (EnsembleReport, Vec<Diagnostic>) {
    let mut errors = Vec::new();
    let settings = read_settings(item, &mut errors);

    let rule = match settings.rule {
        Some(expr) => rule(expr, &mut errors),
        None => Some(Rule::MeanProbability),
    };
    let bootstrap = match settings.bootstrap {
        Some(expr) => boolean(expr, "bootstrap", &mut errors).unwrap_or(false),
        None => false,
    };

    let members = match settings.members {
        Some(expr) => members(expr, bootstrap, scope, &mut errors),
        None => {
            errors.push(
                Diagnostic::error(
                    codes::MISSING_DECLARATION,
                    format!("ensemble `{}` has no `members`", item.name.name),
                )
                .primary(item.name.span.clone(), "in this ensemble")
                .help("add `members = [model_a, model_b]`"),
            );
            None
        }
    };
    if let (Some(Members::StudyTop { .. }), Some(expr)) = (&members, settings.bootstrap) {
        errors.push(
            Diagnostic::error(
                codes::BAD_ENSEMBLE,
                "`bootstrap` applies only to members that kiln trains",
            )
            .primary(expr.span.clone(), "a study's trials are already trained")
            .help("remove `bootstrap`, or list models of the file as members"),
        );
    }

    let spec = match (members, rule) {
        (Some(members), Some(rule)) if errors.is_empty() => Some(EnsembleSpec {
            name: item.name.name.clone(),
            members,
            rule,
        }),
        _ => None,
    };
    let report = EnsembleReport {
        name: item.name.name.clone(),
        spec,
    };
    (report, errors)
}

fn read_settings<'a>(item: &'a ast::Ensemble, errors: &mut Vec<Diagnostic>) -> Settings<'a> {
    let mut settings = Settings::default();
    let mut seen: Vec<&ast::Ident> = Vec::new();
    for setting in &item.settings {
        let key = &setting.key;
        if let Some(first) = seen.iter().find(|k| k.name == key.name) {
            errors.push(
                Diagnostic::error(codes::DUPLICATE, format!("`{}` is set twice", key.name))
                    .primary(key.span.clone(), "set again here")
                    .secondary(first.span.clone(), "first set here"),
            );
            continue;
        }
        seen.push(key);
        let slot = match key.name.as_str() {
            "members" => &mut settings.members,
            "rule" => &mut settings.rule,
            "bootstrap" => &mut settings.bootstrap,
            other => {
                errors.push(unknown_setting(other, key.span.clone()));
                continue;
            }
        };
        *slot = Some(&setting.value);
    }
    settings
}

fn unknown_setting(name: &str, span: Span) -> Diagnostic {
    let d = Diagnostic::error(
        codes::BAD_ENSEMBLE,
        format!("unknown ensemble setting `{name}`"),
    )
    .primary(span, "unknown setting");
    match suggest(name, SETTINGS.iter().copied()) {
        Some(close) => d.help(format!("did you mean `{close}`?")),
        None => d.note(format!("settings are {}", quote_list(SETTINGS))),
    }
}

fn rule(expr: &Expr, errors: &mut Vec<Diagnostic>) -> Option<Rule> {
    let word = match &expr.kind {
        ExprKind::Name(word) => word.as_str(),
        _ => "",
    };
    match word {
        "mean" => return Some(Rule::MeanProbability),
        "logits" => return Some(Rule::MeanLogits),
        "vote" => return Some(Rule::Vote),
        _ => {}
    }
    let message = match word {
        "" => "invalid ensemble rule".to_string(),
        _ => format!("unknown ensemble rule `{word}`"),
    };
    let mut d = Diagnostic::error(codes::BAD_ENSEMBLE, message)
        .primary(expr.span.clone(), "unknown rule")
        .note(format!("rules are {}", quote_list(RULES)));
    if let Some(close) = suggest(word, RULES.iter().copied()) {
        d = d.help(format!("did you mean `{close}`?"));
    }
    errors.push(d);
    None
}

fn boolean(expr: &Expr, key: &str, errors: &mut Vec<Diagnostic>) -> Option<bool> {
    match &expr.kind {
        ExprKind::Name(word) if word == "true" => Some(true),
        ExprKind::Name(word) if word == "false" => Some(false),
        _ => {
            errors.push(
                Diagnostic::error(
                    codes::BAD_ENSEMBLE,
                    format!("`{key}` must be `true` or `false`"),
                )
                .primary(expr.span.clone(), "invalid value"),
            );
            None
        }
    }
}

/// Returns the integer a literal denotes: a whole number, possibly negated
/// or written as a float without a fractional part (`1e3`).
fn literal_int(expr: &Expr) -> Option<i64> {
    match &expr.kind {
        ExprKind::Number { value, .. }
            if value.is_finite() && value.fract() == 0.0 && value.abs() < 1e15 =>
        {
            Some(*value as i64)
        }
        ExprKind::Neg(inner) => literal_int(inner).map(|v| -v),
        _ => None,
    }
}

/// Reads an integer from `min` to `max`, or reports why the literal is not
/// one.
fn integer(
    expr: &Expr,
    what: &str,
    (min, max): (i64, i64),
    errors: &mut Vec<Diagnostic>,
) -> Option<i64> {
    match literal_int(expr) {
        Some(v) if (min..=max).contains(&v) => Some(v),
        Some(v) if v > max => {
            errors.push(
                Diagnostic::error(codes::BAD_ENSEMBLE, format!("{what} must be at most {max}"))
                    .primary(expr.span.clone(), format!("found {v}")),
            );
            None
        }
        found => {
            let found =
                found.map_or_else(|| "not an integer".to_string(), |v| format!("found {v}"));
            let bound = match min {
                0 => "a non-negative integer".to_string(),
                1 => "a positive integer".to_string(),
                _ => format!("an integer of at least {min}"),
            };
            errors.push(
                Diagnostic::error(codes::BAD_ENSEMBLE, format!("{what} must be {bound}"))
                    .primary(expr.span.clone(), found),
            );
            None
        }
    }
}

/// Reads the `members` setting and checks the members against each other.
fn members(
    expr: &Expr,
    bootstrap: bool,
    scope: &Scope,
    errors: &mut Vec<Diagnostic>,
) -> Option<Members> {
    let before = errors.len();
    let parsed = match &expr.kind {
        ExprKind::List(items) => items
            .iter()
            .filter_map(|item| member(item, bootstrap, scope, errors))
            .collect(),
        ExprKind::Call(call) if call.callee.name == "seeds" => {
            seeds(call, bootstrap, scope, errors)?
        }
        ExprKind::Call(call) if call.callee.name == "top" => return study_top(call, errors),
        _ => {
            errors.push(
                Diagnostic::error(codes::BAD_ENSEMBLE, "invalid `members`")
                    .primary(expr.span.clone(), "expected a list of models")
                    .help(
                        "write `[model_a, model_b(seed = 2)]`, `seeds(MODEL, K)` or `top(K, study = \"FILE\")`",
                    ),
            );
            return None;
        }
    };
    if errors.len() > before {
        return None;
    }

    check_count(expr, parsed.len(), errors);
    check_duplicates(&parsed, errors);
    check_shapes(&parsed, scope.models, errors);
    let specs = parsed.into_iter().map(|p| p.spec).collect();
    Some(Members::Trained(specs))
}

/// Reads one list item: `model` or `model(seed = N, bootstrap = B)`.
fn member(
    item: &Expr,
    bootstrap: bool,
    scope: &Scope,
    errors: &mut Vec<Diagnostic>,
) -> Option<Parsed> {
    let (name, name_span, call) = match &item.kind {
        ExprKind::Name(name) => (name.as_str(), item.span.clone(), None),
        ExprKind::Call(call) => (
            call.callee.name.as_str(),
            call.callee.span.clone(),
            Some(call),
        ),
        _ => {
            errors.push(
                Diagnostic::error(codes::BAD_ENSEMBLE, "a member is a model of the file")
                    .primary(item.span.clone(), "not a model name")
                    .help("write `model_name` or `model_name(seed = 2)`"),
            );
            return None;
        }
    };
    let report = find_model(name, name_span, scope, errors)?;
    let mut spec = MemberSpec {
        model: name.to_string(),
        seed: model_seed(report),
        bootstrap,
    };
    if let Some(call) = call {
        member_args(call, &mut spec, errors)?;
    }
    Some(Parsed {
        spec,
        span: item.span.clone(),
    })
}

/// Applies `seed = N` and `bootstrap = B` of a member call.
fn member_args(call: &Call, spec: &mut MemberSpec, errors: &mut Vec<Diagnostic>) -> Option<()> {
    if let Some(arg) = call.positional().next() {
        errors.push(
            Diagnostic::error(
                codes::INVALID_ARGUMENT,
                format!(
                    "a member takes keyword arguments only, as `{}(seed = 2)`",
                    spec.model
                ),
            )
            .primary(arg.span.clone(), "positional argument"),
        );
        return None;
    }
    let mut ok = true;
    for (key, value) in call.keywords() {
        match key.name.as_str() {
            "seed" => match integer(value, "`seed`", (0, i64::MAX), errors) {
                Some(seed) => spec.seed = seed as u64,
                None => ok = false,
            },
            "bootstrap" => match boolean(value, "bootstrap", errors) {
                Some(b) => spec.bootstrap = b,
                None => ok = false,
            },
            other => {
                let mut d = Diagnostic::error(
                    codes::UNKNOWN_ARGUMENT,
                    format!("unknown argument `{other}` for member `{}`", spec.model),
                )
                .primary(key.span.clone(), "unknown argument");
                d = match suggest(other, MEMBER_ARGS.iter().copied()) {
                    Some(close) => d.help(format!("did you mean `{close}`?")),
                    None => d.note(format!("a member takes {}", quote_list(MEMBER_ARGS))),
                };
                errors.push(d);
                ok = false;
            }
        }
    }
    ok.then_some(())
}

/// Reads `seeds(MODEL, K)`: K members of one model with seeds 1 to K.
fn seeds(
    call: &Call,
    bootstrap: bool,
    scope: &Scope,
    errors: &mut Vec<Diagnostic>,
) -> Option<Vec<Parsed>> {
    let positional: Vec<&Expr> = call.positional().collect();
    let ([model, count], None) = (positional.as_slice(), call.keywords().next()) else {
        errors.push(
            Diagnostic::error(codes::INVALID_ARGUMENT, "`seeds` takes a model and a count")
                .primary(call.span.clone(), "expected `seeds(MODEL, K)`"),
        );
        return None;
    };
    let ExprKind::Name(name) = &model.kind else {
        errors.push(
            Diagnostic::error(
                codes::BAD_ENSEMBLE,
                "the first argument of `seeds` is a model",
            )
            .primary(model.span.clone(), "not a model name"),
        );
        return None;
    };
    let found = find_model(name, model.span.clone(), scope, errors);
    let count = integer(count, "the member count `K`", (1, MAX_MEMBERS), errors)?;
    found?;
    let members = (1..=count as u64)
        .map(|seed| Parsed {
            spec: MemberSpec {
                model: name.clone(),
                seed,
                bootstrap,
            },
            span: call.span.clone(),
        })
        .collect();
    Some(members)
}

/// Reads `top(K, study = "FILE")`.
fn study_top(call: &Call, errors: &mut Vec<Diagnostic>) -> Option<Members> {
    let positional: Vec<&Expr> = call.positional().collect();
    let keywords: Vec<_> = call.keywords().collect();
    let study = match keywords.as_slice() {
        [(key, value)] if key.name == "study" => match &value.kind {
            ExprKind::Str(path) => Some(path.clone()),
            _ => None,
        },
        _ => None,
    };
    let ([count], Some(study)) = (positional.as_slice(), study) else {
        errors.push(
            Diagnostic::error(
                codes::INVALID_ARGUMENT,
                "`top` takes a count and a study file",
            )
            .primary(call.span.clone(), "expected `top(K, study = \"FILE\")`"),
        );
        return None;
    };
    let top = integer(count, "the member count `K`", (1, MAX_MEMBERS), errors)?;
    check_count_of(count.span.clone(), top as usize, errors);
    Some(Members::StudyTop {
        study,
        top: top as usize,
    })
}

/// Looks up a member's model, suggesting a close name when it is unknown.
fn find_model<'a>(
    name: &str,
    span: Span,
    scope: &Scope<'a>,
    errors: &mut Vec<Diagnostic>,
) -> Option<&'a ModelReport> {
    if let Some(report) = scope.models.iter().find(|m| m.name == name) {
        return Some(report);
    }
    let names: Vec<&str> = scope.models.iter().map(|m| m.name.as_str()).collect();
    let mut d = Diagnostic::error(codes::UNKNOWN_MODEL, format!("unknown model `{name}`"))
        .primary(span, "no model of this name in the file");
    if scope.ensembles.contains(&name) {
        d = d.note(format!("`{name}` is an ensemble; members must be models"));
    }
    d = match suggest(name, names.iter().copied()) {
        Some(close) => d.help(format!("did you mean `{close}`?")),
        None if names.is_empty() => d.note("the file declares no model"),
        None => d.note(format!("the file declares {}", quote_list(&names))),
    };
    errors.push(d);
    None
}

/// Returns the `seed` of a model's `train` section, or 0 when the model is
/// invalid, because its own errors are reported already.
fn model_seed(report: &ModelReport) -> u64 {
    report.instance.as_ref().map_or(0, |i| i.train.seed)
}

fn check_count(expr: &Expr, count: usize, errors: &mut Vec<Diagnostic>) {
    check_count_of(expr.span.clone(), count, errors);
}

fn check_count_of(span: Span, count: usize, errors: &mut Vec<Diagnostic>) {
    if count >= 2 {
        return;
    }
    errors.push(
        Diagnostic::error(
            codes::BAD_ENSEMBLE,
            format!("an ensemble needs at least 2 members, found {count}"),
        )
        .primary(span, "too few members")
        .help("add members, or train the model on its own with `kiln train`"),
    );
}

/// Reports members with the same model, seed and bootstrap setting: they
/// would train to the same weights and only repeat one vote.
fn check_duplicates(parsed: &[Parsed], errors: &mut Vec<Diagnostic>) {
    for (i, member) in parsed.iter().enumerate() {
        let Some(first) = parsed[..i].iter().find(|p| p.spec == member.spec) else {
            continue;
        };
        errors.push(
            Diagnostic::error(
                codes::DUPLICATE,
                format!(
                    "member `{}` with seed {} is listed twice",
                    member.spec.model, member.spec.seed
                ),
            )
            .primary(member.span.clone(), "listed again here")
            .secondary(first.span.clone(), "first listed here")
            .note("identical members train to identical weights")
            .help("give each member its own `seed`"),
        );
    }
}

/// Values per input sample and number of classes of a checked model.
fn io_size(report: &ModelReport) -> Option<(Vec<usize>, usize)> {
    let graph = &report.instance.as_ref()?.graph;
    let input = graph.node(graph.inputs.first()?.1).shape.0.clone();
    let output = graph.node(graph.output?).shape.0.iter().product();
    Some((input, output))
}

/// Reports members that read a different number of values per sample or
/// predict a different number of classes than the first member.
///
/// Shapes may differ as long as the sizes agree, because members read the
/// same raw rows: an `[64]` input and a `[1, 8, 8]` input both take 64
/// values per sample.
fn check_shapes(parsed: &[Parsed], models: &[ModelReport], errors: &mut Vec<Diagnostic>) {
    let size = |p: &Parsed| {
        models
            .iter()
            .find(|m| m.name == p.spec.model)
            .and_then(io_size)
    };
    let Some((first, (first_input, first_classes))) =
        parsed.iter().find_map(|p| size(p).map(|s| (p, s)))
    else {
        return;
    };
    let first_values: usize = first_input.iter().product();
    for member in parsed {
        let Some((input, classes)) = size(member) else {
            continue;
        };
        let values: usize = input.iter().product();
        if values == first_values && classes == first_classes {
            continue;
        }
        errors.push(
            Diagnostic::error(
                codes::ENSEMBLE_SHAPE,
                format!(
                    "member `{}` does not fit the ensemble: it takes {input:?} and predicts {classes} classes",
                    member.spec.model
                ),
            )
            .primary(
                member.span.clone(),
                format!("takes {input:?}, predicts {classes} classes"),
            )
            .secondary(
                first.span.clone(),
                format!("takes {first_input:?}, predicts {first_classes} classes"),
            )
            .note("members must read the same number of values per sample and predict the same classes"),
        );
    }
}
