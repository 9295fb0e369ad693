//! The text summary `kiln check` prints for a valid model, in the manner of
//! Keras' `model.summary()`.

use super::ensemble::{EnsembleReport, Members};
use super::graph::{Graph, Op};
use super::space::{Domain, Space};
use super::ModelReport;
use std::fmt::Write;

/// Renders a model's layer table, totals and search space.
pub fn render(report: &ModelReport) -> String {
    let mut out = String::new();
    let Some(instance) = &report.instance else {
        return out;
    };
    let graph = &instance.graph;
    let _ = writeln!(out, "model {}", report.name);
    if !report.space.is_empty() {
        let _ = writeln!(out, "at the default point: {}", report.point);
    }
    out.push_str(&layer_table(graph));
    let _ = writeln!(
        out,
        "trainable parameters:     {}",
        group(graph.params() as u64)
    );
    let _ = writeln!(
        out,
        "non-trainable parameters: {}",
        group(graph.state() as u64)
    );
    let _ = writeln!(out, "MACs per sample:          {}", group(graph.macs()));
    if !report.space.is_empty() {
        out.push('\n');
        out.push_str(&space_table(report));
    }
    out
}

/// Renders an ensemble's members: model, seed, bootstrap and parameters,
/// or the study it takes trials from.
pub fn render_ensemble(report: &EnsembleReport, models: &[ModelReport]) -> String {
    let mut out = String::new();
    let Some(spec) = &report.spec else {
        return out;
    };
    let rule = super::ensemble::rule_word(spec.rule);
    let members = match &spec.members {
        Members::StudyTop { study, top } => {
            let _ = writeln!(
                out,
                "ensemble {}: the best {top} complete trials of study `{study}`, rule {rule}",
                report.name
            );
            return out;
        }
        Members::Trained(members) => members,
    };
    let _ = writeln!(
        out,
        "ensemble {}: {} members, rule {rule}",
        report.name,
        members.len()
    );
    let params = |model: &str| {
        models
            .iter()
            .find(|m| m.name == model)
            .and_then(|m| m.instance.as_ref())
            .map_or(0, |i| i.graph.params() as u64)
    };
    let mut rows = vec![[
        "member".to_string(),
        "model".to_string(),
        "seed".to_string(),
        "bootstrap".to_string(),
        "params".to_string(),
    ]];
    for (i, m) in members.iter().enumerate() {
        rows.push([
            format!("m{i}"),
            m.model.clone(),
            m.seed.to_string(),
            if m.bootstrap { "yes" } else { "no" }.to_string(),
            group(params(&m.model)),
        ]);
    }
    out.push_str(&plain_table(&rows));
    let total: u64 = members.iter().map(|m| params(&m.model)).sum();
    let _ = writeln!(out, "trainable parameters in all: {}", group(total));
    out
}

/// Left-aligned columns separated by two spaces.
/// Pads `cell` with spaces to `width` characters, on the left when
/// `right` aligns it right. Padded by hand because `format!` widths stop
/// at 65,535, and a name may be longer.
fn align(cell: &str, width: usize, right: bool) -> String {
    let pad = " ".repeat(width.saturating_sub(cell.chars().count()));
    if right {
        pad + cell
    } else {
        format!("{cell}{pad}")
    }
}

fn plain_table(rows: &[[String; 5]]) -> String {
    let mut widths = [0usize; 5];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| align(cell, w, false))
            .collect();
        let _ = writeln!(out, "  {}", cells.join("  ").trim_end());
    }
    out
}

fn layer_table(graph: &Graph) -> String {
    let rows: Vec<[String; 5]> = graph
        .nodes
        .iter()
        .map(|n| {
            let params = if n.shares_weights_of.is_some() {
                "shared".to_string()
            } else {
                group(n.params() as u64)
            };
            [
                n.name.clone(),
                describe(&n.op),
                n.shape.to_string(),
                params,
                group(n.macs()),
            ]
        })
        .collect();
    let header = ["layer", "op", "output shape", "params", "MACs"];
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: &[String]| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            // Text columns align left, numbers right.
            let _ = write!(s, "{}  ", align(cell, *w, i >= 3));
        }
        s.trim_end().to_string() + "\n"
    };
    let header: Vec<String> = header.iter().map(|h| h.to_string()).collect();
    out.push_str(&line(&header));
    let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
    out.push_str(&"-".repeat(total));
    out.push('\n');
    for row in &rows {
        out.push_str(&line(row));
    }
    out.push_str(&"-".repeat(total));
    out.push('\n');
    out
}

/// The operator with the settings a reader needs to recognise it.
fn describe(op: &Op) -> String {
    match op {
        Op::Dense { units, bias, .. } => format!("dense {units}{}", no_bias(*bias)),
        Op::Conv(c) => {
            let kind = if c.groups > 1 {
                "depthwise_conv"
            } else {
                "conv"
            };
            let mut s = format!("{kind} {k}x{k}", k = c.kernel);
            if c.groups == 1 {
                let _ = write!(s, ", {}", c.filters);
            }
            if c.stride > 1 {
                let _ = write!(s, ", stride {}", c.stride);
            }
            if c.dilation > 1 {
                let _ = write!(s, ", dilation {}", c.dilation);
            }
            s + no_bias(c.bias)
        }
        Op::Pool(p) => format!("{} {s}x{s}", op.name(), s = p.size),
        Op::Dropout { rate } => format!("dropout {rate}"),
        other => other.name().to_string(),
    }
}

fn no_bias(bias: bool) -> &'static str {
    if bias {
        ""
    } else {
        ", no bias"
    }
}

fn space_table(report: &ModelReport) -> String {
    let space: &Space = &report.space;
    let mut out = String::from("search space\n");
    let width = space
        .params
        .iter()
        .map(|p| p.name.chars().count())
        .max()
        .unwrap_or(0);
    for p in &space.params {
        let points = match p.domain {
            Domain::Float { step: None, .. } => "continuous".to_string(),
            _ => format!("{} points", p.domain.size().unwrap_or(0)),
        };
        let condition = p.condition.as_ref().map_or(String::new(), |c| {
            let values: Vec<String> = c.values.iter().map(ToString::to_string).collect();
            format!(", when {} in [{}]", c.param, values.join(", "))
        });
        let _ = writeln!(
            out,
            "  {}  {}  ({points}, default {}{condition})",
            align(&p.name, width, false),
            p.domain,
            p.default
        );
    }
    let size = match space.size() {
        Some(u64::MAX) => "too many points to count".to_string(),
        Some(n) => format!("{} points", group(n)),
        None => "infinite (continuous ranges)".to_string(),
    };
    let cut = if report.points_cut { ", the limit" } else { "" };
    let _ = writeln!(
        out,
        "size: {size}; statically checked: {} points{cut}",
        report.points_checked
    );
    out
}

/// Formats an integer with thousands separators: `269,322`.
pub fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
