//! Search spaces: the hyperparameters a `search` section declares, their
//! domains and defaults, and the points the checker visits.

use super::value::{format_float, Value};
use crate::diag::Span;
use std::fmt;

#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// Integers `low, low + step, ... <= high`, sampled uniformly or on a log
    /// scale.
    Int {
        low: i64,
        high: i64,
        step: i64,
        log: bool,
    },
    /// Reals in `[low, high]`, on a grid of `step` when it is set.
    Float {
        low: f64,
        high: f64,
        step: Option<f64>,
        log: bool,
    },
    /// One of a list of numbers, words or blocks.
    Choice(Vec<Value>),
}

/// Discrete ranges up to this size are visited point by point; larger ones
/// only at their ends and their default.
const MAX_VISITED_RANGE: u64 = 16;

/// Grids of more steps than this are treated as continuous.
const MAX_GRID_STEPS: f64 = 1e15;

/// Position of the interior probe of a range, as a fraction of its width:
/// the golden section, which avoids round numbers, so a float range used
/// where an integer is required shows up.
const INTERIOR: f64 = 0.381_966;

impl Domain {
    /// Returns the number of distinct values, or `None` for a continuous range.
    pub fn size(&self) -> Option<u64> {
        match *self {
            Domain::Int {
                low, high, step, ..
            } => {
                let steps = (high as i128 - low as i128) / step as i128;
                Some(u64::try_from(steps + 1).unwrap_or(u64::MAX))
            }
            Domain::Float {
                low,
                high,
                step: Some(step),
                ..
            } => {
                // A grid too fine to count exactly behaves as a continuous range.
                let steps = ((high - low) / step + 1e-9).floor();
                (steps.is_finite() && steps < MAX_GRID_STEPS).then(|| steps as u64 + 1)
            }
            Domain::Float { step: None, .. } => None,
            Domain::Choice(ref options) => Some(options.len() as u64),
        }
    }

    pub fn contains(&self, value: &Value) -> bool {
        match *self {
            Domain::Int {
                low, high, step, ..
            } => value.as_i64().is_some_and(|v| {
                v >= low && v <= high && (v as i128 - low as i128) % step as i128 == 0
            }),
            Domain::Float {
                low, high, step, ..
            } => value.as_f64().is_some_and(|v| {
                let on_grid = step.is_none_or(|s| {
                    let k = (v - low) / s;
                    (k - k.round()).abs() < 1e-6
                });
                v >= low && v <= high && on_grid
            }),
            Domain::Choice(ref options) => options.iter().any(|o| values_equal(o, value)),
        }
    }

    /// Returns the values the static check visits: every value of a small discrete
    /// domain, else the two ends of the range.
    pub fn visited_values(&self) -> Vec<Value> {
        match *self {
            Domain::Choice(ref options) => options.clone(),
            Domain::Int {
                low, high, step, ..
            } => {
                if self.size().unwrap_or(u64::MAX) <= MAX_VISITED_RANGE {
                    (0..)
                        .map(|k| low + k * step)
                        .take_while(|v| *v <= high)
                        .map(Value::Int)
                        .collect()
                } else {
                    let steps = (high as i128 - low as i128) / step as i128;
                    let at = |k: i128| Value::Int((low as i128 + k * step as i128) as i64);
                    vec![at(0), at(steps), at((steps as f64 * INTERIOR) as i128)]
                }
            }
            Domain::Float {
                low,
                high,
                step,
                log,
            } => match (step, self.size()) {
                (Some(step), Some(n)) if n <= MAX_VISITED_RANGE => (0..n)
                    .map(|k| Value::Float(low + k as f64 * step))
                    .collect(),
                _ => {
                    let interior = match (log, step) {
                        (true, _) => (low.ln() + INTERIOR * (high.ln() - low.ln())).exp(),
                        (false, Some(step)) => {
                            low + (INTERIOR * (high - low) / step).round() * step
                        }
                        (false, None) => low + INTERIOR * (high - low),
                    };
                    let mut values = vec![Value::Float(low), Value::Float(high)];
                    if interior > low && interior < high {
                        values.push(Value::Float(interior));
                    }
                    values
                }
            },
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Int {
                low,
                high,
                step,
                log,
            } => {
                write!(f, "int({low}, {high}")?;
                if *step != 1 {
                    write!(f, ", step={step}")?;
                }
                if *log {
                    write!(f, ", log")?;
                }
                write!(f, ")")
            }
            Domain::Float {
                low,
                high,
                step,
                log,
            } => {
                write!(f, "float({}, {}", format_float(*low), format_float(*high))?;
                if let Some(step) = step {
                    write!(f, ", step={}", format_float(*step))?;
                }
                if *log {
                    write!(f, ", log")?;
                }
                write!(f, ")")
            }
            Domain::Choice(options) => {
                write!(f, "choice(")?;
                for (i, o) in options.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    write!(f, "{o}")?;
                }
                write!(f, ")")
            }
        }
    }
}

