//! Reading a `search` section into a [`Space`]: domains, defaults and
//! conditions, each validated on its own.

use super::layers;
use super::space::{self, Condition, Domain, HParam, Space};
use super::value::Value;
use crate::diag::{codes, Diagnostic};
use crate::syntax::ast::{Call, Expr, ExprKind, SearchEntry};

/// Builds the space from a section's entries. `block_names` are the blocks a
/// `choice` may name.
pub fn parse_space(entries: &[&SearchEntry], block_names: &[&str]) -> (Space, Vec<Diagnostic>) {
    let mut space = Space::default();
    let mut errors = Vec::new();
    if let Some(extra) = entries.get(space::MAX_HPARAMS) {
        errors.push(
            Diagnostic::error(
                codes::BAD_DOMAIN,
                format!(
                    "a search space has at most {} hyperparameters",
                    space::MAX_HPARAMS
                ),
            )
            .primary(extra.name.span.clone(), "one too many"),
        );
        return (space, errors);
    }
    let mut failed: Vec<&str> = Vec::new();
    for entry in entries {
        let name = &entry.name.name;
        if let Some(earlier) = space.get(name) {
            errors.push(
                Diagnostic::error(
                    codes::DUPLICATE,
                    format!("hyperparameter `{name}` is declared twice"),
                )
                .primary(entry.name.span.clone(), "declared again here")
                .secondary(earlier.span.clone(), "first declared here"),
            );
            continue;
        }
        let reserved = [
            "true", "false", "same", "valid", "auto", "none", "log", "linear",
        ];
        if reserved.contains(&name.as_str()) {
            errors.push(
                Diagnostic::error(codes::DUPLICATE, format!("`{name}` is a reserved word"))
                    .primary(entry.name.span.clone(), "rename this hyperparameter"),
            );
            continue;
        }
        if layers::find(name).is_some() || block_names.contains(&name.as_str()) {
            errors.push(
                Diagnostic::error(
                    codes::DUPLICATE,
                    format!("hyperparameter `{name}` has the name of a layer or block"),
                )
                .primary(entry.name.span.clone(), "rename this hyperparameter"),
            );
            continue;
        }
        // A condition on a hyperparameter whose own declaration failed adds
        // nothing to that failure.
        let parent_failed = entry
            .condition
            .as_ref()
            .is_some_and(|c| failed.contains(&c.param.name.as_str()));
        match parse_entry(entry, &space, block_names) {
            Ok(hparam) => space.params.push(hparam),
            Err(_) if parent_failed => failed.push(name),
            Err(d) => {
                failed.push(name);
                errors.push(d);
            }
        }
    }
    (space, errors)
}

fn parse_entry(entry: &SearchEntry, space: &Space, blocks: &[&str]) -> Result<HParam, Diagnostic> {
    let call = &entry.domain;
    let domain = match call.callee.name.as_str() {
        "int" => int_domain(call, blocks)?,
        "float" => float_domain(call, blocks)?,
        "choice" => choice_domain(call, blocks)?,
        other => {
            return Err(Diagnostic::error(
                codes::BAD_DOMAIN,
                format!("unknown search domain `{other}`"),
            )
            .primary(call.callee.span.clone(), "not a domain")
            .help("use `int(low, high)`, `float(low, high)` or `choice(a, b, ...)`"))
        }
    };
    let default = match keyword(call, "default") {
        Some(expr) => {
            let value = constant(expr, blocks)?;
            if !domain.contains(&value) {
                return Err(Diagnostic::error(
                    codes::BAD_DOMAIN,
                    format!("default {value} is outside {domain}"),
                )
                .primary(expr.span.clone(), "not in the domain"));
            }
            value
        }
        None => domain.visited_values()[0].clone(),
    };
    let condition = match &entry.condition {
        Some(c) => Some(parse_condition(c, space, blocks)?),
        None => None,
    };
    Ok(HParam {
        name: entry.name.name.clone(),
        span: entry.name.span.clone(),
        domain,
        condition,
        default,
    })
}

fn parse_condition(
    c: &crate::syntax::ast::Condition,
    space: &Space,
    blocks: &[&str],
) -> Result<Condition, Diagnostic> {
    let Some(parent) = space.get(&c.param.name) else {
        return Err(Diagnostic::error(
            codes::BAD_CONDITION,
            format!(
                "condition on `{}`, which is not declared above",
                c.param.name
            ),
        )
        .primary(c.param.span.clone(), "not declared before this line")
        .help("declare the hyperparameter a condition tests before the ones that depend on it"));
    };
    let mut values = Vec::new();
    for expr in &c.values {
        let value = constant(expr, blocks)?;
        if !parent.domain.contains(&value) {
            return Err(Diagnostic::error(
                codes::BAD_CONDITION,
                format!("`{}` never takes the value {value}", c.param.name),
            )
            .primary(expr.span.clone(), format!("not in {}", parent.domain))
            .secondary(parent.span.clone(), "declared here"));
        }
        values.push(value);
    }
    Ok(Condition {
        param: c.param.name.clone(),
        values,
        span: c.span.clone(),
    })
}

