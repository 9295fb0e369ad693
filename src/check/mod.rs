//! Checking: resolves every name of a parsed file, elaborates each model at
//! the points of its search space, and infers every shape.
//!
//! The checker never stops at the first mistake: it returns every diagnostic
//! it finds, errors and warnings, ordered by position. Mistakes that occur
//! only at some points of a search space are reported with the assignment
//! that triggers them.

pub mod args;
pub mod elaborate;
pub mod ensemble;
mod errors;
pub mod graph;
pub mod layers;
mod search;
pub mod space;
pub mod summary;
pub mod train;
pub mod value;

use crate::diag::{codes, Diagnostic, Span};
use crate::syntax::{self, ast};
use elaborate::{model_blocks, Elaborator};
use ensemble::EnsembleReport;
use graph::Graph;
use space::{Point, Space};
use std::collections::HashSet;
use train::TrainConfig;

/// How many points of a search space the checker visits at most.
pub const MAX_CHECKED_POINTS: usize = 4096;

/// How many layer instances the search-space check builds at most, summed
/// over all points, so that a huge space of huge models still checks in
/// seconds.
const MAX_CHECKED_NODES: usize = 2_000_000;

/// A parsed file, ready to be checked or instantiated at any point.
pub struct Program {
    pub file: ast::File,
}

/// Limits on what a point of a search space may cost, from a `budget`
/// section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budget {
    pub max_params: Option<u64>,
    /// Multiply-accumulates per sample.
    pub max_macs: Option<u64>,
    /// Activation memory per sample in bytes (4 bytes per float).
    pub max_activation_bytes: Option<u64>,
}

impl Budget {
    /// Describes how `graph` exceeds the budget, if it does.
    pub fn violation(&self, graph: &Graph) -> Option<String> {
        let params = graph.params() as u64;
        let macs = graph.macs();
        let bytes = 4 * graph.activation_floats() as u64;
        let checks = [
            (self.max_params, params, "parameters"),
            (self.max_macs, macs, "MACs per sample"),
            (
                self.max_activation_bytes,
                bytes,
                "activation bytes per sample",
            ),
        ];
        checks.iter().find_map(|(limit, actual, what)| {
            limit
                .filter(|limit| actual > limit)
                .map(|limit| format!("{actual} {what} exceed the budget of {limit}"))
        })
    }
}

/// A model elaborated at one point of its space.
#[derive(Debug, Clone)]
pub struct Instance {
    pub graph: Graph,
    pub train: TrainConfig,
}

/// Result of checking one model.
#[derive(Debug, Clone)]
pub struct ModelReport {
    pub name: String,
    pub space: Space,
    /// The default point and the model there, when it is valid.
    pub point: Point,
    pub instance: Option<Instance>,
    pub budget: Budget,
    pub points_checked: usize,
    /// Whether the space has more points than were checked.
    pub points_cut: bool,
}

/// The result of checking a whole file.
pub struct CheckReport {
    pub models: Vec<ModelReport>,
    pub ensembles: Vec<EnsembleReport>,
    pub diagnostics: Vec<Diagnostic>,
}

impl CheckReport {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Parses and checks a `.model` source text.
pub fn check_source(source: &str) -> CheckReport {
    match Program::parse(source) {
        Ok(program) => program.check(),
        Err(d) => CheckReport {
            models: Vec::new(),
            ensembles: Vec::new(),
            diagnostics: vec![d],
        },
    }
}

impl Program {
    /// # Errors
    /// Returns the syntax diagnostic when the text does not parse.
    pub fn parse(source: &str) -> Result<Program, Diagnostic> {
        syntax::parse(source).map(|file| Program { file })
    }

    pub fn model(&self, name: &str) -> Option<&ast::Model> {
        self.file.models.iter().find(|m| m.name.name == name)
    }

    pub fn ensemble(&self, name: &str) -> Option<&ast::Ensemble> {
        self.file.ensembles.iter().find(|e| e.name.name == name)
    }

    /// Returns the first ensemble item when it comes before every model in
    /// the file, so that commands which pick the first item pick it.
    pub fn first_item_ensemble(&self) -> Option<&ast::Ensemble> {
        let ensemble = self.file.ensembles.first()?;
        let model_start = self
            .file
            .models
            .first()
            .map_or(usize::MAX, |m| m.span.start);
        (ensemble.span.start < model_start).then_some(ensemble)
    }

