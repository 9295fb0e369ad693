//! Binding of call arguments to a parameter table, shared by layers, search
//! domains, optimizers, schedules and callbacks.

use super::value::Value;

/// Kind of value a parameter accepts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Int,
    Float,
    Bool,
    /// `true`, `false` or `auto`.
    BoolOrAuto,
    /// One of the listed words.
    Word(&'static [&'static str]),
    Str,
    /// Anything; the reader interprets it.
    Any,
}

impl Kind {
    pub fn describe(&self) -> String {
        match self {
            Kind::Int => "an integer".into(),
            Kind::Float => "a number".into(),
            Kind::Bool => "`true` or `false`".into(),
            Kind::BoolOrAuto => "`true`, `false` or `auto`".into(),
            Kind::Word(words) => words
                .iter()
                .map(|w| format!("`{w}`"))
                .collect::<Vec<_>>()
                .join(", "),
            Kind::Str => "a string".into(),
            Kind::Any => "a value".into(),
        }
    }
}

/// A parameter's default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Default {
    Required,
    Int(i64),
    Float(f64),
    Bool(bool),
    Word(&'static str),
    /// Takes the value of another parameter, as pooling's `stride` takes `size`.
    SameAs(&'static str),
    /// Absent unless given.
    Unset,
}

#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub kind: Kind,
    pub default: Default,
}

pub const fn param(name: &'static str, kind: Kind, default: Default) -> Param {
    Param {
        name,
        kind,
        default,
    }
}

/// Reason arguments could not be bound.
#[derive(Debug, Clone, PartialEq)]
pub enum BindError {
    /// A keyword that the table does not have (index into the keywords given).
    Unknown {
        index: usize,
    },
    Missing {
        name: &'static str,
    },
    Duplicate {
        index: usize,
    },
    /// A value of the wrong kind (index into the keywords given).
    Invalid {
        index: usize,
        expected: String,
    },
}

/// Bound arguments: one value per parameter that has a value.
#[derive(Debug, Clone, Default)]
pub struct Args {
    values: Vec<(&'static str, Value)>,
}

impl Args {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Integer parameter; the table guarantees the kind when bound.
    pub fn int(&self, name: &str) -> i64 {
        self.get(name).and_then(Value::as_i64).unwrap_or(0)
    }

    pub fn float(&self, name: &str) -> f64 {
        self.get(name).and_then(Value::as_f64).unwrap_or(0.0)
    }

    pub fn word(&self, name: &str) -> &str {
        match self.get(name) {
            Some(Value::Word(w)) => w,
            Some(Value::Bool(true)) => "true",
            Some(Value::Bool(false)) => "false",
            _ => "",
        }
    }

    pub fn bool(&self, name: &str) -> bool {
        matches!(self.get(name), Some(Value::Bool(true)))
    }