fn keyword<'a>(call: &'a Call, name: &str) -> Option<&'a Expr> {
    call.keywords()
        .find(|(k, _)| k.name == name)
        .map(|(_, e)| e)
}

/// Rejects keywords that a domain does not take.
fn check_keywords(call: &Call, allowed: &[&str]) -> Result<(), Diagnostic> {
    for (key, _) in call.keywords() {
        if !allowed.contains(&key.name.as_str()) {
            return Err(Diagnostic::error(
                codes::UNKNOWN_ARGUMENT,
                format!("unknown argument `{}` for `{}`", key.name, call.callee.name),
            )
            .primary(key.span.clone(), "unknown argument")
            .note(format!(
                "`{}` takes {}",
                call.callee.name,
                allowed.join(", ")
            )));
        }
    }
    Ok(())
}

/// The two bounds and the log flag of `int(...)` and `float(...)`: two
/// positional numbers, then optionally the word `log` or `linear`.
fn bounds<'a>(call: &'a Call, blocks: &[&str]) -> Result<(&'a Expr, &'a Expr, bool), Diagnostic> {
    let positional: Vec<&Expr> = call.positional().collect();
    let (low, high, scale) = match positional[..] {
        [low, high] => (low, high, None),
        [low, high, scale] => (low, high, Some(scale)),
        _ => {
            return Err(Diagnostic::error(
                codes::BAD_DOMAIN,
                format!("`{}` takes a low and a high bound", call.callee.name),
            )
            .primary(
                call.span.clone(),
                format!("found {} positional arguments", positional.len()),
            )
            .help(format!(
                "write `{}(low, high)`, optionally followed by `log`",
                call.callee.name
            )))
        }
    };
    let mut log = match scale.map(|s| constant(s, blocks)).transpose()? {
        None => false,
        Some(Value::Word(w)) if w == "log" => true,
        Some(Value::Word(w)) if w == "linear" => false,
        Some(other) => {
            let mut diagnostic = Diagnostic::error(
                codes::BAD_DOMAIN,
                format!("invalid scale `{other}`: expected `log` or `linear`"),
            )
            .primary(
                scale.map_or(call.span.clone(), |s| s.span.clone()),
                "invalid scale",
            );
            // KerasTuner and Optuna take the step as the third positional
            // argument; here it is a keyword.
            if matches!(other, Value::Int(_) | Value::Float(_)) {
                diagnostic = diagnostic.help(format!(
                    "a step is a keyword argument: `{}(low, high, step = {other})`",
                    call.callee.name
                ));
            }
            return Err(diagnostic);
        }
    };
    if let Some(expr) = keyword(call, "log") {
        log = match constant(expr, blocks)? {
            Value::Bool(b) => b,
            other => {
                return Err(Diagnostic::error(
                    codes::BAD_DOMAIN,
                    format!("`log` must be `true` or `false`, found {other}"),
                )
                .primary(expr.span.clone(), "invalid value"))
            }
        };
    }
    Ok((low, high, log))
}

fn reversed(call: &Call, low: &Expr, high: &Expr, lo: &Value, hi: &Value) -> Diagnostic {
    Diagnostic::error(
        codes::BAD_RANGE,
        format!(
            "empty range: `{}({lo}, {hi})` has its low bound above its high bound",
            call.callee.name
        ),
    )
    .primary(low.span.start..high.span.end, "low > high")
    .help(format!(
        "swap the bounds: `{}({hi}, {lo})`",
        call.callee.name
    ))
}

fn int_domain(call: &Call, blocks: &[&str]) -> Result<Domain, Diagnostic> {
    check_keywords(call, &["step", "log", "default"])?;
    let (low_expr, high_expr, log) = bounds(call, blocks)?;
    let low = integer(low_expr, blocks)?;
    let high = integer(high_expr, blocks)?;
    if low > high {
        return Err(reversed(
            call,
            low_expr,
            high_expr,
            &Value::Int(low),
            &Value::Int(high),
        ));
    }
    let step = match keyword(call, "step") {
        Some(expr) => integer(expr, blocks)?,
        None => 1,
    };
    if step <= 0 {
        let span = keyword(call, "step").map_or(call.span.clone(), |e| e.span.clone());
        return Err(Diagnostic::error(
            codes::BAD_DOMAIN,
            format!("`step` must be positive, found {step}"),
        )
        .primary(span, "invalid step"));
    }
    if log && low <= 0 {
        return Err(log_error(low_expr, &Value::Int(low)));
    }
    Ok(Domain::Int {
        low,
        high,
        step,
        log,
    })
}

