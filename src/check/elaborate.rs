//! Elaboration: runs a model's statements at one point of its search space
//! and builds the [`Graph`], inferring every shape on the way.
//!
//! Blocks are expanded at each call with fresh weights, `repeat` bodies run
//! their count of times, and shared layers (`layer NAME = ...`) create nodes
//! that point at their first use's weights.

use super::args::{bind, suggest};
use super::errors::{bind_error, layer_error, quote_list, KeywordArg};
use super::graph::{Graph, Node, NodeId, Op, Shape};
use super::layers::{self, Arity, LayerSpec};
use super::space::{Point, Space};
use super::value::{CallValue, Value};
use crate::diag::{codes, Diagnostic, Span};
use crate::syntax::ast::{self, BinOp, Call, Expr, ExprKind, Stmt};
use std::collections::{BTreeMap, HashMap, HashSet};

/// Limits that keep a hostile or mistaken file from exhausting memory.
const MAX_NODES: usize = 100_000;
/// The largest value per sample, in elements: 2^31, which also keeps byte
/// offsets of a batch within 64 bits.
const MAX_VALUE_ELEMENTS: usize = 1 << 31;
const MAX_BLOCK_DEPTH: usize = 64;
/// Statements executed at most while elaborating one point, counting every
/// `repeat` iteration, so that nested repeats of nothing still terminate.
const MAX_STATEMENTS: usize = 1_000_000;
/// Nested evaluations (calls inside calls, blocks inside blocks) at most,
/// which bounds the recursion of the elaborator.
const MAX_NESTING: usize = 1_000;

/// A value name's binding inside a frame.
#[derive(Clone)]
enum Binding {
    Tensor {
        node: NodeId,
        def: Span,
    },
    Shared(usize),
    /// A value whose definition failed; its uses report nothing more.
    Failed,
}

/// A layer declared with `layer NAME = ...`, whose uses share weights.
struct SharedLayer {
    spec: &'static LayerSpec,
    keywords: Vec<(String, Value)>,
    /// The first use: its nodes and the input shape they were built for.
    first: Option<(Vec<NodeId>, Shape, Span)>,
}

/// Where a block was declared, which decides what its body can see.
#[derive(Clone, Copy)]
enum Scope {
    /// In a model: its body can use the model's blocks and hyperparameters.
    Model,
    /// At the top of the file: its body can use only top-level blocks and
    /// its own settings.
    File,
}

/// The state of one model body or one block instance.
struct Frame<'p> {
    values: HashMap<String, Binding>,
    /// Block settings bound at the call.
    settings: HashMap<String, Value>,
    scope: Scope,
    /// Prefix of node names, such as `x.residual/`.
    prefix: String,
    /// How many `repeat` statements this frame has run, to name their nodes.
    repeats: usize,
    /// The statements of this model or block, to explain a use before
    /// definition.
    body: &'p [Stmt],
}

/// A declared output: its name, optional shape and where it was declared.
pub struct OutputDecl {
    pub name: ast::Ident,
    pub shape: Option<Vec<Expr>>,
    pub span: Span,
}

pub struct Elaborator<'p> {
    model: &'p ast::Model,
    space: &'p Space,
    point: &'p Point,
    pub graph: Graph,
    pub diagnostics: Vec<Diagnostic>,
    /// Hyperparameters read while elaborating.
    pub used_hparams: HashSet<String>,
    /// Every assigned value: its name, definition span and node.
    pub assigned: Vec<(String, Span, NodeId)>,
    pub outputs: Vec<OutputDecl>,
    shared: Vec<SharedLayer>,
    /// Blocks declared in the model body, by name, and at the top of the file.
    local_blocks: BTreeMap<&'p str, &'p ast::Block>,
    file_blocks: BTreeMap<&'p str, &'p ast::Block>,
    node_names: HashSet<String>,
    inputs_declared: usize,
    /// Next free suffix for each node name, so names stay unique in
    /// constant time.
    name_counts: HashMap<String, usize>,
    statements: usize,
    nesting: usize,
    /// The block calls being instantiated, innermost last.
    call_stack: Vec<(Span, String)>,
    depth: usize,
    aborted: bool,
}

