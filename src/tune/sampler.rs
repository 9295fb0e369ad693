//! Samplers: where the next trial goes in the search space.
//!
//! - [`SamplerKind::Random`] draws every hyperparameter from its prior:
//!   uniform over a range (on a log scale when the domain says `log`) or
//!   over the choices.
//! - [`SamplerKind::Grid`] visits every point of a discrete space once, in
//!   an order shuffled by the seed.
//! - [`SamplerKind::Tpe`] is the Tree-structured Parzen Estimator (Bergstra,
//!   Bardenet, Bengio and Kégl, "Algorithms for Hyper-Parameter
//!   Optimization", NeurIPS 2011), sampling each hyperparameter on its own
//!   as Hyperopt and Optuna do by default. Finished trials are split into
//!   the best `γ(n) = min(⌈0.1·n⌉, 25)` and the rest; each group becomes a
//!   density (a mixture of truncated Gaussians over numbers, smoothed
//!   frequencies over choices), and of 24 candidates drawn from the good
//!   density the one with the largest ratio of good to bad density wins.
//!   The first 10 trials are random.
//!
//! Conditional hyperparameters are drawn only when their condition holds in
//! the point built so far, and TPE learns each one from the trials where it
//! was active.

use crate::check::space::{Domain, HParam, Point, Space};
use crate::check::value::Value;
use crate::rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplerKind {
    Random,
    Grid,
    Tpe,
}

/// Whether larger objective values are better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Maximize,
    Minimize,
}

/// A finished trial as the samplers see it.
#[derive(Debug, Clone)]
pub struct Observation {
    pub point: Point,
    pub value: f64,
}

/// Random trials before TPE starts modelling.
pub const TPE_STARTUP: usize = 10;
/// Candidates drawn from the good density per hyperparameter.
const TPE_CANDIDATES: usize = 24;

/// A stream of uniform draws in `[0, 1)` keyed by seed and trial.
pub struct Draws {
    seed: u64,
    stream: u64,
    counter: u64,
}

impl Draws {
    pub fn new(seed: u64, trial: u64) -> Draws {
        Draws {
            seed,
            // Streams below 2^32 belong to initialisation and dropout.
            stream: (1 << 40) + trial,
            counter: 0,
        }
    }

    pub fn uniform(&mut self) -> f64 {
        self.counter += 1;
        rng::uniform(self.seed, self.stream, self.counter) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        ((self.uniform() * n as f64) as usize).min(n.saturating_sub(1))
    }

    fn normal(&mut self) -> f64 {
        // Box-Muller; 1 - u keeps the logarithm finite.
        let (u, v) = (1.0 - self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }
}

/// A numeric domain in the space where TPE models it: the logarithm for
/// log-scaled ranges.
#[derive(Debug, Clone, Copy)]
struct Numeric {
    low: f64,
    high: f64,
    log: bool,
}

impl Numeric {
    fn of(domain: &Domain) -> Option<Numeric> {
        let (low, high, log) = match *domain {
            Domain::Int { low, high, log, .. } => (low as f64, high as f64, log),
            Domain::Float { low, high, log, .. } => (low, high, log),
            Domain::Choice(_) => return None,
        };
        let map = |x: f64| if log { x.ln() } else { x };
        Some(Numeric {
            low: map(low),
            high: map(high),
            log,
        })
    }