    pub fn string(&self, name: &str) -> Option<&str> {
        match self.get(name) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
}

/// Binds keyword arguments to a parameter table and fills in defaults.
pub fn bind(table: &[Param], keywords: &[(String, Value)]) -> Result<Args, BindError> {
    let mut args = Args::default();
    for (index, (key, value)) in keywords.iter().enumerate() {
        let Some(spec) = table.iter().find(|p| p.name == key) else {
            return Err(BindError::Unknown { index });
        };
        if args.get(spec.name).is_some() {
            return Err(BindError::Duplicate { index });
        }
        let value = coerce(spec.kind, value).ok_or_else(|| BindError::Invalid {
            index,
            expected: spec.kind.describe(),
        })?;
        args.values.push((spec.name, value));
    }
    for spec in table {
        if args.get(spec.name).is_some() {
            continue;
        }
        let value = match spec.default {
            Default::Required => return Err(BindError::Missing { name: spec.name }),
            Default::Unset => continue,
            Default::Int(i) => Value::Int(i),
            Default::Float(f) => Value::Float(f),
            Default::Bool(b) => Value::Bool(b),
            Default::Word(w) => Value::Word(w.to_string()),
            Default::SameAs(other) => match args.get(other) {
                Some(v) => v.clone(),
                None => continue,
            },
        };
        args.values.push((spec.name, value));
    }
    Ok(args)
}

/// Converts a value to a parameter's kind, or returns `None` when it does not
/// fit.
fn coerce(kind: Kind, value: &Value) -> Option<Value> {
    match (kind, value) {
        (Kind::Any, v) => Some(v.clone()),
        (Kind::Int, v) => v.as_i64().map(Value::Int),
        (Kind::Float, v) => v.as_f64().filter(|f| f.is_finite()).map(Value::Float),
        (Kind::Bool | Kind::BoolOrAuto, Value::Bool(b)) => Some(Value::Bool(*b)),
        (Kind::BoolOrAuto, Value::Word(w)) if w == "auto" => Some(value.clone()),
        (Kind::Word(words), Value::Word(w)) if words.contains(&w.as_str()) => Some(value.clone()),
        (Kind::Word(words), Value::Str(w)) if words.contains(&w.as_str()) => {
            Some(Value::Word(w.clone()))
        }
        (Kind::Str, Value::Str(_)) => Some(value.clone()),
        (Kind::Str, Value::Word(w)) => Some(Value::Str(w.clone())),
        _ => None,
    }
}

/// Returns the closest of `candidates` to `name`, if any is close enough to
/// be a likely typo.
pub fn suggest<'a>(name: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    // Long names are never typos of short ones, and the distance matrix
    // grows with the product of the lengths.
    const MAX_LEN: usize = 64;
    let mut candidates = candidates.into_iter().filter(|c| c.len() <= MAX_LEN);
    if let Some(alias) = keras_alias(name) {
        return candidates.find(|c| *c == alias);
    }
    if name.len() > MAX_LEN {
        return None;
    }
    let limit = (name.chars().count() / 3).max(1);
    candidates
        .map(|c| (edit_distance(name, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// kiln's name for a Keras or PyTorch layer or argument name, so that a
/// user who writes `Conv2D(kernel_size = 3)` is pointed at `conv(kernel = 3)`.
fn keras_alias(name: &str) -> Option<&'static str> {
    let alias = match name {
        "Conv2D" | "Conv2d" | "conv2d" => "conv",
        "Dense" | "Linear" | "linear" => "dense",
        "DepthwiseConv2D" => "depthwise_conv",
        "SeparableConv2D" => "separable_conv",
        "BatchNormalization" | "BatchNorm2d" | "BatchNorm1d" | "batch_norm" => "batchnorm",
        "MaxPooling2D" | "MaxPool2d" | "max_pool" => "maxpool",
        "AveragePooling2D" | "AvgPool2d" | "avg_pool" => "avgpool",
        "GlobalAveragePooling2D" | "AdaptiveAvgPool2d" => "global_avgpool",
        "Flatten" => "flatten",
        "Dropout" => "dropout",
        "ReLU" => "relu",
        "LeakyReLU" => "leaky_relu",
        "Concatenate" | "cat" => "concat",
        "kernel_size" => "kernel",
        "pool_size" => "size",
        "out_channels" => "filters",
        "out_features" => "units",
        "strides" => "stride",
        "dilation_rate" => "dilation",
        "depth_multiplier" => "multiplier",
        "use_bias" => "bias",
        "learning_rate" => "lr",
        "negative_slope" | "alpha" => "slope",
        "epsilon" => "eps",
        _ => return None,
    };
    Some(alias)
}

/// Edit distance between two strings in characters, counting an adjacent
/// transposition as one edit (optimal string alignment), so `imgae` is one
/// edit from `image`.
fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggest_finds_typo() {
        assert_eq!(suggest("fliters", ["filters", "kernel"]), Some("filters"));
        assert_eq!(suggest("xyz", ["filters", "kernel"]), None);
        assert_eq!(suggest("imgae", ["image", "x"]), Some("image"));
        assert_eq!(
            suggest("kernel_size", ["filters", "kernel"]),
            Some("kernel")
        );
        assert_eq!(suggest("Conv2D", ["conv", "dense"]), Some("conv"));
    }

    #[test]
    fn bind_fills_defaults_and_same_as() {
        let table = [
            param("size", Kind::Int, Default::Int(2)),
            param("stride", Kind::Int, Default::SameAs("size")),
        ];
        let args = bind(&table, &[("size".into(), Value::Int(3))]).unwrap();
        assert_eq!(args.int("stride"), 3);
    }

    #[test]
    fn bind_rejects_fraction_for_int() {
        let table = [param("units", Kind::Int, Default::Required)];
        let err = bind(&table, &[("units".into(), Value::Float(2.5))]).unwrap_err();
        assert!(matches!(err, BindError::Invalid { index: 0, .. }));
    }
}