/// The resolved callee of a call.
enum Callee<'p> {
    Layer(&'static LayerSpec),
    Block(&'p ast::Block, Scope),
    Shared(usize),
}

impl<'p> Elaborator<'p> {
    pub fn new(
        file: &'p ast::File,
        model: &'p ast::Model,
        space: &'p Space,
        point: &'p Point,
    ) -> Self {
        Elaborator {
            model,
            space,
            point,
            graph: Graph::default(),
            diagnostics: Vec::new(),
            used_hparams: HashSet::new(),
            assigned: Vec::new(),
            outputs: Vec::new(),
            shared: Vec::new(),
            local_blocks: first_by_name(model_blocks(model)),
            file_blocks: first_by_name(file.blocks.iter()),
            node_names: HashSet::new(),
            inputs_declared: 0,
            name_counts: HashMap::new(),
            statements: 0,
            nesting: 0,
            call_stack: Vec::new(),
            depth: 0,
            aborted: false,
        }
    }

    /// Runs the model body and resolves the output. Returns the frame's
    /// bindings so the caller can look values up.
    pub fn run(&mut self) {
        let mut frame = Frame {
            values: HashMap::new(),
            settings: HashMap::new(),
            scope: Scope::Model,
            prefix: String::new(),
            repeats: 0,
            body: &self.model.body,
        };
        self.exec(&mut frame, &self.model.body);
        if !self.aborted {
            self.resolve_output(&frame);
        }
        self.decide_auto_bias();
    }

    /// Evaluates a setting at model level, where hyperparameters are
    /// visible: used for the `train` and `budget` sections.
    pub fn model_setting(&mut self, expr: &Expr) -> Option<Value> {
        let frame = Frame {
            values: HashMap::new(),
            settings: HashMap::new(),
            scope: Scope::Model,
            prefix: String::new(),
            repeats: 0,
            body: &[],
        };
        self.setting(&frame, expr)
    }

    fn error(&mut self, mut diagnostic: Diagnostic) {
        if let Some((span, block)) = self.call_stack.first() {
            diagnostic =
                diagnostic.secondary(span.clone(), format!("in this use of block `{block}`"));
        }
        if diagnostic.code == codes::UNKNOWN_HPARAM {
            // The name sits in the first backticks of the message.
            let name = diagnostic.message.split('`').nth(1).unwrap_or_default();
            let declared = self.space.params.iter().map(|p| p.name.as_str());
            diagnostic.help = match suggest(name, declared) {
                Some(close) if close == name => Some(format!(
                    "blocks declared outside a model cannot see its hyperparameters; pass `{name}` as a block setting, or declare the block inside the model"
                )),
                Some(close) => Some(format!("did you mean `{close}`?")),
                None => diagnostic.help,
            };
        }
        self.diagnostics.push(diagnostic);
    }

    // ------------------------------------------------------------ statements

    fn exec(&mut self, frame: &mut Frame<'p>, stmts: &'p [Stmt]) {
        for stmt in stmts {
            if self.aborted {
                return;
            }
            self.statements += 1;
            if self.statements > MAX_STATEMENTS {
                self.aborted = true;
                let span = stmt_span(stmt);
                return self.error(
                    Diagnostic::error(
                        codes::INVALID_ARGUMENT,
                        format!("model runs more than {MAX_STATEMENTS} statements"),
                    )
                    .primary(span, "the limit was reached here")
                    .note("check the counts of nested `repeat` statements"),
                );
            }
            match stmt {
                Stmt::Input { name, shape, span } => self.input(frame, name, shape, span),
                Stmt::Output { name, shape, span } => self.outputs.push(OutputDecl {
                    name: name.clone(),
                    shape: shape.clone(),
                    span: span.clone(),
                }),
                Stmt::Assign { name, value } => {
                    if let Some(Binding::Shared(_)) = frame.values.get(&name.name) {
                        self.value_shadows_shared_layer(frame, name, value);
                        continue;
                    }
                    let binding = match self.tensor(frame, value, &name.name) {
                        Some(node) => {
                            self.assigned
                                .push((name.name.clone(), name.span.clone(), node));
                            Binding::Tensor {
                                node,
                                def: name.span.clone(),
                            }
                        }
                        None => Binding::Failed,
                    };
                    frame.values.insert(name.name.clone(), binding);
                }
                Stmt::Layer { name, call } => self.declare_shared(frame, name, call),
                Stmt::Repeat { count, body, .. } => self.repeat(frame, count, body),
                // Blocks are looked up by name at each call; the sections are
                // read by the model checker.
                Stmt::Block(_) | Stmt::Search { .. } | Stmt::Train { .. } | Stmt::Budget { .. } => {
                }
            }
        }
    }

    /// Rejects a value named like a shared layer: binding it would hide the
    /// layer from every later call. The value is still checked, and the
    /// layer keeps the name.
    fn value_shadows_shared_layer(
        &mut self,
        frame: &mut Frame<'p>,
        name: &ast::Ident,
        value: &'p Expr,
    ) {
        self.error(
            Diagnostic::error(
                codes::DUPLICATE,
                format!(
                    "`{}` is a shared layer; a value cannot take its name",
                    name.name
                ),
            )
            .primary(name.span.clone(), "assigned here")
            .help("rename the value or the shared layer"),
        );
        let _ = self.tensor(frame, value, &name.name);
    }

    fn input(&mut self, frame: &mut Frame<'p>, name: &ast::Ident, dims: &[Expr], span: &Span) {
        self.inputs_declared += 1;
        if frame.values.contains_key(&name.name) {
            self.error(
                Diagnostic::error(
                    codes::DUPLICATE,
                    format!("input `{}` is declared twice", name.name),
                )
                .primary(name.span.clone(), "declared again here"),
            );
            return;
        }
        // Until the shape is known to be valid, uses of the input report
        // nothing more.
        frame.values.insert(name.name.clone(), Binding::Failed);
        let mut shape = Vec::new();
        for dim in dims {
            let value = self.setting(frame, dim);
            match value.as_ref().and_then(Value::as_i64) {
                Some(d) if d > 0 && d <= layers::MAX_SIZE_SETTING => shape.push(d as usize),
                Some(d) if d > 0 => {
                    return self.error(
                        Diagnostic::error(
                            codes::INVALID_ARGUMENT,
                            format!(
                                "input dimension {d} is larger than the maximum {}",
                                layers::MAX_SIZE_SETTING
                            ),
                        )
                        .primary(dim.span.clone(), "too large"),
                    )
                }
                Some(d) => {
                    return self.error(
                        Diagnostic::error(
                            codes::NOT_POSITIVE,
                            format!("input dimensions must be positive, found {d}"),
                        )
                        .primary(dim.span.clone(), "not positive"),
                    )
                }
                None if value.is_some() => {
                    return self.error(
                        Diagnostic::error(
                            codes::INVALID_ARGUMENT,
                            "input dimensions must be integers",
                        )
                        .primary(dim.span.clone(), "not an integer"),
                    )
                }
                None => return,
            }
        }
        if shape.len() != 1 && shape.len() != 3 {
            return self.error(
                Diagnostic::error(
                    codes::WRONG_RANK,
                    format!("input `{}` has {} dimensions", name.name, shape.len()),
                )
                .primary(span.clone(), "expected [C, H, W] or [F]")
                .note("inputs are images, channels first, or flat feature vectors; the batch axis is implicit"),
            );
        }
        let node = self.push_node(
            &name.name,
            Op::Input,
            Vec::new(),
            Shape(shape),
            name.span.clone(),
        );
        self.graph.inputs.push((name.name.clone(), node));
        frame.values.insert(
            name.name.clone(),
            Binding::Tensor {
                node,
                def: name.span.clone(),
            },
        );
    }

    fn repeat(&mut self, frame: &mut Frame<'p>, count: &Expr, body: &'p [Stmt]) {
        let Some(value) = self.setting(frame, count) else {
            return;
        };
        let times = match value.as_i64() {
            Some(n) if (0..=10_000).contains(&n) => n,
            _ => {
                return self.error(
                    Diagnostic::error(
                        codes::INVALID_ARGUMENT,
                        format!("`repeat` needs an integer count from 0 to 10000, found {value}"),
                    )
                    .primary(count.span.clone(), "invalid count"),
                )
            }
        };
        let outer = frame.prefix.clone();
        let ordinal = frame.repeats;
        frame.repeats += 1;
        for i in 0..times {
            // Each iteration counts as a statement, so nested repeats of
            // empty bodies still reach the limit.
            self.statements += 1;
            if self.statements > MAX_STATEMENTS {
                self.aborted = true;
                self.error(
                    Diagnostic::error(
                        codes::INVALID_ARGUMENT,
                        format!("model runs more than {MAX_STATEMENTS} statements"),
                    )
                    .primary(count.span.clone(), "the limit was reached here")
                    .note("check the counts of nested `repeat` statements"),
                );
                break;
            }
            frame.prefix = format!("{outer}repeat{ordinal}.{i}/");
            self.exec(frame, body);
            if self.aborted {
                break;
            }
        }
        frame.prefix = outer;
    }

    fn declare_shared(&mut self, frame: &mut Frame<'p>, name: &ast::Ident, call: &'p Call) {
        frame.values.insert(name.name.clone(), Binding::Failed);
        let Some(spec) = layers::find(&call.callee.name) else {
            let message = format!(
                "`layer` takes a built-in layer, found `{}`",
                call.callee.name
            );
            return self.error(
                Diagnostic::error(codes::UNKNOWN_LAYER, message)
                    .primary(call.callee.span.clone(), "not a built-in layer")
                    .note("blocks are instantiated with fresh weights at every call and cannot be shared"),
            );
        };
        if spec.arity != Arity::One {
            return self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!(
                        "`{}` takes several inputs and has no weights, so it cannot be shared",
                        spec.name
                    ),
                )
                .primary(call.callee.span.clone(), "not a shareable layer")
                .help(format!("call `{}` directly where it is needed", spec.name)),
            );
        }
        if let Some(extra) = call.positional().next() {
            return self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!(
                        "shared layer `{}` takes its input where it is used",
                        name.name
                    ),
                )
                .primary(extra.span.clone(), "remove this input")
                .help(format!(
                    "write `y = {}(x)` where the layer is applied",
                    name.name
                )),
            );
        }
        let Some(keywords) = self.keywords(frame, call) else {
            return;
        };
        let pairs = key_values(&keywords);
        if let Err(e) = bind(spec.params, &pairs) {
            let d = bind_error("layer", call, spec.params, &keywords, e);
            return self.error(d);
        }
        self.shared.push(SharedLayer {
            spec,
            keywords: pairs,
            first: None,
        });
        frame
            .values
            .insert(name.name.clone(), Binding::Shared(self.shared.len() - 1));
    }

    // ------------------------------------------------------------ tensors

    /// Evaluates an expression that must produce a tensor. `value` names the
    /// value being assigned, for node names and cycle reports.
    fn tensor(&mut self, frame: &mut Frame<'p>, expr: &'p Expr, value: &str) -> Option<NodeId> {
        if self.aborted {
            return None;
        }
        self.nesting += 1;
        let result = if self.nesting > MAX_NESTING {
            self.aborted = true;
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!("model nests calls and blocks more than {MAX_NESTING} levels deep"),
                )
                .primary(expr.span.clone(), "the limit was reached here")
                .help("split long pipelines into named values"),
            );
            None
        } else {
            self.tensor_inner(frame, expr, value)
        };
        self.nesting -= 1;
        result
    }

    fn tensor_inner(
        &mut self,
        frame: &mut Frame<'p>,
        expr: &'p Expr,
        value: &str,
    ) -> Option<NodeId> {
        match &expr.kind {
            ExprKind::Name(name) => self.lookup_tensor(frame, name, &expr.span, value),
            ExprKind::Call(call) => self.call(frame, call, value),
            ExprKind::Binary(BinOp::Add, lhs, rhs) => {
                let a = self.tensor(frame, lhs, value);
                let b = self.tensor(frame, rhs, value);
                let (a, b) = (a?, b?);
                let spec = layers::find("add").expect("`add` is a built-in layer");
                let inputs = [(lhs.span.clone(), a), (rhs.span.clone(), b)];
                self.apply_layer(frame, spec, &expr.span, &[], &inputs, value, None)
                    .and_then(|nodes| nodes.last().copied())
            }
            ExprKind::Binary(op, _, _) => {
                self.error(
                    Diagnostic::error(
                        codes::INVALID_ARGUMENT,
                        format!("tensors support `+` only, found `{}`", op.symbol()),
                    )
                    .primary(expr.span.clone(), "not supported on tensors"),
                );
                None
            }
            ExprKind::Number { .. } | ExprKind::Str(_) | ExprKind::List(_) | ExprKind::Neg(_) => {
                self.error(
                    Diagnostic::error(codes::INVALID_ARGUMENT, "expected a tensor value")
                        .primary(expr.span.clone(), "this is not a tensor")
                        .note("layer inputs are passed by position; settings are passed by name, as in `kernel = 3`"),
                );
                None
            }
        }
    }

    fn lookup_tensor(
        &mut self,
        frame: &Frame<'p>,
        name: &str,
        span: &Span,
        value: &str,
    ) -> Option<NodeId> {
        match frame.values.get(name) {
            Some(Binding::Tensor { node, .. }) => return Some(*node),
            Some(Binding::Shared(_)) => {
                self.error(
                    Diagnostic::error(
                        codes::INVALID_ARGUMENT,
                        format!("`{name}` is a shared layer, not a value"),
                    )
                    .primary(span.clone(), "apply it to an input, as in `y = layer(x)`"),
                );
                return None;
            }
            Some(Binding::Failed) => return None,
            None => {}
        }
        let d = self.undefined_value(frame, name, span, value);
        self.error(d);
        None
    }

    /// Explains a name that is not defined at this point of a frame: defined
    /// later (a use before definition, possibly a cycle) or not at all.
    fn undefined_value(
        &self,
        frame: &Frame<'p>,
        name: &str,
        span: &Span,
        value: &str,
    ) -> Diagnostic {
        if let Some(later) = find_assignment(frame.body, name) {
            let mut d = Diagnostic::error(
                codes::USE_BEFORE_DEFINITION,
                format!("`{name}` is used before it is defined"),
            )
            .primary(span.clone(), "used here")
            .secondary(
                later.0.span.clone(),
                format!("`{name}` is defined here, later"),
            );
            if mentions(later.1, value) {
                d = d.note(format!(
                    "`{name}` depends on `{value}` and `{value}` on `{name}`: a model's graph cannot contain a cycle"
                ));
            } else {
                d = d.help(format!("move the definition of `{name}` above this line"));
            }
            return d;
        }
        let mut d = Diagnostic::error(codes::UNKNOWN_VALUE, format!("unknown value `{name}`"))
            .primary(span.clone(), "not defined");
        let known = frame.values.keys().map(String::as_str);
        if let Some(close) = suggest(name, known) {
            d = d.help(format!("did you mean `{close}`?"));
        }
        d
    }

    fn call(&mut self, frame: &mut Frame<'p>, call: &'p Call, value: &str) -> Option<NodeId> {
        let callee = self.resolve_callee(frame, call)?;
        let mut inputs = Vec::new();
        let mut failed = false;
        for arg in call.positional() {
            match self.tensor(frame, arg, value) {
                Some(node) => inputs.push((arg.span.clone(), node)),
                None => failed = true,
            }
        }
        let keywords = self.keywords(frame, call)?;
        if failed {
            return None;
        }
        match callee {
            Callee::Layer(spec) => {
                let nodes = self.apply_layer(
                    frame,
                    spec,
                    &call.span,
                    &keywords,
                    &inputs,
                    value,
                    Some(call),
                )?;
                nodes.last().copied()
            }
            Callee::Block(block, scope) => {
                self.instantiate_block(frame, block, scope, call, &keywords, &inputs, value)
            }
            Callee::Shared(index) => self.apply_shared(frame, index, call, &inputs, value),
        }
    }

    fn resolve_callee(&mut self, frame: &Frame<'p>, call: &Call) -> Option<Callee<'p>> {
        let name = &call.callee.name;
        match frame.values.get(name) {
            Some(Binding::Shared(index)) => return Some(Callee::Shared(*index)),
            Some(Binding::Failed) => return None,
            _ => {}
        }
        let bound = frame
            .settings
            .get(name)
            .cloned()
            .or_else(|| self.hparam_value(frame, name, &call.callee.span));
        if let Some(value) = bound {
            return match &value {
                Value::Block(block) | Value::Word(block) => self.callee_by_name(frame, block, call),
                other => {
                    self.error(
                        Diagnostic::error(
                            codes::UNKNOWN_LAYER,
                            format!(
                                "`{name}` is {} `{other}`, not a layer or block",
                                other.kind_name()
                            ),
                        )
                        .primary(call.callee.span.clone(), "cannot be called"),
                    );
                    None
                }
            };
        }
        self.callee_by_name(frame, name, call)
    }

    fn callee_by_name(&mut self, frame: &Frame<'p>, name: &str, call: &Call) -> Option<Callee<'p>> {
        if let Some(spec) = layers::find(name) {
            return Some(Callee::Layer(spec));
        }
        if let Some((block, scope)) = self.find_block(frame, name) {
            return Some(Callee::Block(block, scope));
        }
        let mut d = Diagnostic::error(
            codes::UNKNOWN_LAYER,
            format!("unknown layer or block `{name}`"),
        )
        .primary(
            call.callee.span.clone(),
            "not a built-in layer or a declared block",
        );
        let candidates = layers::LAYERS
            .iter()
            .map(|l| l.name)
            .chain(self.visible_blocks(frame).map(|b| b.name.name.as_str()));
        if let Some(close) = suggest(name, candidates) {
            d = d.help(format!("did you mean `{close}`?"));
        }
        self.error(d);
        None
    }

    fn visible_blocks(&self, frame: &Frame<'p>) -> impl Iterator<Item = &'p ast::Block> + '_ {
        let local = match frame.scope {
            Scope::Model => Some(self.local_blocks.values().copied()),
            Scope::File => None,
        };
        local
            .into_iter()
            .flatten()
            .chain(self.file_blocks.values().copied())
    }

    fn find_block(&self, frame: &Frame<'p>, name: &str) -> Option<(&'p ast::Block, Scope)> {
        if let Scope::Model = frame.scope {
            if let Some(b) = self.local_blocks.get(name) {
                return Some((b, Scope::Model));
            }
        }
        let b = self.file_blocks.get(name)?;
        Some((b, Scope::File))
    }

    /// Evaluates a call's keyword arguments as settings.
    fn keywords(&mut self, frame: &Frame<'p>, call: &'p Call) -> Option<Vec<KeywordArg<'p>>> {
        let mut out = Vec::new();
        let mut failed = false;
        for (key, expr) in call.keywords() {
            match self.setting(frame, expr) {
                Some(value) => out.push(KeywordArg { key, expr, value }),
                None => failed = true,
            }
        }
        (!failed).then_some(out)
    }

    /// Applies a built-in layer to input nodes. `call` is `None` for `a + b`.
    #[allow(clippy::too_many_arguments)]
    fn apply_layer(
        &mut self,
        frame: &Frame<'p>,
        spec: &'static LayerSpec,
        span: &Span,
        keywords: &[KeywordArg],
        inputs: &[(Span, NodeId)],
        value: &str,
        call: Option<&Call>,
    ) -> Option<Vec<NodeId>> {
        if let Some(d) = arity_error(spec, span, inputs.len()) {
            self.error(d);
            return None;
        }
        let pairs = key_values(keywords);
        let args = match bind(spec.params, &pairs) {
            Ok(args) => args,
            Err(e) => {
                let call = call.expect("`+` has no keyword arguments to reject");
                let d = bind_error("layer", call, spec.params, keywords, e);
                self.error(d);
                return None;
            }
        };
        let shapes: Vec<Shape> = inputs
            .iter()
            .map(|(_, n)| self.graph.node(*n).shape.clone())
            .collect();
        let built = match layers::build(spec, &args, &shapes) {
            Ok(built) => built,
            Err(e) => {
                let input_spans: Vec<(Span, Option<Span>)> = inputs
                    .iter()
                    .map(|(s, n)| (s.clone(), self.definition_of(frame, *n)))
                    .collect();
                let d = layer_error(spec.name, span, keywords, &input_spans, e);
                self.error(d);
                return None;
            }
        };
        let auto_bias = layers::has_auto_bias(&args);
        let pieces = built.len();
        let mut previous: Vec<NodeId> = inputs.iter().map(|(_, n)| *n).collect();
        let mut nodes = Vec::new();
        for (i, (op, shape)) in built.into_iter().enumerate() {
            let piece = match (pieces, i) {
                (1, _) => "",
                (_, 0) => ".depthwise",
                _ => ".pointwise",
            };
            let name = node_name(&frame.prefix, value, spec.name) + piece;
            let id = self.push_node(&name, op, previous, shape, span.clone());
            // Only the last piece of a separable convolution has an `auto` bias.
            self.graph.nodes[id.index()].auto_bias = auto_bias && i + 1 == pieces;
            previous = vec![id];
            nodes.push(id);
        }
        Some(nodes)
    }

    fn definition_of(&self, frame: &Frame<'p>, node: NodeId) -> Option<Span> {
        frame.values.values().find_map(|b| match b {
            Binding::Tensor { node: n, def } if *n == node => Some(def.clone()),
            _ => None,
        })
    }

    fn apply_shared(
        &mut self,
        frame: &Frame<'p>,
        index: usize,
        call: &'p Call,
        inputs: &[(Span, NodeId)],
        value: &str,
    ) -> Option<NodeId> {
        if let Some(key) = call.keywords().next() {
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!(
                        "shared layer `{}` takes no settings at its use",
                        call.callee.name
                    ),
                )
                .primary(key.0.span.clone(), "set this where the layer is declared"),
            );
            return None;
        }
        let spec = self.shared[index].spec;
        if let Some(d) = arity_error(spec, &call.span, inputs.len()) {
            self.error(d);
            return None;
        }
        let shape = self.graph.node(inputs[0].1).shape.clone();
        let first = self.shared[index].first.clone();
        if let Some((_, first_shape, first_span)) = &first {
            if *first_shape != shape {
                self.error(
                    Diagnostic::error(
                        codes::SHARED_LAYER_SHAPE,
                        format!(
                            "shared layer `{}` applied to inputs of different shapes: {first_shape} and {shape}",
                            call.callee.name
                        ),
                    )
                    .primary(inputs[0].0.clone(), format!("this input is {shape}"))
                    .secondary(first_span.clone(), format!("first applied to {first_shape} here"))
                    .note("a shared layer has one set of weights, which fits one input shape"),
                );
                return None;
            }
        }
        let pairs = self.shared[index].keywords.clone();
        let keywords: Vec<KeywordArg> = Vec::new();
        let args = bind(spec.params, &pairs).ok()?;
        let built = match layers::build(spec, &args, std::slice::from_ref(&shape)) {
            Ok(built) => built,
            Err(e) => {
                let spans = vec![(inputs[0].0.clone(), self.definition_of(frame, inputs[0].1))];
                let d = layer_error(spec.name, &call.span, &keywords, &spans, e);
                self.error(d);
                return None;
            }
        };
        let mut previous = vec![inputs[0].1];
        let mut nodes = Vec::new();
        for (i, (op, out_shape)) in built.into_iter().enumerate() {
            let name = node_name(&frame.prefix, value, &call.callee.name);
            let id = self.push_node(&name, op, previous, out_shape, call.span.clone());
            if let Some((first_nodes, _, _)) = &first {
                self.graph.nodes[id.index()].shares_weights_of = first_nodes.get(i).copied();
            }
            previous = vec![id];
            nodes.push(id);
        }
        if first.is_none() {
            self.shared[index].first = Some((nodes.clone(), shape, inputs[0].0.clone()));
        }
        nodes.last().copied()
    }

    #[allow(clippy::too_many_arguments)]
    fn instantiate_block(
        &mut self,
        frame: &Frame<'p>,
        block: &'p ast::Block,
        scope: Scope,
        call: &'p Call,
        keywords: &[KeywordArg<'p>],
        inputs: &[(Span, NodeId)],
        value: &str,
    ) -> Option<NodeId> {
        let name = &block.name.name;
        if inputs.len() != block.inputs.len() {
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!(
                        "block `{name}` takes {} input(s), found {}",
                        block.inputs.len(),
                        inputs.len()
                    ),
                )
                .primary(call.span.clone(), "wrong number of inputs")
                .secondary(
                    block.name.span.clone(),
                    format!("`{name}` is declared here"),
                ),
            );
            return None;
        }
        if self.depth >= MAX_BLOCK_DEPTH {
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!("block `{name}` is nested more than {MAX_BLOCK_DEPTH} deep"),
                )
                .primary(call.span.clone(), "instantiated here")
                .note("a block that calls itself never ends"),
            );
            self.aborted = true;
            return None;
        }
        let settings = self.bind_block_settings(frame, block, scope, call, keywords)?;
        let mut inner = Frame {
            values: HashMap::new(),
            settings,
            scope,
            prefix: if value.is_empty() {
                format!("{}{name}/", frame.prefix)
            } else {
                format!("{}{value}.{name}/", frame.prefix)
            },
            repeats: 0,
            body: &block.body,
        };
        for (input, (_, node)) in block.inputs.iter().zip(inputs) {
            inner.values.insert(
                input.name.clone(),
                Binding::Tensor {
                    node: *node,
                    def: input.span.clone(),
                },
            );
        }
        self.depth += 1;
        self.call_stack.push((call.span.clone(), name.clone()));
        self.exec(&mut inner, &block.body);
        let result = if self.aborted {
            None
        } else {
            self.tensor(&mut inner, &block.result, "")
        };
        self.depth -= 1;
        self.call_stack.pop();
        result
    }

    fn bind_block_settings(
        &mut self,
        frame: &Frame<'p>,
        block: &'p ast::Block,
        scope: Scope,
        call: &'p Call,
        keywords: &[KeywordArg<'p>],
    ) -> Option<HashMap<String, Value>> {
        let name = &block.name.name;
        let declared: Vec<&str> = block.params.iter().map(|(p, _)| p.name.as_str()).collect();
        let mut settings = HashMap::new();
        for arg in keywords {
            if !declared.contains(&arg.key.name.as_str()) {
                let mut d = Diagnostic::error(
                    codes::UNKNOWN_ARGUMENT,
                    format!("unknown argument `{}` for block `{name}`", arg.key.name),
                )
                .primary(arg.key.span.clone(), "unknown argument")
                .secondary(
                    block.name.span.clone(),
                    format!("`{name}` is declared here"),
                );
                d = match suggest(&arg.key.name, declared.iter().copied()) {
                    Some(close) => d.help(format!("did you mean `{close}`?")),
                    None if declared.is_empty() => d.note(format!("`{name}` takes no settings")),
                    None => d.note(format!("`{name}` takes {}", quote_list(&declared))),
                };
                self.error(d);
                return None;
            }
            if settings
                .insert(arg.key.name.clone(), arg.value.clone())
                .is_some()
            {
                self.error(
                    Diagnostic::error(
                        codes::INVALID_ARGUMENT,
                        format!("argument `{}` is given twice", arg.key.name),
                    )
                    .primary(arg.key.span.clone(), "given again here"),
                );
                return None;
            }
        }
        // Defaults are evaluated in the block's own scope, after the settings
        // given at the call, so a default may refer to an earlier setting.
        let mut defaults_frame = Frame {
            values: HashMap::new(),
            settings: settings.clone(),
            scope,
            prefix: String::new(),
            repeats: 0,
            body: &block.body,
        };
        for (param, default) in &block.params {
            if settings.contains_key(&param.name) {
                continue;
            }
            let Some(default) = default else {
                self.error(
                    Diagnostic::error(
                        codes::MISSING_ARGUMENT,
                        format!("missing argument `{}` for block `{name}`", param.name),
                    )
                    .primary(call.span.clone(), format!("`{}` is required", param.name))
                    .secondary(param.span.clone(), "declared without a default here")
                    .help(format!("add `{} = ...` to the call", param.name)),
                );
                return None;
            };
            let value = self.setting(&defaults_frame, default)?;
            defaults_frame
                .settings
                .insert(param.name.clone(), value.clone());
            settings.insert(param.name.clone(), value);
        }
        let _ = frame;
        Some(settings)
    }

    // ------------------------------------------------------------ settings

    /// Returns the value of hyperparameter `name` at this point, if the frame can see
    /// hyperparameters and one of that name is declared.
    fn hparam_value(&mut self, frame: &Frame<'p>, name: &str, span: &Span) -> Option<Value> {
        if !matches!(frame.scope, Scope::Model) {
            return None;
        }
        let hparam = self.space.get(name)?;
        self.used_hparams.insert(name.to_string());
        if let Some(value) = self.point.get(name) {
            return Some(value.clone());
        }
        let condition = hparam.condition.as_ref().map_or(String::new(), |c| {
            let values: Vec<String> = c.values.iter().map(ToString::to_string).collect();
            format!(
                ": it exists only when `{}` is {}",
                c.param,
                values.join(" or ")
            )
        });
        self.error(
            Diagnostic::error(
                codes::INACTIVE_HPARAM,
                format!("hyperparameter `{name}` is not active here{condition}"),
            )
            .primary(span.clone(), "used here")
            .secondary(hparam.span.clone(), "declared here")
            .help("use it only where its condition holds, such as inside the block its condition selects, or remove the `when` clause"),
        );
        // A placeholder keeps elaboration going; the error already stops the model.
        Some(hparam.default.clone())
    }

    /// Evaluates an expression that must produce a setting value.
    fn setting(&mut self, frame: &Frame<'p>, expr: &Expr) -> Option<Value> {
        match &expr.kind {
            ExprKind::Number { value, integer } => Some(if *integer && value.abs() < 9.0e15 {
                Value::Int(*value as i64)
            } else {
                Value::Float(*value)
            }),
            ExprKind::Str(s) => Some(Value::Str(s.clone())),
            ExprKind::Name(name) => self.setting_name(frame, name, &expr.span),
            ExprKind::List(items) => {
                let values: Option<Vec<Value>> =
                    items.iter().map(|item| self.setting(frame, item)).collect();
                values.map(Value::List)
            }
            ExprKind::Call(call) => {
                let mut args = Vec::new();
                for arg in &call.args {
                    let value = self.setting(frame, &arg.value)?;
                    args.push((arg.keyword.as_ref().map(|k| k.name.clone()), value));
                }
                // `opt(lr = 0.1)` with `opt = choice(sgd, adam)` calls the
                // chosen name.
                let callee = &call.callee.name;
                let bound = frame
                    .settings
                    .get(callee)
                    .cloned()
                    .or_else(|| self.hparam_value(frame, callee, &call.callee.span));
                let name = match bound {
                    Some(Value::Word(w) | Value::Block(w)) => w,
                    _ => callee.clone(),
                };
                Some(Value::Call(CallValue { name, args }))
            }
            ExprKind::Neg(inner) => {
                let value = self.setting(frame, inner)?;
                match value {
                    Value::Int(i) => Some(
                        i.checked_neg()
                            .map_or(Value::Float(-(i as f64)), Value::Int),
                    ),
                    Value::Float(f) => Some(Value::Float(-f)),
                    other => {
                        self.arithmetic_error(&expr.span, &other);
                        None
                    }
                }
            }
            ExprKind::Binary(op, lhs, rhs) => {
                let a = self.setting(frame, lhs)?;
                let b = self.setting(frame, rhs)?;
                self.arithmetic(*op, a, b, &expr.span)
            }
        }
    }

    fn setting_name(&mut self, frame: &Frame<'p>, name: &str, span: &Span) -> Option<Value> {
        match name {
            "true" => return Some(Value::Bool(true)),
            "false" => return Some(Value::Bool(false)),
            _ => {}
        }
        if let Some(value) = frame.settings.get(name) {
            return Some(value.clone());
        }
        if let Some(value) = self.hparam_value(frame, name, span) {
            return Some(value);
        }
        if frame.values.contains_key(name) {
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!("`{name}` is a tensor, but a setting is expected here"),
                )
                .primary(span.clone(), "a tensor value")
                .note("settings take numbers, names such as `same`, or hyperparameters"),
            );
            return None;
        }
        if self.find_block(frame, name).is_some() {
            return Some(Value::Block(name.to_string()));
        }
        Some(Value::Word(name.to_string()))
    }

    fn arithmetic(&mut self, op: BinOp, a: Value, b: Value, span: &Span) -> Option<Value> {
        if let (Value::Int(x), Value::Int(y)) = (&a, &b) {
            let (x, y) = (*x, *y);
            let exact = match op {
                BinOp::Add => x.checked_add(y),
                BinOp::Sub => x.checked_sub(y),
                BinOp::Mul => x.checked_mul(y),
                BinOp::Div => x
                    .checked_rem(y)
                    .filter(|r| *r == 0)
                    .and_then(|_| x.checked_div(y)),
            };
            if let Some(v) = exact {
                return Some(Value::Int(v));
            }
        }
        let (Some(x), Some(y)) = (a.as_f64(), b.as_f64()) else {
            let bad = if a.as_f64().is_none() { a } else { b };
            self.arithmetic_error(span, &bad);
            return None;
        };
        let result = match op {
            BinOp::Add => x + y,
            BinOp::Sub => x - y,
            BinOp::Mul => x * y,
            BinOp::Div => x / y,
        };
        if !result.is_finite() {
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    "arithmetic does not give a finite number",
                )
                .primary(span.clone(), format!("evaluates to {result}")),
            );
            return None;
        }
        Some(Value::Float(result))
    }

    fn arithmetic_error(&mut self, span: &Span, value: &Value) {
        let message = match value {
            Value::Word(w) => format!("unknown hyperparameter `{w}`"),
            other => format!(
                "arithmetic needs numbers, found {} `{other}`",
                other.kind_name()
            ),
        };
        let code = if matches!(value, Value::Word(_)) {
            codes::UNKNOWN_HPARAM
        } else {
            codes::INVALID_ARGUMENT
        };
        self.error(Diagnostic::error(code, message).primary(span.clone(), "not a number"));
    }

    // ------------------------------------------------------------ graph

    fn push_node(
        &mut self,
        name: &str,
        op: Op,
        inputs: Vec<NodeId>,
        shape: Shape,
        span: Span,
    ) -> NodeId {
        if self.graph.nodes.len() >= MAX_NODES && !self.aborted {
            self.aborted = true;
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!("model has more than {MAX_NODES} layers"),
                )
                .primary(span.clone(), "the limit was reached here")
                .note("check `repeat` counts and blocks that instantiate each other"),
            );
        }
        if shape.numel() > MAX_VALUE_ELEMENTS && !self.aborted {
            self.aborted = true;
            self.error(
                Diagnostic::error(
                    codes::INVALID_ARGUMENT,
                    format!("`{name}` would hold {shape}, more than {MAX_VALUE_ELEMENTS} elements per sample"),
                )
                .primary(span.clone(), "value too large"),
            );
        }
        let mut unique = name.to_string();
        while self.node_names.contains(&unique) {
            let next = self.name_counts.entry(name.to_string()).or_insert(1);
            *next += 1;
            unique = format!("{name}_{next}");
        }
        self.node_names.insert(unique.clone());
        self.graph.push(Node {
            name: unique,
            op,
            inputs,
            shape,
            span,
            shares_weights_of: None,
            auto_bias: false,
        })
    }

    fn resolve_output(&mut self, frame: &Frame<'p>) {
        let outputs = std::mem::take(&mut self.outputs);
        match outputs.as_slice() {
            [] => self.error(
                Diagnostic::error(
                    codes::MISSING_DECLARATION,
                    format!("model `{}` has no `output`", self.model.name.name),
                )
                .primary(self.model.name.span.clone(), "declared here")
                .help("add `output NAME: [classes]` naming the value that holds the logits"),
            ),
            [output] => self.check_output(frame, output),
            [first, second, ..] => self.error(
                Diagnostic::error(codes::DUPLICATE, "a model has exactly one `output`")
                    .primary(second.span.clone(), "second output")
                    .secondary(first.span.clone(), "first output"),
            ),
        }
        if self.inputs_declared == 0 {
            self.error(
                Diagnostic::error(
                    codes::MISSING_DECLARATION,
                    format!("model `{}` has no `input`", self.model.name.name),
                )
                .primary(self.model.name.span.clone(), "declared here")
                .help("add `input image: [1, 28, 28]` or `input features: [64]`"),
            );
        }
        self.outputs = outputs;
    }

    fn check_output(&mut self, frame: &Frame<'p>, output: &OutputDecl) {
        let Some(node) = self.lookup_tensor(frame, &output.name.name, &output.name.span, "output")
        else {
            return;
        };
        self.graph.output = Some(node);
        let Some(dims) = &output.shape else { return };
        let mut declared = Vec::new();
        for dim in dims {
            match self.setting(frame, dim).as_ref().and_then(Value::as_i64) {
                Some(d) if d > 0 => declared.push(d as usize),
                _ => {
                    return self.error(
                        Diagnostic::error(
                            codes::INVALID_ARGUMENT,
                            "output dimensions must be positive integers",
                        )
                        .primary(dim.span.clone(), "invalid dimension"),
                    )
                }
            }
        }
        let actual = self.graph.node(node).shape.clone();
        if actual.0 != declared {
            let declared = Shape(declared);
            let mut d = Diagnostic::error(
                codes::OUTPUT_SHAPE,
                format!(
                    "output `{}` has shape {actual}, but the model declares {declared}",
                    output.name.name
                ),
            )
            .primary(output.span.clone(), format!("declared as {declared}"));
            if let Some(def) = self.definition_of(frame, node) {
                d = d.secondary(def, format!("defined here as {actual}"));
            }
            self.error(d);
        }
    }

    /// Settles every `bias = auto`: a layer gets a bias unless its only
    /// reader is a batch normalization, whose mean subtraction would cancel it.
    fn decide_auto_bias(&mut self) {
        let live = self.graph.live();
        let mut consumers = vec![0usize; self.graph.nodes.len()];
        for node in self
            .graph
            .nodes
            .iter()
            .zip(&live)
            .filter(|(_, l)| **l)
            .map(|(n, _)| n)
        {
            for input in &node.inputs {
                consumers[input.index()] += 1;
            }
        }
        let mut only_reader_is_bn = vec![false; self.graph.nodes.len()];
        for (node, _) in self.graph.nodes.iter().zip(&live).filter(|(_, l)| **l) {
            if let (Op::BatchNorm { .. }, [input]) = (&node.op, node.inputs.as_slice()) {
                only_reader_is_bn[input.index()] = consumers[input.index()] == 1;
            }
        }
        for (i, node) in self.graph.nodes.iter_mut().enumerate() {
            if !node.auto_bias {
                continue;
            }
            let bias = !only_reader_is_bn[i] || node.shares_weights_of.is_some();
            match &mut node.op {
                Op::Dense { bias: b, .. } => *b = bias,
                Op::Conv(c) => c.bias = bias,
                _ => {}
            }
        }
    }
}