fn float_domain(call: &Call, blocks: &[&str]) -> Result<Domain, Diagnostic> {
    check_keywords(call, &["step", "log", "default"])?;
    let (low_expr, high_expr, log) = bounds(call, blocks)?;
    let low = number(low_expr, blocks)?;
    let high = number(high_expr, blocks)?;
    if low > high {
        return Err(reversed(
            call,
            low_expr,
            high_expr,
            &Value::Float(low),
            &Value::Float(high),
        ));
    }
    let step = keyword(call, "step")
        .map(|e| number(e, blocks))
        .transpose()?;
    if let Some(step) = step {
        let span = keyword(call, "step").map_or(call.span.clone(), |e| e.span.clone());
        if step <= 0.0 {
            return Err(Diagnostic::error(
                codes::BAD_DOMAIN,
                format!("`step` must be positive, found {step}"),
            )
            .primary(span, "invalid step"));
        }
        if log {
            return Err(Diagnostic::error(
                codes::BAD_DOMAIN,
                "a log-scale range cannot have a `step`",
            )
            .primary(span, "remove the step or the log scale"));
        }
    }
    if log && low <= 0.0 {
        return Err(log_error(low_expr, &Value::Float(low)));
    }
    Ok(Domain::Float {
        low,
        high,
        step,
        log,
    })
}

fn log_error(low: &Expr, value: &Value) -> Diagnostic {
    Diagnostic::error(
        codes::BAD_DOMAIN,
        format!("a log-scale range needs a positive low bound, found {value}"),
    )
    .primary(low.span.clone(), "not positive")
}

fn choice_domain(call: &Call, blocks: &[&str]) -> Result<Domain, Diagnostic> {
    check_keywords(call, &["default"])?;
    let mut options: Vec<Value> = Vec::new();
    for expr in call.positional() {
        let value = constant(expr, blocks)?;
        if options
            .iter()
            .any(|o| super::space::values_equal(o, &value))
        {
            return Err(Diagnostic::error(
                codes::BAD_DOMAIN,
                format!("`{value}` appears twice in `choice`"),
            )
            .primary(expr.span.clone(), "repeated option"));
        }
        options.push(value);
    }
    if options.is_empty() {
        return Err(Diagnostic::error(
            codes::BAD_RANGE,
            "empty `choice`: it needs at least one option",
        )
        .primary(call.span.clone(), "no options"));
    }
    Ok(Domain::Choice(options))
}

fn integer(expr: &Expr, blocks: &[&str]) -> Result<i64, Diagnostic> {
    let value = constant(expr, blocks)?;
    value.as_i64().ok_or_else(|| {
        Diagnostic::error(
            codes::BAD_DOMAIN,
            format!("expected an integer, found {value}"),
        )
        .primary(expr.span.clone(), "not an integer")
    })
}

fn number(expr: &Expr, blocks: &[&str]) -> Result<f64, Diagnostic> {
    let value = constant(expr, blocks)?;
    value.as_f64().filter(|v| v.is_finite()).ok_or_else(|| {
        Diagnostic::error(
            codes::BAD_DOMAIN,
            format!("expected a number, found {value}"),
        )
        .primary(expr.span.clone(), "not a number")
    })
}

/// Evaluates a literal in a search domain: a number, a string, or a name
/// (a block, `true`/`false`, or a word such as `relu`).
fn constant(expr: &Expr, blocks: &[&str]) -> Result<Value, Diagnostic> {
    match &expr.kind {
        ExprKind::Number { value, integer } if *integer && value.abs() < 9.0e15 => {
            Ok(Value::Int(*value as i64))
        }
        ExprKind::Number { value, .. } => Ok(Value::Float(*value)),
        ExprKind::Str(s) => Ok(Value::Str(s.clone())),
        ExprKind::Name(n) if n == "true" => Ok(Value::Bool(true)),
        ExprKind::Name(n) if n == "false" => Ok(Value::Bool(false)),
        ExprKind::Name(n) if blocks.contains(&n.as_str()) => Ok(Value::Block(n.clone())),
        ExprKind::Name(n) => Ok(Value::Word(n.clone())),
        ExprKind::Neg(inner) => match constant(inner, blocks)? {
            Value::Int(i) => Ok(i
                .checked_neg()
                .map_or(Value::Float(-(i as f64)), Value::Int)),
            Value::Float(f) => Ok(Value::Float(-f)),
            other => Err(
                Diagnostic::error(codes::BAD_DOMAIN, format!("cannot negate {other}"))
                    .primary(expr.span.clone(), "not a number"),
            ),
        },
        _ => Err(Diagnostic::error(
            codes::BAD_DOMAIN,
            "search domains take literal numbers, strings and names",
        )
        .primary(expr.span.clone(), "not a literal")),
    }
}