    fn to_internal(self, x: f64) -> f64 {
        if self.log {
            x.ln()
        } else {
            x
        }
    }
}

/// Rounds an internal-space number to the nearest value of `domain`.
fn snap(domain: &Domain, internal: f64, numeric: Numeric) -> Value {
    let x = if numeric.log {
        internal.exp()
    } else {
        internal
    };
    match *domain {
        Domain::Int {
            low, high, step, ..
        } => {
            let k = ((x - low as f64) / step as f64).round().max(0.0) as i64;
            Value::Int((low + k * step).clamp(low, high))
        }
        Domain::Float {
            low, high, step, ..
        } => match step {
            Some(step) => {
                let k = ((x - low) / step).round().max(0.0);
                Value::Float(round_to_grid((low + k * step).clamp(low, high), step))
            }
            None => Value::Float(x.clamp(low, high)),
        },
        Domain::Choice(_) => unreachable!("numeric domains only"),
    }
}

/// Rounds away the binary error of a grid value (`0.1 * 3` is
/// 0.30000000000000004) by keeping three more decimals than the step has.
fn round_to_grid(value: f64, step: f64) -> f64 {
    let decimals = (-step.log10()).ceil().max(0.0) as i32 + 3;
    let scale = 10f64.powi(decimals.min(15));
    (value * scale).round() / scale
}

/// Draws a value of `domain` from its prior.
pub fn prior(domain: &Domain, draws: &mut Draws) -> Value {
    match domain {
        Domain::Choice(options) => options[draws.below(options.len())].clone(),
        _ => {
            let n = Numeric::of(domain).expect("numeric");
            let internal = n.low + draws.uniform() * (n.high - n.low);
            snap(domain, internal, n)
        }
    }
}

/// Draws a whole point from the priors.
pub fn random_point(space: &Space, draws: &mut Draws) -> Point {
    let mut point = Point::default();
    for param in &space.params {
        if space.is_active(param, &point) {
            point
                .0
                .push((param.name.clone(), prior(&param.domain, draws)));
        }
    }
    point
}

/// How many of `n` finished trials TPE counts as good.
fn good_count(n: usize) -> usize {
    n.div_ceil(10).clamp(1, 25)
}

/// Draws a point with TPE from `history`; random until it holds
/// [`TPE_STARTUP`] trials.
pub fn tpe_point(
    space: &Space,
    history: &[Observation],
    direction: Direction,
    draws: &mut Draws,
) -> Point {
    if history.len() < TPE_STARTUP {
        return random_point(space, draws);
    }
    let mut sorted: Vec<&Observation> = history.iter().collect();
    sorted.sort_by(|a, b| match direction {
        Direction::Maximize => b.value.total_cmp(&a.value),
        Direction::Minimize => a.value.total_cmp(&b.value),
    });
    let n_good = good_count(sorted.len());
    let (good, bad) = sorted.split_at(n_good);
    let mut point = Point::default();
    for param in &space.params {
        if !space.is_active(param, &point) {
            continue;
        }
        let value = tpe_value(param, good, bad, draws);
        point.0.push((param.name.clone(), value));
    }
    point
}

fn tpe_value(
    param: &HParam,
    good: &[&Observation],
    bad: &[&Observation],
    draws: &mut Draws,
) -> Value {
    let values = |group: &[&Observation]| -> Vec<Value> {
        group
            .iter()
            .filter_map(|o| o.point.get(&param.name).cloned())
            .collect()
    };
    let (good, bad) = (values(good), values(bad));
    match &param.domain {
        Domain::Choice(options) => categorical(options, &good, &bad, draws),
        domain => {
            let n = Numeric::of(domain).expect("numeric");
            let internal = |v: &[Value]| -> Vec<f64> {
                v.iter()
                    .filter_map(Value::as_f64)
                    .map(|x| n.to_internal(x))
                    .collect()
            };
            let l = Parzen::new(&internal(&good), n);
            let g = Parzen::new(&internal(&bad), n);
            let best = (0..TPE_CANDIDATES)
                .map(|_| l.sample(draws))
                .map(|x| (x, l.log_pdf(x) - g.log_pdf(x)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map_or(n.low, |(x, _)| x);
            snap(domain, best, n)
        }
    }
}

/// TPE over choices: smoothed frequencies in the good and bad groups, and
/// the candidate with the largest ratio.
fn categorical(options: &[Value], good: &[Value], bad: &[Value], draws: &mut Draws) -> Value {
    let weights = |group: &[Value]| -> Vec<f64> {
        let total = group.len() as f64 + options.len() as f64;
        options
            .iter()
            .map(|o| (group.iter().filter(|v| *v == o).count() as f64 + 1.0) / total)
            .collect()
    };
    let (l, g) = (weights(good), weights(bad));
    let pick = |draws: &mut Draws| {
        let mut u = draws.uniform();
        for (i, w) in l.iter().enumerate() {
            if u < *w {
                return i;
            }
            u -= w;
        }
        l.len() - 1
    };
    let best = (0..TPE_CANDIDATES)
        .map(|_| pick(draws))
        .max_by(|a, b| (l[*a] / g[*a]).total_cmp(&(l[*b] / g[*b])))
        .unwrap_or(0);
    options[best].clone()
}

/// A Parzen estimator: equally weighted Gaussians truncated to the domain,
/// one per observation plus a wide prior component at the centre, with
/// each width set by the gaps to its neighbours (Hyperopt's rule).
struct Parzen {
    mus: Vec<f64>,
    sigmas: Vec<f64>,
    domain: Numeric,
}

fn normal_cdf(z: f64) -> f64 {
    0.5 * (1.0 + libm::erf(z / std::f64::consts::SQRT_2))
}

impl Parzen {
    fn new(observed: &[f64], domain: Numeric) -> Parzen {
        let width = (domain.high - domain.low).max(f64::MIN_POSITIVE);
        let mut mus: Vec<f64> = observed.to_vec();
        mus.push(0.5 * (domain.low + domain.high));
        mus.sort_by(f64::total_cmp);
        let min_sigma = width / (100f64).min(1.0 + mus.len() as f64);
        let sigmas = (0..mus.len())
            .map(|i| {
                let left = if i == 0 {
                    mus[i] - domain.low
                } else {
                    mus[i] - mus[i - 1]
                };
                let right = if i + 1 == mus.len() {
                    domain.high - mus[i]
                } else {
                    mus[i + 1] - mus[i]
                };
                left.max(right).clamp(min_sigma, width)
            })
            .collect();
        Parzen {
            mus,
            sigmas,
            domain,
        }
    }

    fn sample(&self, draws: &mut Draws) -> f64 {
        let i = draws.below(self.mus.len());
        let (mu, sigma) = (self.mus[i], self.sigmas[i]);
        // Rejection sampling of the truncated normal; the prior component
        // covers the domain, so a few tries nearly always succeed.
        for _ in 0..32 {
            let x = mu + sigma * draws.normal();
            if x >= self.domain.low && x <= self.domain.high {
                return x;
            }
        }
        mu.clamp(self.domain.low, self.domain.high)
    }

    fn log_pdf(&self, x: f64) -> f64 {
        let (low, high) = (self.domain.low, self.domain.high);
        let density: f64 = self
            .mus
            .iter()
            .zip(&self.sigmas)
            .map(|(mu, sigma)| {
                let z = (x - mu) / sigma;
                let mass = normal_cdf((high - mu) / sigma) - normal_cdf((low - mu) / sigma);
                (-0.5 * z * z).exp() / (sigma * (std::f64::consts::TAU).sqrt() * mass.max(1e-12))
            })
            .sum::<f64>()
            / self.mus.len() as f64;
        density.max(1e-300).ln()
    }
}

/// Every point of a space whose active domains are all discrete, up to
/// `limit` points; `None` when a range is continuous or the space is
/// larger.
pub fn grid(space: &Space, limit: usize) -> Option<Vec<Point>> {
    let mut points = vec![Point::default()];
    for param in &space.params {
        let mut next = Vec::new();
        for point in points {
            if !space.is_active(param, &point) {
                next.push(point);
                continue;
            }
            param.domain.size()?;
            for value in all_values(&param.domain) {
                let mut p = point.clone();
                p.0.push((param.name.clone(), value));
                next.push(p);
                if next.len() > limit {
                    return None;
                }
            }
        }
        points = next;
    }
    Some(points)
}

fn all_values(domain: &Domain) -> Vec<Value> {
    match *domain {
        Domain::Choice(ref options) => options.clone(),
        Domain::Int {
            low, high, step, ..
        } => (0..)
            .map(|k| low + k * step)
            .take_while(|v| *v <= high)
            .map(Value::Int)
            .collect(),
        Domain::Float {
            low,
            step: Some(step),
            ..
        } => (0..domain.size().unwrap_or(0))
            .map(|k| Value::Float(round_to_grid(low + k as f64 * step, step)))
            .collect(),
        Domain::Float { step: None, .. } => Vec::new(),
    }
}

/// Shuffles `points` with the seed (Fisher-Yates), so a grid sweep cut
/// short still spreads over the space.
pub fn shuffle(points: &mut [Point], seed: u64) {
    let mut draws = Draws::new(seed, u32::MAX as u64);
    for i in (1..points.len()).rev() {
        let j = draws.below(i + 1);
        points.swap(i, j);
    }
}

/// Parses a stored parameter value back into a value of `domain`.
pub fn parse_value(domain: &Domain, text: &str) -> Option<Value> {
    match domain {
        Domain::Choice(options) => options.iter().find(|o| o.to_string() == text).cloned(),
        Domain::Int { .. } => text.parse().ok().map(Value::Int),
        Domain::Float { .. } => text.parse().ok().map(Value::Float),
    }
}

/// Parses a stored point; `None` when a value no longer fits the space.
pub fn parse_point(space: &Space, params: &[(String, String)]) -> Option<Point> {
    let mut point = Point::default();
    for (name, text) in params {
        let param = space.get(name)?;
        point
            .0
            .push((name.clone(), parse_value(&param.domain, text)?));
    }
    Some(point)
}

/// A point as stored: each value as source text.
pub fn format_point(point: &Point) -> Vec<(String, String)> {
    point
        .0
        .iter()
        .map(|(n, v)| (n.clone(), v.to_string()))
        .collect()
}