/// `prefix` + `value.layer`, or `prefix` + `layer` for a block's result.
fn node_name(prefix: &str, value: &str, layer: &str) -> String {
    if value.is_empty() {
        format!("{prefix}{layer}")
    } else {
        format!("{prefix}{value}.{layer}")
    }
}

fn key_values(keywords: &[KeywordArg]) -> Vec<(String, Value)> {
    keywords
        .iter()
        .map(|k| (k.key.name.clone(), k.value.clone()))
        .collect()
}

fn arity_error(spec: &LayerSpec, span: &Span, found: usize) -> Option<Diagnostic> {
    let (ok, expected) = match spec.arity {
        Arity::One => (found == 1, "1 input"),
        Arity::Two => (found == 2, "2 inputs"),
        Arity::AtLeastTwo => (found >= 2, "at least 2 inputs"),
    };
    if ok {
        return None;
    }
    let d = Diagnostic::error(
        codes::INVALID_ARGUMENT,
        format!("`{}` takes {expected}, found {found}", spec.name),
    )
    .primary(span.clone(), "wrong number of inputs")
    .note("inputs are passed by position; settings by name, as in `kernel = 3`");
    Some(d)
}

/// Blocks by name; of two blocks with one name (an error reported
/// elsewhere) the first wins.
fn first_by_name<'p>(
    blocks: impl Iterator<Item = &'p ast::Block>,
) -> BTreeMap<&'p str, &'p ast::Block> {
    let mut map = BTreeMap::new();
    for block in blocks {
        map.entry(block.name.name.as_str()).or_insert(block);
    }
    map
}

