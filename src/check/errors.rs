//! Conversion of shape-rule and argument-binding failures into diagnostics
//! with spans.

use super::args::{suggest, BindError, Kind, Param};
use super::layers::LayerError;
use super::value::Value;
use crate::diag::{codes, Diagnostic, Span};
use crate::syntax::ast::{Call, Expr, Ident};

/// A keyword argument as the checker evaluates it: its name, where it was
/// written, and its value.
pub struct KeywordArg<'a> {
    pub key: &'a Ident,
    pub expr: &'a Expr,
    pub value: Value,
}

/// Reports why `call`'s keyword arguments do not fit `table`.
pub fn bind_error(
    what: &str,
    call: &Call,
    table: &[Param],
    keywords: &[KeywordArg],
    error: BindError,
) -> Diagnostic {
    let callee = &call.callee.name;
    match error {
        BindError::Unknown { index } => {
            let key = keywords[index].key;
            let names: Vec<&str> = table.iter().map(|p| p.name).collect();
            let mut d = Diagnostic::error(
                codes::UNKNOWN_ARGUMENT,
                format!("unknown argument `{}` for {what} `{callee}`", key.name),
            )
            .primary(key.span.clone(), "unknown argument");
            if let Some(close) = suggest(&key.name, names.iter().copied()) {
                d = d.help(format!("did you mean `{close}`?"));
            } else if names.is_empty() {
                d = d.note(format!("`{callee}` takes no arguments"));
            } else {
                d = d.note(format!("`{callee}` takes {}", quote_list(&names)));
            }
            d
        }
        BindError::Missing { name } => Diagnostic::error(
            codes::MISSING_ARGUMENT,
            format!("missing argument `{name}` for {what} `{callee}`"),
        )
        .primary(call.span.clone(), format!("`{name}` is required"))
        .help(format!("add `{name} = ...` to the call")),
        BindError::Duplicate { index } => {
            let key = keywords[index].key;
            Diagnostic::error(
                codes::INVALID_ARGUMENT,
                format!("argument `{}` is given twice", key.name),
            )
            .primary(key.span.clone(), "given again here")
        }
        BindError::Invalid { index, expected } => {
            let arg = &keywords[index];
            let spec = table.iter().find(|p| p.name == arg.key.name);
            invalid_value(arg, spec.map(|p| p.kind), &expected)
        }
    }
}

fn invalid_value(arg: &KeywordArg, kind: Option<Kind>, expected: &str) -> Diagnostic {
    let numeric = matches!(kind, Some(Kind::Int | Kind::Float));
    if let (true, Value::Word(word)) = (numeric, &arg.value) {
        return Diagnostic::error(
            codes::UNKNOWN_HPARAM,
            format!("unknown hyperparameter `{word}`"),
        )
        .primary(
            arg.expr.span.clone(),
            "not a number or a declared hyperparameter",
        )
        .help(format!(
            "declare it in the model's `search` section, or write a number for `{}`",
            arg.key.name
        ));
    }
    let mut d = Diagnostic::error(
        codes::INVALID_ARGUMENT,
        format!("invalid value for `{}`: expected {expected}", arg.key.name),
    )
    .primary(
        arg.expr.span.clone(),
        format!("found {} `{}`", arg.value.kind_name(), arg.value),
    );
    if let (Some(Kind::Word(words)), Value::Word(word)) = (kind, &arg.value) {
        if let Some(close) = suggest(word, words.iter().copied()) {
            d = d.help(format!("did you mean `{close}`?"));
        }
    }
    if let (Some(Kind::Int), Value::Float(v)) = (kind, &arg.value) {
        // Whole numbers past 2^53 are read as floats, since no setting
        // takes integers that large.
        d = if v.fract() == 0.0 && v.abs() >= 9.0e15 {
            d.help("this whole number is far larger than any setting takes")
        } else {
            d.help("write a whole number, or declare the hyperparameter with `int(low, high)`")
        };
    }
    d
}

