//! Reading a study: the trials table, hyperparameter importances, plots,
//! and the model file at the best trial.

use super::sampler::Direction;
use super::storage::{Trial, TrialState};
use crate::check::space::Space;
use crate::syntax::ast;
use plotters::prelude::*;
use std::path::Path;

/// Returns the best complete trial. Of trials with equal values, it
/// returns the one with the lowest number, which the table sorted by value
/// also lists first.
pub fn best(trials: &[Trial], direction: Direction) -> Option<&Trial> {
    trials
        .iter()
        .filter(|t| t.state == TrialState::Complete && t.value.is_some())
        .max_by(|a, b| {
            let (x, y) = (a.value.unwrap_or(f64::NAN), b.value.unwrap_or(f64::NAN));
            let by_value = match direction {
                Direction::Maximize => x.total_cmp(&y),
                Direction::Minimize => y.total_cmp(&x),
            };
            by_value.then(b.number.cmp(&a.number))
        })
}

fn cell(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The trials as a text table, in the given order.
pub fn table(trials: &[&Trial], metric: &str) -> String {
    let mut out = format!(
        "{:>5}  {:<9} {:>12} {:>9} {:>6} {:>8}  params\n",
        "trial", "state", metric, "test_acc", "epochs", "seconds"
    );
    for t in trials {
        let params: Vec<String> = t.params.iter().map(|(n, v)| format!("{n}={v}")).collect();
        let mut line = format!(
            "{:>5}  {:<9} {:>12} {:>9} {:>6} {:>8}  {}",
            t.number,
            t.state.as_str(),
            cell(t.value, 4),
            cell(t.test_accuracy, 4),
            t.epochs.len(),
            cell(t.seconds(), 1),
            params.join(" ")
        );
        if let Some(error) = &t.error {
            line += &format!("\n{:>7}{error}", "");
        }
        out += &line;
        out.push('\n');
    }
    out
}

/// Each hyperparameter's share of the objective's variance over complete
/// trials: the correlation ratio η² of the objective grouped by the
/// parameter's value (numbers binned into four groups of equal count),
/// normalised so the shares sum to 1. It is a one-dimensional estimate:
/// unlike fANOVA it ignores interactions, and with few trials it is noisy.
pub fn importances(trials: &[Trial], space: &Space) -> Vec<(String, f64)> {
    let complete: Vec<&Trial> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete && t.value.is_some())
        .collect();
    let mut shares = Vec::new();
    for param in &space.params {
        let pairs: Vec<(String, f64)> = complete
            .iter()
            .filter_map(|t| {
                let (_, v) = t.params.iter().find(|(n, _)| *n == param.name)?;
                Some((v.clone(), t.value?))
            })
            .collect();
        shares.push((param.name.clone(), correlation_ratio(&pairs)));
    }
    let total: f64 = shares.iter().map(|(_, s)| s).sum();
    if total > 0.0 {
        for (_, s) in &mut shares {
            *s /= total;
        }
    }
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
}

/// η² of values grouped by key; numeric keys with more than four distinct
/// values are grouped into four bins by rank.
fn correlation_ratio(pairs: &[(String, f64)]) -> f64 {
    if pairs.len() < 2 {
        return 0.0;
    }
    let mut keyed: Vec<(String, f64)> = pairs.to_vec();
    let mut distinct: Vec<&String> = pairs.iter().map(|(k, _)| k).collect();
    distinct.sort();
    distinct.dedup();
    let numeric = pairs.iter().all(|(k, _)| k.parse::<f64>().is_ok());
    if numeric && distinct.len() > 4 {
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        order.sort_by(|&a, &b| {
            let x = |i: usize| pairs[i].0.parse::<f64>().unwrap_or(0.0);
            x(a).total_cmp(&x(b))
        });
        for (rank, &i) in order.iter().enumerate() {
            keyed[i].0 = (4 * rank / pairs.len()).to_string();
        }
    }
    let mean = keyed.iter().map(|(_, v)| v).sum::<f64>() / keyed.len() as f64;
    let total: f64 = keyed.iter().map(|(_, v)| (v - mean).powi(2)).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let mut groups: Vec<(String, Vec<f64>)> = Vec::new();
    for (k, v) in keyed {
        match groups.iter_mut().find(|(g, _)| *g == k) {
            Some((_, values)) => values.push(v),
            None => groups.push((k, vec![v])),
        }
    }
    let between: f64 = groups
        .iter()
        .map(|(_, values)| {
            let m = values.iter().sum::<f64>() / values.len() as f64;
            values.len() as f64 * (m - mean).powi(2)
        })
        .sum();
    between / total
}

/// Writes the model source with every search range replaced by the best
/// trial's value, as `choice(value)`. Hyperparameters inactive at the best
/// point keep their default and lose their `when` condition, which could
/// otherwise name a value that its parent no longer offers.
///
/// # Errors
/// When the source no longer parses or the model is missing.
pub fn export_best(
    source: &str,
    model: &str,
    best: &Trial,
    space: &Space,
) -> Result<String, String> {
    let program = crate::check::Program::parse(source).map_err(|d| d.message)?;
    let ast = program
        .model(model)
        .ok_or_else(|| format!("the study's source has no model `{model}`"))?;
    let mut edits: Vec<(std::ops::Range<usize>, String)> = Vec::new();
    for stmt in &ast.body {
        let ast::Stmt::Search { entries, .. } = stmt else {
            continue;
        };
        for entry in entries {
            let name = &entry.name.name;
            let mut span = entry.domain.span.clone();
            let value = match best.params.iter().find(|(n, _)| n == name) {
                Some((_, v)) => v.clone(),
                None => {
                    if let Some(condition) = &entry.condition {
                        span.end = span.end.max(condition.span.end);
                    }
                    space
                        .get(name)
                        .map(|p| p.default.to_string())
                        .ok_or_else(|| format!("hyperparameter `{name}` is not in the space"))?
                }
            };
            edits.push((span, format!("choice({value})")));
        }
    }
    edits.sort_by_key(|(span, _)| std::cmp::Reverse(span.start));
    let mut text = source.to_string();
    for (span, replacement) in edits {
        text.replace_range(span, &replacement);
    }
    Ok(text)
}