/// Compares values the way a domain does: `2` equals `2.0`.
pub fn values_equal(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => match (a, b) {
            (Value::Word(x) | Value::Block(x), Value::Word(y) | Value::Block(y)) => x == y,
            _ => a == b,
        },
    }
}

/// `when NAME == value` or `when NAME in [values]`: the hyperparameter exists
/// only while `param` takes one of `values`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    pub param: String,
    pub values: Vec<Value>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HParam {
    pub name: String,
    pub span: Span,
    pub domain: Domain,
    pub condition: Option<Condition>,
    /// The value used when no sweep chooses one (`default =`, else the low
    /// end of a range or the first choice, as KerasTuner does).
    pub default: Value,
}

/// Steps of the exact point count before it gives up.
const MAX_COUNT_WORK: u64 = 1_000_000;

/// Maximum number of hyperparameters in a search space. The point count
/// and the enumeration recurse once per hyperparameter.
pub const MAX_HPARAMS: usize = 256;

/// A model's search space: its hyperparameters in declaration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Space {
    pub params: Vec<HParam>,
}

/// One point of a space: a value for every active hyperparameter, in
/// declaration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Point(pub Vec<(String, Value)>);

impl Point {
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v)
    }

    pub fn set(&mut self, name: &str, value: Value) {
        match self.0.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name.to_string(), value)),
        }
    }
}

impl fmt::Display for Point {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

impl Space {
    pub fn get(&self, name: &str) -> Option<&HParam> {
        self.params.iter().find(|p| p.name == name)
    }

    pub fn is_empty(&self) -> bool {
        self.params.is_empty()
    }

    /// Returns whether `param` is active given the values chosen so far.
    pub fn is_active(&self, param: &HParam, point: &Point) -> bool {
        match &param.condition {
            None => true,
            Some(cond) => point
                .get(&cond.param)
                .is_some_and(|v| cond.values.iter().any(|c| values_equal(c, v))),
        }
    }

    /// Returns the point where every active hyperparameter takes its default.
    pub fn default_point(&self) -> Point {
        self.complete(Point::default())
    }

    /// Fills in defaults for every active hyperparameter that `partial` does
    /// not set, and drops values of inactive ones.
    pub fn complete(&self, partial: Point) -> Point {
        let mut point = Point::default();
        for param in &self.params {
            if !self.is_active(param, &point) {
                continue;
            }
            let value = partial
                .get(&param.name)
                .cloned()
                .unwrap_or_else(|| param.default.clone());
            point.0.push((param.name.clone(), value));
        }
        point
    }

    /// Counts the points when every discrete domain is counted in full. The
    /// result is `None` when an active continuous range makes it infinite.
    pub fn size(&self) -> Option<u64> {
        let mut work = MAX_COUNT_WORK;
        self.count_from(0, &mut Point::default(), &mut work)
    }

    /// Counts the points below `index`. It branches only on values that some
    /// condition tests, because all other values of a domain lead to the same
    /// subtree, whose count is then multiplied by their number.
    fn count_from(&self, index: usize, point: &mut Point, work: &mut u64) -> Option<u64> {
        let Some(param) = self.params.get(index) else {
            return Some(1);
        };
        // Counting conditional branches can take exponential time; past the
        // budget the count is reported as unknown (`u64::MAX`).
        if *work == 0 {
            return Some(u64::MAX);
        }
        *work -= 1;
        if !self.is_active(param, point) {
            return self.count_from(index + 1, point, work);
        }
        let size = param.domain.size()?;
        let tested = self.tested_values(param);
        let mut total: u64 = 0;
        for value in &tested {
            point.0.push((param.name.clone(), value.clone()));
            let below = self.count_from(index + 1, point, work);
            point.0.pop();
            total = total.saturating_add(below?);
        }
        let rest = size.saturating_sub(tested.len() as u64);
        if rest > 0 {
            // A value that no condition names, standing for all of them.
            point
                .0
                .push((param.name.clone(), Value::Word(String::new())));
            let below = self.count_from(index + 1, point, work);
            point.0.pop();
            total = total.saturating_add(below?.saturating_mul(rest));
        }
        Some(total)
    }

    /// Returns the values of `param`'s domain that a condition of a later
    /// hyperparameter tests.
    fn tested_values(&self, param: &HParam) -> Vec<Value> {
        let mut tested: Vec<Value> = Vec::new();
        let conditions = self.params.iter().filter_map(|p| p.condition.as_ref());
        for cond in conditions.filter(|c| c.param == param.name) {
            for value in &cond.values {
                let known = tested.iter().any(|t| values_equal(t, value));
                if param.domain.contains(value) && !known {
                    tested.push(value.clone());
                }
            }
        }
        tested
    }