    /// Checks every model and ensemble of the file.
    pub fn check(&self) -> CheckReport {
        let mut diagnostics = self.check_names();
        let mut models = Vec::new();
        for model in &self.file.models {
            let (report, mut found) = self.check_model(model);
            diagnostics.append(&mut found);
            models.push(report);
        }

        // Ensembles come second because their checks read the models'
        // input and output shapes.
        let scope = ensemble::Scope {
            models: &models,
            ensembles: self
                .file
                .ensembles
                .iter()
                .map(|e| e.name.name.as_str())
                .collect(),
        };
        let mut ensembles = Vec::new();
        for item in &self.file.ensembles {
            let (report, mut found) = ensemble::check_ensemble(item, &scope);
            diagnostics.append(&mut found);
            ensembles.push(report);
        }

        // A file of ensembles that all pool study trials needs no model.
        if self.file.models.is_empty() && self.file.ensembles.is_empty() {
            diagnostics.push(
                Diagnostic::error(codes::MISSING_DECLARATION, "the file declares no model")
                    .primary(0..0, "expected `model NAME { ... }`"),
            );
        }
        diagnostics.sort_by_key(|d| d.primary_span().map_or(0, |s| s.start));
        dedup_diagnostics(&mut diagnostics);
        CheckReport {
            models,
            ensembles,
            diagnostics,
        }
    }

    /// Reports models and blocks declared twice, and blocks named like a
    /// built-in layer.
    fn check_names(&self) -> Vec<Diagnostic> {
        let mut errors = Vec::new();
        let models = self.file.models.iter().map(|m| &m.name);
        duplicates(models, "model", &mut errors);
        let ensembles = self.file.ensembles.iter().map(|e| &e.name);
        duplicates(ensembles, "ensemble", &mut errors);
        self.ensembles_named_like_models(&mut errors);
        duplicates(
            self.file.blocks.iter().map(|b| &b.name),
            "block",
            &mut errors,
        );
        for model in &self.file.models {
            duplicates(model_blocks(model).map(|b| &b.name), "block", &mut errors);
        }
        let all_blocks = self
            .file
            .blocks
            .iter()
            .chain(self.file.models.iter().flat_map(model_blocks));
        for block in all_blocks {
            if layers::find(&block.name.name).is_some() {
                errors.push(
                    Diagnostic::error(
                        codes::DUPLICATE,
                        format!(
                            "block `{}` has the name of a built-in layer",
                            block.name.name
                        ),
                    )
                    .primary(block.name.span.clone(), "rename this block"),
                );
            }
            misplaced(&block.body, &mut errors);
            let names = block
                .inputs
                .iter()
                .chain(block.params.iter().map(|(p, _)| p));
            duplicates(names, "block input or setting", &mut errors);
        }
        for model in &self.file.models {
            for stmt in &model.body {
                if let ast::Stmt::Repeat { body, .. } = stmt {
                    misplaced(body, &mut errors);
                }
            }
        }
        errors
    }

    /// Reports ensembles named like a model, because `--model NAME` picks
    /// items by name.
    fn ensembles_named_like_models(&self, errors: &mut Vec<Diagnostic>) {
        for item in &self.file.ensembles {
            let Some(model) = self.model(&item.name.name) else {
                continue;
            };
            errors.push(
                Diagnostic::error(
                    codes::DUPLICATE,
                    format!("ensemble `{}` has the name of a model", item.name.name),
                )
                .primary(item.name.span.clone(), "rename this ensemble")
                .secondary(model.name.span.clone(), "model declared here"),
            );
        }
    }

    /// Reads a model's search space.
    pub fn space(&self, model: &ast::Model) -> (Space, Vec<Diagnostic>) {
        let mut entries = Vec::new();
        let mut errors = Vec::new();
        let mut first_section: Option<&Span> = None;
        for stmt in &model.body {
            if let ast::Stmt::Search { entries: e, span } = stmt {
                if let Some(first) = first_section {
                    errors.push(second_section("search", span, first));
                }
                first_section.get_or_insert(span);
                entries.extend(e.iter());
            }
        }
        let block_names: Vec<&str> = model_blocks(model)
            .chain(&self.file.blocks)
            .map(|b| b.name.name.as_str())
            .collect();
        let (space, mut found) = search::parse_space(&entries, &block_names);
        errors.append(&mut found);
        (space, errors)
    }

    /// Elaborates `model` at `point` (completed with defaults), returning the
    /// graph and the training recipe, or the errors that prevent them.
    pub fn instantiate(
        &self,
        model: &ast::Model,
        space: &Space,
        point: &Point,
    ) -> Result<Instance, Vec<Diagnostic>> {
        let run = self.elaborate(model, space, point);
        let errors: Vec<Diagnostic> = run
            .diagnostics
            .into_iter()
            .filter(|d| d.is_error())
            .collect();
        match (errors.is_empty(), run.instance) {
            (true, Some(instance)) => Ok(instance),
            _ => Err(errors),
        }
    }