/// Writes `history.svg` (each trial's objective and the best so far) and
/// `params.svg` (the objective against each numeric hyperparameter) into
/// `dir`.
///
/// # Errors
/// When a file cannot be written.
pub fn plots(
    trials: &[Trial],
    metric: &str,
    direction: Direction,
    dir: &Path,
) -> Result<(), String> {
    if dir.exists() && !dir.is_dir() {
        return Err(format!(
            "`{}` is a file; --plots takes a folder to write history.svg and params.svg into",
            dir.display()
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create `{}`: {e}", dir.display()))?;
    let points: Vec<(f64, f64)> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete)
        .filter_map(|t| Some((t.number as f64, t.value?)))
        .collect();
    history_plot(&points, metric, direction, &dir.join("history.svg"))
        .map_err(|e| e.to_string())?;
    params_plot(trials, metric, &dir.join("params.svg")).map_err(|e| e.to_string())?;
    Ok(())
}

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn range_of(values: impl Iterator<Item = f64>) -> std::ops::Range<f64> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    if !lo.is_finite() {
        return 0.0..1.0;
    }
    let pad = ((hi - lo) * 0.05).max(1e-3);
    (lo - pad)..(hi + pad)
}

fn history_plot(
    points: &[(f64, f64)],
    metric: &str,
    direction: Direction,
    path: &Path,
) -> PlotResult {
    let root = SVGBackend::new(path, (720, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = range_of(points.iter().map(|p| p.0));
    let ys = range_of(points.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&root)
        .caption("Optimization history", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(xs, ys)?;
    chart
        .configure_mesh()
        .x_desc("trial")
        .y_desc(metric)
        .draw()?;
    chart.draw_series(
        points
            .iter()
            .map(|&(x, y)| Circle::new((x, y), 3, BLUE.filled())),
    )?;
    let mut best = Vec::new();
    for &(x, y) in points {
        let next = match (best.last(), direction) {
            (Some(&(_, b)), Direction::Maximize) => f64::max(b, y),
            (Some(&(_, b)), Direction::Minimize) => f64::min(b, y),
            (None, _) => y,
        };
        best.push((x, next));
    }
    chart.draw_series(LineSeries::new(best, RED.stroke_width(2)))?;
    root.present()?;
    Ok(())
}

fn params_plot(trials: &[Trial], metric: &str, path: &Path) -> PlotResult {
    let complete: Vec<&Trial> = trials
        .iter()
        .filter(|t| t.state == TrialState::Complete && t.value.is_some())
        .collect();
    let mut names: Vec<String> = Vec::new();
    for t in &complete {
        for (n, v) in &t.params {
            if v.parse::<f64>().is_ok() && !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let panels = names.len().max(1);
    let root = SVGBackend::new(path, (360 * panels as u32, 340)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((1, panels));
    let ys = range_of(complete.iter().filter_map(|t| t.value));
    for (name, area) in names.iter().zip(areas) {
        let points: Vec<(f64, f64)> = complete
            .iter()
            .filter_map(|t| {
                let (_, v) = t.params.iter().find(|(n, _)| n == name)?;
                Some((v.parse().ok()?, t.value?))
            })
            .collect();
        let xs = range_of(points.iter().map(|p| p.0));
        let mut chart = ChartBuilder::on(&area)
            .caption(name, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(xs, ys.clone())?;
        chart.configure_mesh().y_desc(metric).draw()?;
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, BLUE.filled())),
        )?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn correlation_ratio_finds_the_deciding_parameter() {
        let pairs: Vec<(String, f64)> = (0..20)
            .map(|i| {
                (
                    if i % 2 == 0 { "a" } else { "b" }.to_string(),
                    (i % 2) as f64,
                )
            })
            .collect();
        assert!((correlation_ratio(&pairs) - 1.0).abs() < 1e-12);
        let noise: Vec<(String, f64)> = (0..20)
            .map(|i| (if i < 10 { "a" } else { "b" }.to_string(), (i % 2) as f64))
            .collect();
        assert!(correlation_ratio(&noise) < 1e-12);
    }

    fn complete(number: i64, value: f64) -> Trial {
        Trial {
            id: number + 100,
            number,
            state: TrialState::Complete,
            params: Vec::new(),
            value: Some(value),
            test_accuracy: None,
            epochs: vec![value],
            error: None,
            checkpoint: None,
            retry_of: None,
            started: 0.0,
            finished: Some(1.0),
        }
    }

    #[test]
    fn best_breaks_ties_by_lowest_number() {
        let trials = [complete(2, 0.9), complete(1, 0.9), complete(3, 0.8)];
        assert_eq!(best(&trials, Direction::Maximize).unwrap().number, 1);
        let losses = [complete(4, 0.2), complete(1, 0.3), complete(2, 0.2)];
        assert_eq!(best(&losses, Direction::Minimize).unwrap().number, 2);
    }
}