fn stmt_span(stmt: &Stmt) -> Span {
    match stmt {
        Stmt::Input { span, .. }
        | Stmt::Output { span, .. }
        | Stmt::Repeat { span, .. }
        | Stmt::Search { span, .. }
        | Stmt::Train { span, .. }
        | Stmt::Budget { span, .. } => span.clone(),
        Stmt::Assign { name, .. } | Stmt::Layer { name, .. } => name.span.clone(),
        Stmt::Block(block) => block.name.span.clone(),
    }
}

/// Returns the blocks declared directly in a model body.
pub fn model_blocks(model: &ast::Model) -> impl Iterator<Item = &ast::Block> {
    model.body.iter().filter_map(|s| match s {
        Stmt::Block(b) => Some(b),
        _ => None,
    })
}

/// Finds an assignment of `name` anywhere in `stmts`, including `repeat`
/// bodies.
fn find_assignment<'a>(stmts: &'a [Stmt], name: &str) -> Option<(&'a ast::Ident, &'a Expr)> {
    stmts.iter().find_map(|s| match s {
        Stmt::Assign { name: n, value } if n.name == name => Some((n, value)),
        Stmt::Repeat { body, .. } => find_assignment(body, name),
        _ => None,
    })
}

/// Returns whether `expr` refers to the name `name`.
fn mentions(expr: &Expr, name: &str) -> bool {
    match &expr.kind {
        ExprKind::Name(n) => n == name,
        ExprKind::Call(call) => call.args.iter().any(|a| mentions(&a.value, name)),
        ExprKind::List(items) => items.iter().any(|i| mentions(i, name)),
        ExprKind::Neg(inner) => mentions(inner, name),
        ExprKind::Binary(_, a, b) => mentions(a, name) || mentions(b, name),
        ExprKind::Number { .. } | ExprKind::Str(_) => false,
    }
}