    fn elaborate(&self, model: &ast::Model, space: &Space, point: &Point) -> Elaboration {
        let mut elaborator = Elaborator::new(&self.file, model, space, point);
        elaborator.run();
        let train = self.train_config(model, &mut elaborator);
        let mut diagnostics = std::mem::take(&mut elaborator.diagnostics);
        let has_errors = diagnostics.iter().any(Diagnostic::is_error);
        let warnings = if has_errors {
            Vec::new()
        } else {
            unused_values(&elaborator.graph, &elaborator.assigned)
        };
        let instance = match train {
            Ok(train) if !has_errors => {
                let mut graph = std::mem::take(&mut elaborator.graph);
                graph.prune();
                Some(Instance { graph, train })
            }
            Ok(_) => None,
            Err(mut errors) => {
                diagnostics.append(&mut errors);
                None
            }
        };
        Elaboration {
            warnings,
            nodes_built: instance
                .as_ref()
                .map_or(elaborator.graph.nodes.len(), |i| i.graph.nodes.len()),
            diagnostics,
            instance,
            used_hparams: std::mem::take(&mut elaborator.used_hparams),
        }
    }

    fn train_config(
        &self,
        model: &ast::Model,
        elaborator: &mut Elaborator,
    ) -> Result<TrainConfig, Vec<Diagnostic>> {
        let mut settings = Vec::new();
        let mut errors = Vec::new();
        let mut first_section: Option<&Span> = None;
        for stmt in &model.body {
            let ast::Stmt::Train { settings: s, span } = stmt else {
                continue;
            };
            if let Some(first) = first_section {
                errors.push(second_section("train", span, first));
            }
            first_section.get_or_insert(span);
            for setting in s {
                // A failed value has already been reported by the elaborator.
                if let Some(value) = elaborator.model_setting(&setting.value) {
                    settings.push((setting, value));
                }
            }
        }
        let config = train::parse_train(&settings);
        match (config, errors.is_empty()) {
            (Ok(config), true) => Ok(config),
            (Ok(_), false) => Err(errors),
            (Err(mut more), _) => {
                errors.append(&mut more);
                Err(errors)
            }
        }
    }

    fn budget(&self, model: &ast::Model) -> (Budget, Vec<Diagnostic>) {
        let mut budget = Budget::default();
        let mut errors = Vec::new();
        let mut first_section: Option<&Span> = None;
        let mut seen: Vec<&ast::Ident> = Vec::new();
        for stmt in &model.body {
            let ast::Stmt::Budget { settings, span } = stmt else {
                continue;
            };
            if let Some(first) = first_section {
                errors.push(second_section("budget", span, first));
            }
            first_section.get_or_insert(span);
            for setting in settings {
                if let Some(first) = seen.iter().find(|k| k.name == setting.key.name) {
                    errors.push(
                        Diagnostic::error(
                            codes::DUPLICATE,
                            format!("`{}` is set twice", setting.key.name),
                        )
                        .primary(setting.key.span.clone(), "set again here")
                        .secondary(first.span.clone(), "first set here"),
                    );
                    continue;
                }
                seen.push(&setting.key);
                let value = match &setting.value.kind {
                    ast::ExprKind::Number { value, .. }
                        if value.is_finite() && *value >= 0.0 && value.fract() == 0.0 =>
                    {
                        Some(*value as u64)
                    }
                    _ => None,
                };
                let slot = match setting.key.name.as_str() {
                    "params" => &mut budget.max_params,
                    "macs" => &mut budget.max_macs,
                    "memory" => &mut budget.max_activation_bytes,
                    other => {
                        errors.push(
                            Diagnostic::error(
                                codes::BAD_TRAIN_SETTING,
                                format!("unknown budget `{other}`"),
                            )
                            .primary(setting.key.span.clone(), "unknown budget")
                            .note("budgets are `params`, `macs` (per sample) and `memory` (activation bytes per sample)"),
                        );
                        continue;
                    }
                };
                match value {
                    Some(v) => *slot = Some(v),
                    None => errors.push(
                        Diagnostic::error(
                            codes::BAD_TRAIN_SETTING,
                            "a budget is a non-negative number",
                        )
                        .primary(setting.value.span.clone(), "invalid budget"),
                    ),
                }
            }
        }
        (budget, errors)
    }