    /// Returns the points the static check visits, at most `limit` of them: every
    /// combination of the values each domain offers to
    /// [`Domain::visited_values`], skipping inactive hyperparameters.
    /// Returns the points and whether the list was cut at `limit`.
    pub fn check_points(&self, limit: usize) -> (Vec<Point>, bool) {
        let mut points = Vec::new();
        let mut cut = false;
        self.enumerate_from(0, &mut Point::default(), &mut points, limit, &mut cut);
        if cut {
            points = self.spread_points(limit);
        }
        (points, cut)
    }

    /// `limit` points drawn from the grid of visited values, for spaces too
    /// large to visit whole. Each hyperparameter's value comes from a
    /// deterministic pseudo-random draw, so every hyperparameter varies, not
    /// only the last ones as in a truncated enumeration.
    fn spread_points(&self, limit: usize) -> Vec<Point> {
        let values: Vec<Vec<Value>> = self.params.iter().map(|p| self.candidates(p)).collect();
        let mut seen = std::collections::HashSet::new();
        let mut points = Vec::new();
        for k in 0..limit as u64 {
            let mut point = Point::default();
            for (j, (param, options)) in self.params.iter().zip(&values).enumerate() {
                let digit = crate::rng::word(0, j as u64, k) % options.len() as u64;
                if self.is_active(param, &point) {
                    point
                        .0
                        .push((param.name.clone(), options[digit as usize].clone()));
                }
            }
            if seen.insert(point.to_string()) {
                points.push(point);
            }
        }
        points
    }

    /// Returns the values the check tries for one hyperparameter: those of
    /// [`Domain::visited_values`] and the default.
    fn candidates(&self, param: &HParam) -> Vec<Value> {
        let mut values = param.domain.visited_values();
        if !values.iter().any(|v| values_equal(v, &param.default)) {
            values.push(param.default.clone());
        }
        values
    }

    fn enumerate_from(
        &self,
        index: usize,
        point: &mut Point,
        out: &mut Vec<Point>,
        limit: usize,
        cut: &mut bool,
    ) {
        if out.len() >= limit {
            *cut = true;
            return;
        }
        let Some(param) = self.params.get(index) else {
            out.push(point.clone());
            return;
        };
        if !self.is_active(param, point) {
            self.enumerate_from(index + 1, point, out, limit, cut);
            return;
        }
        for value in self.candidates(param) {
            point.0.push((param.name.clone(), value));
            self.enumerate_from(index + 1, point, out, limit, cut);
            point.0.pop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hparam(name: &str, domain: Domain, condition: Option<Condition>) -> HParam {
        let default = domain.visited_values()[0].clone();
        HParam {
            name: name.into(),
            span: 0..0,
            domain,
            condition,
            default,
        }
    }

    fn conditional_space() -> Space {
        let cell = Domain::Choice(vec![
            Value::Block("plain".into()),
            Value::Block("wide".into()),
        ]);
        let expand = Domain::Int {
            low: 2,
            high: 4,
            step: 1,
            log: false,
        };
        let condition = Condition {
            param: "cell".into(),
            values: vec![Value::Word("wide".into())],
            span: 0..0,
        };
        Space {
            params: vec![
                hparam("cell", cell, None),
                hparam("expand", expand, Some(condition)),
            ],
        }
    }

    #[test]
    fn conditional_points_skip_inactive_params() {
        let space = conditional_space();
        let (points, cut) = space.check_points(100);
        assert!(!cut);
        // plain, then wide with expand = 2, 3, 4.
        assert_eq!(points.len(), 4);
        assert_eq!(points[0].0.len(), 1);
        assert_eq!(space.size(), Some(4));
    }

    #[test]
    fn large_int_range_visits_ends_and_interior() {
        let domain = Domain::Int {
            low: 1,
            high: 100,
            step: 1,
            log: false,
        };
        assert_eq!(
            domain.visited_values(),
            vec![Value::Int(1), Value::Int(100), Value::Int(38)]
        );
        assert_eq!(domain.size(), Some(100));
    }

    #[test]
    fn spread_points_vary_every_hyperparameter() {
        let choice =
            |name: &str| hparam(name, Domain::Choice((0..4).map(Value::Int).collect()), None);
        let space = Space {
            params: (0..8).map(|i| choice(&format!("p{i}"))).collect(),
        };
        let (points, cut) = space.check_points(64);
        assert!(cut);
        assert!(points.len() > 32, "{}", points.len());
        for name in ["p0", "p7"] {
            let mut seen: Vec<i64> = points
                .iter()
                .filter_map(|p| p.get(name).and_then(Value::as_i64))
                .collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen, vec![0, 1, 2, 3], "{name}");
        }
    }

    #[test]
    fn stepped_float_is_discrete() {
        let domain = Domain::Float {
            low: 0.0,
            high: 0.5,
            step: Some(0.1),
            log: false,
        };
        assert_eq!(domain.size(), Some(6));
        assert!(domain.contains(&Value::Float(0.3)));
        assert!(!domain.contains(&Value::Float(0.35)));
    }
}
