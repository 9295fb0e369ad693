//! Values of settings: layer arguments, hyperparameters and training options.

use std::fmt;

/// A setting's value after evaluation. Tensors are not values; they live in
/// the graph.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(i64),
    Float(f64),
    Bool(bool),
    /// A bare name that is not bound to anything, such as `same` or `sgd`;
    /// the parameter it is passed to decides whether it is valid.
    Word(String),
    Str(String),
    /// A reference to a block by name.
    Block(String),
    List(Vec<Value>),
    /// A call in a setting, such as `sgd(lr = 0.1)` in a `train` section.
    Call(CallValue),
}

#[derive(Debug, Clone, PartialEq)]
pub struct CallValue {
    pub name: String,
    pub args: Vec<(Option<String>, Value)>,
}

impl Value {
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Int(i) => Some(i as f64),
            Value::Float(f) => Some(f),
            _ => None,
        }
    }

    /// Returns the integer this value denotes: an integer, or a float with no
    /// fractional part (so `1e6` is accepted where a count is expected).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::Int(i) => Some(i),
            Value::Float(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Some(f as i64),
            _ => None,
        }
    }

    /// Describes the kind of value in a few words, for error messages.
    pub fn kind_name(&self) -> &'static str {
        match self {
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Bool(_) => "a boolean",
            Value::Word(_) => "a name",
            Value::Str(_) => "a string",
            Value::Block(_) => "a block",
            Value::List(_) => "a list",
            Value::Call(_) => "a call",
        }
    }
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{}", format_float(*x)),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Word(w) | Value::Block(w) => write!(f, "{w}"),
            Value::Str(s) => write!(f, "\"{s}\""),
            Value::List(items) => {
                write!(f, "[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{item}")?;
                }
                write!(f, "]")
            }
            Value::Call(call) => {
                write!(f, "{}(", call.name)?;
                for (i, (key, value)) in call.args.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    match key {
                        Some(key) => write!(f, "{key}={value}")?,
                        None => write!(f, "{value}")?,
                    }
                }
                write!(f, ")")
            }
        }
    }
}

/// Formats a float so that it reads back as a float: `0.5`, `1e-4`, `2.0`.
pub fn format_float(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-3 || x.abs() >= 1e7) {
        format!("{x:e}")
    } else if x.fract() == 0.0 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}