    fn check_model(&self, model: &ast::Model) -> (ModelReport, Vec<Diagnostic>) {
        let (space, mut diagnostics) = self.space(model);
        let (budget, mut budget_errors) = self.budget(model);
        diagnostics.append(&mut budget_errors);
        let point = space.default_point();
        let mut report = ModelReport {
            name: model.name.name.clone(),
            space: space.clone(),
            point: point.clone(),
            instance: None,
            budget,
            points_checked: 0,
            points_cut: false,
        };
        if diagnostics.iter().any(Diagnostic::is_error) {
            return (report, diagnostics);
        }

        let default_run = self.elaborate(model, &space, &point);
        let mut used: HashSet<String> = default_run.used_hparams.clone();
        diagnostics.extend(default_run.diagnostics.iter().cloned());
        diagnostics.extend(default_run.warnings.iter().cloned());
        diagnostics.extend(channels_last_warnings(model));
        if let Some(instance) = &default_run.instance {
            if let Some(excess) = report.budget.violation(&instance.graph) {
                diagnostics.push(
                    Diagnostic::warning(
                        codes::OVER_BUDGET,
                        format!("the default point is over budget: {excess}"),
                    )
                    .primary(model.name.span.clone(), "in this model")
                    .note("a sweep rejects points over budget without training them"),
                );
            }
        }
        report.instance = default_run.instance;

        // The rest of the space is checked only when the default point is
        // valid: its errors come first, and they would repeat at every point.
        let default_ok = report.instance.is_some();
        if default_ok && !space.is_empty() {
            let (points, cut) = space.check_points(MAX_CHECKED_POINTS);
            report.points_cut = cut;
            let mut nodes_built = 0usize;
            let mut known: HashSet<(&'static str, Option<Span>)> = diagnostics
                .iter()
                .map(|d| (d.code, d.primary_span().cloned()))
                .collect();
            for p in &points {
                if nodes_built > MAX_CHECKED_NODES {
                    report.points_cut = true;
                    break;
                }
                let run = self.elaborate(model, &space, p);
                report.points_checked += 1;
                nodes_built += run.nodes_built;
                used.extend(run.used_hparams);
                for d in run.diagnostics.into_iter().filter(Diagnostic::is_error) {
                    if known.insert((d.code, d.primary_span().cloned())) {
                        diagnostics.push(at_point(d, p));
                    }
                }
            }
        }
        for hparam in space.params.iter().filter(|_| default_ok) {
            if !used.contains(&hparam.name) {
                diagnostics.push(
                    Diagnostic::warning(
                        codes::UNUSED_HPARAM,
                        format!("hyperparameter `{}` is never used", hparam.name),
                    )
                    .primary(hparam.span.clone(), "declared here")
                    .help(
                        "use it in a layer, a `repeat` count or the `train` section, or remove it",
                    ),
                );
            }
        }
        (report, diagnostics)
    }
}

/// Output of one elaboration.
struct Elaboration {
    /// Values that do not reach the output.
    warnings: Vec<Diagnostic>,
    nodes_built: usize,
    diagnostics: Vec<Diagnostic>,
    instance: Option<Instance>,
    used_hparams: HashSet<String>,
}

/// Warns about assigned values that do not reach the output.
fn unused_values(graph: &Graph, assigned: &[(String, Span, graph::NodeId)]) -> Vec<Diagnostic> {
    let live = graph.live();
    let mut reported: HashSet<usize> = HashSet::new();
    let mut live_spans: HashSet<usize> = HashSet::new();
    for (_, span, node) in assigned {
        if live[node.index()] {
            live_spans.insert(span.start);
        }
    }
    let mut warnings = Vec::new();
    for (name, span, node) in assigned {
        // A definition inside a block or `repeat` runs several times; it is
        // unused only if no run of it reaches the output.
        if live[node.index()] || live_spans.contains(&span.start) || !reported.insert(span.start) {
            continue;
        }
        warnings.push(
            Diagnostic::warning(codes::UNREACHABLE, format!("value `{name}` is never used"))
                .primary(span.clone(), "does not reach the model's output")
                .help("use it, or remove it; unused layers are not trained"),
        );
    }
    warnings
}

/// Warns about inputs such as `[28, 28, 1]`, which look like Keras'
/// channels-last layout; kiln reads `[C, H, W]`.
fn channels_last_warnings(model: &ast::Model) -> Vec<Diagnostic> {
    let dims = |shape: &[ast::Expr]| -> Option<Vec<f64>> {
        shape
            .iter()
            .map(|e| match e.kind {
                ast::ExprKind::Number { value, .. } => Some(value),
                _ => None,
            })
            .collect()
    };
    let mut warnings = Vec::new();
    for stmt in &model.body {
        let ast::Stmt::Input { name, shape, span } = stmt else {
            continue;
        };
        let Some(values) = dims(shape) else {
            continue;
        };
        let [c, h, w] = values[..] else {
            continue;
        };
        if [1.0, 3.0, 4.0].contains(&w) && c > 4.0 && h > 4.0 {
            warnings.push(
                Diagnostic::warning(
                    codes::CHANNELS_LAST,
                    format!("input `{}` looks channels-last", name.name),
                )
                .primary(span.clone(), format!("read as {c} channels of {h}x{w}"))
                .help(format!("kiln expects channels first: `[{w}, {c}, {h}]`")),
            );
        }
    }
    warnings
}

/// Prefixes a diagnostic with the point of the space where it occurs.
fn at_point(mut d: Diagnostic, point: &Point) -> Diagnostic {
    d.message = format!("with {point}: {}", d.message);
    d.notes
        .push("this happens only at some points of the search space".to_string());
    d
}

fn duplicates<'a>(
    names: impl Iterator<Item = &'a ast::Ident>,
    what: &str,
    out: &mut Vec<Diagnostic>,
) {
    let mut seen: Vec<&ast::Ident> = Vec::new();
    for name in names {
        if let Some(first) = seen.iter().find(|s| s.name == name.name) {
            out.push(
                Diagnostic::error(
                    codes::DUPLICATE,
                    format!("{what} `{}` is declared twice", name.name),
                )
                .primary(name.span.clone(), "declared again here")
                .secondary(first.span.clone(), "first declared here"),
            );
        } else {
            seen.push(name);
        }
    }
}

fn second_section(what: &str, span: &Span, first: &Span) -> Diagnostic {
    Diagnostic::error(
        codes::DUPLICATE,
        format!("a model has at most one `{what}` section"),
    )
    .primary(span.clone(), "second section")
    .secondary(first.clone(), "first section")
    .help("merge the two sections")
}

/// Reports sections and blocks in a block or `repeat` body, where they
/// have no meaning: they belong at the top of a model (or, for blocks, of
/// the file).
fn misplaced(body: &[ast::Stmt], errors: &mut Vec<Diagnostic>) {
    for stmt in body {
        if let Some(span) = section_span(stmt) {
            errors.push(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    "`search`, `train`, `budget`, `input` and `output` belong at the top of a model",
                )
                .primary(span, "move this to the top level of the model"),
            );
        }
        match stmt {
            ast::Stmt::Block(block) => errors.push(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!(
                        "block `{}` is declared inside another body",
                        block.name.name
                    ),
                )
                .primary(block.name.span.clone(), "declared here")
                .help("declare blocks at the top of the file or of a model"),
            ),
            ast::Stmt::Repeat { body, .. } => misplaced(body, errors),
            _ => {}
        }
    }
}