/// Reports a failed shape rule of layer `layer` called at `call_span`.
pub fn layer_error(
    layer: &str,
    call_span: &Span,
    keywords: &[KeywordArg],
    inputs: &[(Span, Option<Span>)],
    error: LayerError,
) -> Diagnostic {
    let arg_span = |name: &str| {
        keywords
            .iter()
            .find(|k| k.key.name == name)
            .map_or_else(|| call_span.clone(), |k| k.expr.span.clone())
    };
    match error {
        LayerError::NotPositive { param, value } => Diagnostic::error(
            codes::NOT_POSITIVE,
            format!("`{param}` of `{layer}` must be positive, found {value}"),
        )
        .primary(arg_span(param), format!("`{param}` is {value}")),
        LayerError::Invalid { param, message } => Diagnostic::error(
            codes::INVALID_ARGUMENT,
            format!("invalid `{param}` for `{layer}`: {message}"),
        )
        .primary(arg_span(param), "invalid value"),
        LayerError::WrongRank { expected, found } => {
            let mut d = Diagnostic::error(
                codes::WRONG_RANK,
                format!("`{layer}` expects {expected}, found {found}"),
            )
            .primary(call_span.clone(), format!("input has shape {found}"));
            if let Some((span, _)) = inputs.first() {
                d = d.secondary(span.clone(), format!("this is {found}"));
            }
            match (layer, found.rank()) {
                ("dense" | "softmax", 3) => {
                    d.help("insert `flatten` or `global_avgpool` before it")
                }
                _ => d,
            }
        }
        LayerError::KernelTooLarge {
            kernel,
            dilation,
            input,
        } => {
            let reach = dilation * (kernel - 1) + 1;
            let dilated = if dilation > 1 {
                format!(" (dilated to {reach}x{reach})")
            } else {
                String::new()
            };
            Diagnostic::error(
                codes::WINDOW_TOO_LARGE,
                format!(
                    "`{layer}` kernel {kernel}x{kernel}{dilated} is larger than its {}x{} input",
                    input.0[1], input.0[2]
                ),
            )
            .primary(arg_span("kernel"), format!("input is {input}"))
            .help("use `padding = same`, a smaller kernel, or less downsampling before it")
        }
        LayerError::PoolToZero {
            size,
            input,
            output,
        } => Diagnostic::error(
            codes::ZERO_SIZE,
            format!(
                "`{layer}` reduces {}x{} to {}x{}",
                input.0[1], input.0[2], output.0, output.1
            ),
        )
        .primary(
            call_span.clone(),
            format!(
                "the {size}x{size} window does not fit the {}x{} input",
                input.0[1], input.0[2]
            ),
        )
        .help("use `padding = same`, a smaller window, or less downsampling before it"),
        LayerError::AddMismatch { left, right } => {
            let mut d = Diagnostic::error(
                codes::ADD_SHAPE_MISMATCH,
                format!("shape mismatch at `add`: {left} + {right}"),
            )
            .primary(call_span.clone(), "cannot add values of different shapes");
            for ((span, def), shape) in inputs.iter().zip([&left, &right]) {
                d = d.secondary(span.clone(), format!("this is {shape}"));
                if let Some(def) = def {
                    d = d.secondary(def.clone(), format!("defined here as {shape}"));
                }
            }
            d.note("`add` does not broadcast: both sides need the same shape")
                .help(add_help(&left, &right))
        }
        LayerError::ConcatMismatch { index, shapes } => {
            let mut d = Diagnostic::error(
                codes::CONCAT_SHAPE_MISMATCH,
                format!(
                    "shape mismatch at `concat`: {} and {}",
                    shapes[0], shapes[index]
                ),
            )
            .primary(
                call_span.clone(),
                "inputs must agree on every axis but the first",
            );
            for (i, ((span, def), shape)) in inputs.iter().zip(&shapes).enumerate() {
                if i != 0 && i != index {
                    continue;
                }
                d = d.secondary(span.clone(), format!("this is {shape}"));
                if let Some(def) = def {
                    d = d.secondary(def.clone(), format!("defined here as {shape}"));
                }
            }
            d
        }
    }
}

fn add_help(left: &super::graph::Shape, right: &super::graph::Shape) -> String {
    match (&left.0[..], &right.0[..]) {
        ([c1, h1, w1], [c2, h2, w2]) if h1 == h2 && w1 == w2 && c1 != c2 => format!(
            "project the skip path to {c1} channels, e.g. `conv(x, filters = {c1}, kernel = 1)`"
        ),
        ([_, h1, _], [_, h2, _]) if h1 != h2 => {
            "match the spatial sizes, e.g. give the skip path a strided 1x1 `conv`".to_string()
        }
        _ => "make both sides the same shape".to_string(),
    }
}

/// `a`, `b` and `c`.
pub fn quote_list(names: &[&str]) -> String {
    let quoted: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
    match quoted.as_slice() {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}
