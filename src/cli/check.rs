//! `kiln check FILE`: diagnostics on stderr, a summary per valid model on
//! stdout.

use super::{exit, Format};
use crate::check::ensemble::{rule_word, EnsembleReport, Members};
use crate::check::{check_source, summary, CheckReport, ModelReport};
use crate::diag::render::{self, SourceFile};
use codespan_reporting::term::termcolor::{ColorChoice, StandardStream};
use serde_json::json;
use std::io::IsTerminal;
use std::path::Path;

pub fn run(path: &Path, format: Format) -> u8 {
    let text = match super::read_model_file(path) {
        Ok(text) => text,
        Err(message) => {
            eprintln!("kiln: {message}");
            return exit::USAGE;
        }
    };
    let name = path.display().to_string();
    let file = SourceFile {
        name: &name,
        text: &text,
    };
    let report = check_source(&text);
    match format {
        Format::Text => print_text(&file, &report),
        Format::Json => print_json(&file, &report),
    }
    if report.has_errors() {
        exit::INVALID_MODEL
    } else {
        exit::OK
    }
}

fn print_text(file: &SourceFile, report: &CheckReport) {
    let color = if std::io::stderr().is_terminal() {
        ColorChoice::Auto
    } else {
        ColorChoice::Never
    };
    let mut stderr = StandardStream::stderr(color);
    render::write_text(file, &report.diagnostics, &mut stderr);
    if report.has_errors() {
        let errors = report.diagnostics.iter().filter(|d| d.is_error()).count();
        let plural = if errors == 1 { "" } else { "s" };
        eprintln!("error: `{}` has {errors} error{plural}", file.name);
        return;
    }
    for (i, model) in report.models.iter().enumerate() {
        if i > 0 {
            println!();
        }
        print!("{}", summary::render(model));
    }
    for ensemble in &report.ensembles {
        if !report.models.is_empty() {
            println!();
        }
        print!("{}", summary::render_ensemble(ensemble, &report.models));
    }
}

fn print_json(file: &SourceFile, report: &CheckReport) {
    let models: Vec<_> = report.models.iter().filter_map(model_json).collect();
    let value = json!({
        "file": file.name,
        "ok": !report.has_errors(),
        "diagnostics": render::to_json(file, &report.diagnostics),
        "models": models,
        "ensembles": report.ensembles.iter().filter_map(ensemble_json).collect::<Vec<_>>(),
    });
    println!("{value:#}");
}

fn model_json(model: &ModelReport) -> Option<serde_json::Value> {
    let instance = model.instance.as_ref()?;
    let graph = &instance.graph;
    let layers: Vec<_> = graph
        .nodes
        .iter()
        .map(|n| {
            json!({
                "name": n.name,
                "op": n.op.name(),
                "shape": n.shape.0,
                "params": n.params(),
                "macs": n.macs(),
                "shared": n.shares_weights_of.is_some(),
            })
        })
        .collect();
    let space: Vec<_> = model
        .space
        .params
        .iter()
        .map(|p| {
            json!({
                "name": p.name,
                "domain": p.domain.to_string(),
                "points": p.domain.size(),
                "default": p.default.to_string(),
                "condition": p.condition.as_ref().map(|c| json!({
                    "param": c.param,
                    "values": c.values.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })),
            })
        })
        .collect();
    Some(json!({
        "name": model.name,
        "point": model.point.to_string(),
        "params": graph.params(),
        "non_trainable_params": graph.state(),
        "macs": graph.macs(),
        "layers": layers,
        "search_space": space,
        "space_size": model.space.size(),
        "points_checked": model.points_checked,
    }))
}

fn ensemble_json(report: &EnsembleReport) -> Option<serde_json::Value> {
    let spec = report.spec.as_ref()?;
    let members = match &spec.members {
        Members::Trained(members) => {
            let members: Vec<_> = members
                .iter()
                .map(|m| json!({"model": m.model, "seed": m.seed, "bootstrap": m.bootstrap}))
                .collect();
            json!(members)
        }
        Members::StudyTop { study, top } => json!({"study": study, "top": top}),
    };
    Some(json!({
        "name": report.name,
        "rule": rule_word(spec.rule),
        "members": members,
    }))
}