fn section_span(stmt: &ast::Stmt) -> Option<Span> {
    match stmt {
        ast::Stmt::Search { span, .. }
        | ast::Stmt::Train { span, .. }
        | ast::Stmt::Budget { span, .. }
        | ast::Stmt::Input { span, .. }
        | ast::Stmt::Output { span, .. } => Some(span.clone()),
        _ => None,
    }
}

/// Maximum number of diagnostics reported for one file. The rest are
/// counted in a final diagnostic.
const MAX_DIAGNOSTICS: usize = 200;

/// Removes repeats of the same diagnostic, which blocks and `repeat` bodies
/// produce once per instance, and cuts an overlong list.
fn dedup_diagnostics(diagnostics: &mut Vec<Diagnostic>) {
    let mut seen: HashSet<(&'static str, String, Option<Span>)> = HashSet::new();
    diagnostics.retain(|d| seen.insert((d.code, d.message.clone(), d.primary_span().cloned())));
    if diagnostics.len() > MAX_DIAGNOSTICS {
        let hidden = diagnostics.len() - MAX_DIAGNOSTICS;
        let errors = diagnostics[MAX_DIAGNOSTICS..]
            .iter()
            .any(Diagnostic::is_error);
        diagnostics.truncate(MAX_DIAGNOSTICS);
        let summary = format!("{hidden} more diagnostics are not shown");
        diagnostics.push(if errors {
            Diagnostic::error(codes::TOO_MANY, summary)
        } else {
            Diagnostic::warning(codes::TOO_MANY, summary)
        });
    }
}
