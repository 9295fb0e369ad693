//! Conversion from pest's parse tree to the AST, one `parse_<rule>` function
//! per grammar rule.

use super::ast::*;
use crate::diag::{codes, Diagnostic, Span};
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;
use pest::Parser;
use pest_derive::Parser;

#[derive(Parser)]
#[grammar = "../grammar/model.pest"]
struct ModelParser;

/// Parses a `.model` file.
///
/// # Errors
/// Returns a syntax diagnostic (`E0001`) at the first position the grammar
/// cannot match.
pub fn parse(source: &str) -> Result<File, Diagnostic> {
    check_bracket_depth(source)?;
    let mut pairs = ModelParser::parse(Rule::file, source).map_err(|e| syntax_error(e, source))?;
    TOO_DEEP.with(|t| t.set(None));
    let file = convert(pairs.next());
    if let Some((start, end)) = TOO_DEEP.with(|t| t.take()) {
        return Err(Diagnostic::error(
            codes::SYNTAX,
            format!("expression nested more than {MAX_DEPTH} levels deep"),
        )
        .primary(start..end, "split this expression into named values"));
    }
    Ok(file)
}

/// The deepest bracket nesting accepted before parsing; it bounds the
/// recursion of the parser itself.
const MAX_BRACKETS: usize = 64;

fn check_bracket_depth(source: &str) -> Result<(), Diagnostic> {
    let mut depth = 0usize;
    let mut in_comment = false;
    let mut in_string = false;
    for (i, c) in source.char_indices() {
        match c {
            '\n' => {
                in_comment = false;
                in_string = false;
            }
            _ if in_comment => {}
            '"' => in_string = !in_string,
            _ if in_string => {}
            '#' => in_comment = true,
            '(' | '[' | '{' => {
                depth += 1;
                if depth > MAX_BRACKETS {
                    return Err(Diagnostic::error(
                        codes::SYNTAX,
                        format!("brackets nested more than {MAX_BRACKETS} levels deep"),
                    )
                    .primary(i..i + 1, "too deep"));
                }
            }
            ')' | ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

fn convert(root: Option<Pair<Rule>>) -> File {
    let mut file = File::default();
    let Some(root) = root else {
        return file;
    };
    for item in root.into_inner() {
        match item.as_rule() {
            Rule::model => file.models.push(parse_model(item)),
            Rule::block => file.blocks.push(parse_block(item)),
            Rule::ensemble => file.ensembles.push(parse_ensemble(item)),
            _ => {}
        }
    }
    file
}

/// Returns the byte range of a pair, without the whitespace that a failed optional
/// part at its end may have consumed.
fn span(pair: &Pair<Rule>) -> Span {
    let s = pair.as_span();
    let trimmed = s.as_str().trim_end().len();
    s.start()..s.start() + trimmed
}

fn parse_ident(pair: Pair<Rule>) -> Ident {
    Ident {
        name: pair.as_str().to_string(),
        span: span(&pair),
    }
}

/// Returns the inner pairs that carry meaning, skipping punctuation and
/// keywords.
fn meaningful(pair: Pair<Rule>) -> impl Iterator<Item = Pair<Rule>> {
    pair.into_inner().filter(|p| !is_token(p.as_rule()))
}

fn is_token(rule: Rule) -> bool {
    matches!(
        rule,
        Rule::open_brace
            | Rule::close_brace
            | Rule::open_paren
            | Rule::close_paren
            | Rule::open_bracket
            | Rule::close_bracket
            | Rule::kw_model
            | Rule::kw_block
            | Rule::kw_return
            | Rule::kw_input
            | Rule::kw_output
            | Rule::kw_layer
            | Rule::kw_repeat
            | Rule::kw_search
            | Rule::kw_train
            | Rule::kw_budget
            | Rule::kw_when
            | Rule::kw_in
            | Rule::kw_ensemble
    )
}

fn parse_model(pair: Pair<Rule>) -> Model {
    let model_span = span(&pair);
    let mut inner = meaningful(pair);
    let name = parse_ident(inner.next().expect("grammar: model has a name"));
    let body = inner.map(parse_statement).collect();
    Model {
        name,
        body,
        span: model_span,
    }
}

fn parse_ensemble(pair: Pair<Rule>) -> Ensemble {
    let ensemble_span = span(&pair);
    let mut inner = meaningful(pair);
    let name = parse_ident(inner.next().expect("grammar: ensemble has a name"));
    let settings = inner.map(parse_setting).collect();
    Ensemble {
        name,
        settings,
        span: ensemble_span,
    }
}

fn parse_block(pair: Pair<Rule>) -> Block {
    let block_span = span(&pair);
    let mut block = Block {
        name: Ident {
            name: String::new(),
            span: block_span.clone(),
        },
        inputs: Vec::new(),
        params: Vec::new(),
        body: Vec::new(),
        result: Expr {
            kind: ExprKind::List(Vec::new()),
            span: block_span.clone(),
            depth: 1,
        },
        span: block_span,
    };
    for part in meaningful(pair) {
        match part.as_rule() {
            Rule::ident => block.name = parse_ident(part),
            Rule::block_inputs => block.inputs = part.into_inner().map(parse_ident).collect(),
            Rule::block_params => {
                block.params = part.into_inner().map(parse_block_param).collect();
            }
            Rule::return_stmt => {
                let expr = meaningful(part)
                    .next()
                    .expect("grammar: return has a value");
                block.result = parse_expr(expr);
            }
            _ => block.body.push(parse_statement(part)),
        }
    }
    block
}

fn parse_block_param(pair: Pair<Rule>) -> (Ident, Option<Expr>) {
    let mut inner = pair.into_inner();
    let name = parse_ident(inner.next().expect("grammar: parameter has a name"));
    (name, inner.next().map(parse_expr))
}

fn parse_statement(pair: Pair<Rule>) -> Stmt {
    let stmt_span = span(&pair);
    let rule = pair.as_rule();
    if rule == Rule::block {
        return Stmt::Block(parse_block(pair));
    }
    let mut inner = meaningful(pair);
    let mut next = || inner.next().expect("grammar: statement part");
    match rule {
        Rule::input_stmt => Stmt::Input {
            name: parse_ident(next()),
            shape: parse_shape(next()),
            span: stmt_span,
        },
        Rule::output_stmt => {
            let name = parse_ident(next());
            let shape_pair = inner.next();
            // The statement ends at its name or shape, not at whatever
            // comments follow it.
            let end = shape_pair.as_ref().map_or(name.span.end, |p| span(p).end);
            let shape = shape_pair.map(parse_shape);
            Stmt::Output {
                name,
                shape,
                span: stmt_span.start..end,
            }
        }
        Rule::assign_stmt => Stmt::Assign {
            name: parse_ident(next()),
            value: parse_expr(next()),
        },
        Rule::layer_stmt => Stmt::Layer {
            name: parse_ident(next()),
            call: parse_call(next()),
        },
        Rule::repeat_stmt => {
            let count = parse_expr(next());
            Stmt::Repeat {
                count,
                body: inner.map(parse_statement).collect(),
                span: stmt_span,
            }
        }
        Rule::search_stmt => Stmt::Search {
            entries: inner.map(parse_search_entry).collect(),
            span: stmt_span,
        },
        Rule::train_stmt => Stmt::Train {
            settings: inner.map(parse_setting).collect(),
            span: stmt_span,
        },
        Rule::budget_stmt => Stmt::Budget {
            settings: inner.map(parse_setting).collect(),
            span: stmt_span,
        },
        other => unreachable!("grammar: {other:?} is not a statement"),
    }
}

fn parse_shape(pair: Pair<Rule>) -> Vec<Expr> {
    meaningful(pair).map(parse_expr).collect()
}

fn parse_search_entry(pair: Pair<Rule>) -> SearchEntry {
    let mut inner = pair.into_inner();
    let name = parse_ident(inner.next().expect("grammar: entry has a name"));
    let domain = parse_call(inner.next().expect("grammar: entry has a domain"));
    let condition = inner.next().map(parse_condition);
    SearchEntry {
        name,
        domain,
        condition,
    }
}

fn parse_condition(pair: Pair<Rule>) -> Condition {
    let cond_span = span(&pair);
    let mut inner = meaningful(pair);
    let param = parse_ident(inner.next().expect("grammar: condition names a parameter"));
    let test = inner.next().expect("grammar: condition has a test");
    let values = match test.as_rule() {
        Rule::eq_test => meaningful(test).map(parse_expr).collect(),
        _ => {
            let list = meaningful(test).next().expect("grammar: `in` takes a list");
            meaningful(list).map(parse_expr).collect()
        }
    };
    Condition {
        param,
        values,
        span: cond_span,
    }
}

fn parse_setting(pair: Pair<Rule>) -> Setting {
    let mut inner = pair.into_inner();
    Setting {
        key: parse_ident(inner.next().expect("grammar: setting has a key")),
        value: parse_expr(inner.next().expect("grammar: setting has a value")),
    }
}

fn parse_call(pair: Pair<Rule>) -> Call {
    let call_span = span(&pair);
    let mut inner = meaningful(pair);
    let callee = parse_ident(inner.next().expect("grammar: call has a callee"));
    let args = inner
        .map(|arg| match arg.as_rule() {
            Rule::keyword_arg => {
                let mut kv = arg.into_inner();
                let keyword = parse_ident(kv.next().expect("grammar: keyword"));
                let value = parse_expr(kv.next().expect("grammar: keyword value"));
                Arg {
                    keyword: Some(keyword),
                    value,
                }
            }
            _ => Arg {
                keyword: None,
                value: parse_expr(arg),
            },
        })
        .collect();
    Call {
        callee,
        args,
        span: call_span,
    }
}

/// Parses `sum (|> stage)*`, turning each stage into a call whose first
/// positional argument is the value piped into it.
fn parse_expr(pair: Pair<Rule>) -> Expr {
    let mut inner = pair.into_inner();
    let mut value = parse_sum(inner.next().expect("grammar: expression"));
    while let Some(token) = inner.next() {
        debug_assert_eq!(token.as_rule(), Rule::pipe);
        let stage = inner.next().expect("grammar: pipe stage");
        let stage = stage.into_inner().next().expect("grammar: stage body");
        let start = value.span.start;
        let mut call = match stage.as_rule() {
            Rule::call => parse_call(stage),
            _ => {
                let callee = parse_ident(stage);
                Call {
                    span: callee.span.clone(),
                    callee,
                    args: Vec::new(),
                }
            }
        };
        let end = call.span.end;
        call.args.insert(
            0,
            Arg {
                keyword: None,
                value,
            },
        );
        let depth = 1 + args_depth(&call.args);
        value = Expr {
            kind: ExprKind::Call(call),
            span: start..end,
            depth,
        };
        if too_deep(&value) {
            break;
        }
    }
    value
}

fn args_depth(args: &[Arg]) -> usize {
    args.iter().map(|a| a.value.depth).max().unwrap_or(0)
}

/// Records the first expression deeper than [`MAX_DEPTH`]; the caller stops
/// growing it, and [`parse`] turns the record into a syntax error.
fn too_deep(expr: &Expr) -> bool {
    if expr.depth <= MAX_DEPTH {
        return false;
    }
    TOO_DEEP.with(|t| {
        if t.get().is_none() {
            t.set(Some((expr.span.start, expr.span.end)));
        }
    });
    true
}

thread_local! {
    static TOO_DEEP: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

fn parse_sum(pair: Pair<Rule>) -> Expr {
    parse_binary(pair, parse_product)
}

fn parse_product(pair: Pair<Rule>) -> Expr {
    parse_binary(pair, parse_unary)
}

/// Folds `operand (op operand)*` to the left.
fn parse_binary(pair: Pair<Rule>, operand: fn(Pair<Rule>) -> Expr) -> Expr {
    let mut inner = pair.into_inner();
    let mut lhs = operand(inner.next().expect("grammar: operand"));
    while let Some(op) = inner.next() {
        let rhs = operand(inner.next().expect("grammar: right operand"));
        let op = match op.as_str() {
            "+" => BinOp::Add,
            "-" => BinOp::Sub,
            "*" => BinOp::Mul,
            _ => BinOp::Div,
        };
        let span = lhs.span.start..rhs.span.end;
        let depth = 1 + lhs.depth.max(rhs.depth);
        lhs = Expr {
            kind: ExprKind::Binary(op, Box::new(lhs), Box::new(rhs)),
            span,
            depth,
        };
        if too_deep(&lhs) {
            break;
        }
    }
    lhs
}

fn parse_unary(pair: Pair<Rule>) -> Expr {
    let unary_span = span(&pair);
    // A bracketed primary arrives as `(`, expr, `)`; the brackets carry no
    // meaning once the tree is built.
    let parts: Vec<_> = meaningful(pair).collect();
    let (negations, primary) = parts.split_at(parts.len() - 1);
    let mut value = parse_primary(primary[0].clone());
    for _ in negations {
        let depth = value.depth + 1;
        value = Expr {
            kind: ExprKind::Neg(Box::new(value)),
            span: unary_span.clone(),
            depth,
        };
        if too_deep(&value) {
            break;
        }
    }
    value
}

fn parse_primary(pair: Pair<Rule>) -> Expr {
    let primary_span = span(&pair);
    let kind = match pair.as_rule() {
        Rule::call => ExprKind::Call(parse_call(pair)),
        Rule::number => {
            let text = pair.as_str();
            ExprKind::Number {
                // The grammar admits only digits, a dot and an exponent, all
                // of which Rust's float parser accepts.
                value: text.parse().unwrap_or(f64::NAN),
                integer: !text.contains(['.', 'e', 'E']),
            }
        }
        Rule::string => {
            let text = pair.as_str();
            ExprKind::Str(text[1..text.len() - 1].to_string())
        }
        Rule::list => ExprKind::List(meaningful(pair).map(parse_expr).collect()),
        Rule::ident => ExprKind::Name(pair.as_str().to_string()),
        Rule::expr => return parse_expr(pair),
        other => unreachable!("grammar: {other:?} is not a primary expression"),
    };
    let depth = 1 + match &kind {
        ExprKind::Call(call) => args_depth(&call.args),
        ExprKind::List(items) => items.iter().map(|i| i.depth).max().unwrap_or(0),
        _ => 0,
    };
    let expr = Expr {
        kind,
        span: primary_span,
        depth,
    };
    too_deep(&expr);
    expr
}

fn syntax_error(error: pest::error::Error<Rule>, source: &str) -> Diagnostic {
    let span = match error.location {
        InputLocation::Pos(p) => p..p,
        InputLocation::Span((s, e)) => s..e,
    };
    let (message, label) = match &error.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            let mut names: Vec<&str> = positives.iter().map(|r| rule_name(*r)).collect();
            names.sort_unstable();
            names.dedup();
            let expected = join_alternatives(&names);
            (
                format!("syntax error: expected {expected}"),
                format!("expected {expected}"),
            )
        }
        ErrorVariant::CustomError { message } => (message.clone(), message.clone()),
    };
    let found = source
        .get(span.start..)
        .and_then(|rest| rest.chars().next());
    let diagnostic = Diagnostic::error(codes::SYNTAX, message).primary(span, label);
    match found {
        // A letter such as `ö` ends a name early, which the parser reports
        // as whatever should have followed the name.
        Some(c) if c.is_alphabetic() && !c.is_ascii() => diagnostic.help(format!(
            "names use ASCII letters, digits and `_`; `{c}` is not one of them"
        )),
        _ => diagnostic,
    }
}

fn join_alternatives(names: &[&str]) -> String {
    match names {
        [] => "something else".to_string(),
        [one] => one.to_string(),
        [init @ .., last] => format!("{}, or {last}", init.join(", ")),
    }
}

/// Returns the words a syntax error uses for each rule. The match has no wildcard arm
/// so that a new rule does not compile until it has a name.
fn rule_name(rule: Rule) -> &'static str {
    match rule {
        Rule::EOI => "end of file",
        Rule::WHITESPACE | Rule::COMMENT => "whitespace",
        Rule::file => "a file",
        Rule::model | Rule::kw_model => "`model`",
        Rule::block | Rule::kw_block => "`block`",
        Rule::ensemble | Rule::kw_ensemble => "`ensemble`",
        Rule::block_inputs => "block inputs",
        Rule::block_params | Rule::block_param => "block settings",
        Rule::return_stmt | Rule::kw_return => "`return`",
        Rule::statement => "a statement",
        Rule::input_stmt | Rule::kw_input => "`input`",
        Rule::output_stmt | Rule::kw_output => "`output`",
        Rule::shape => "a shape like `[1, 28, 28]`",
        Rule::layer_stmt | Rule::kw_layer => "`layer`",
        Rule::repeat_stmt | Rule::kw_repeat => "`repeat`",
        Rule::assign_stmt => "an assignment",
        Rule::search_stmt | Rule::kw_search => "`search`",
        Rule::search_entry => "a search entry",
        Rule::condition | Rule::kw_when => "`when`",
        Rule::eq_test => "`==`",
        Rule::in_test | Rule::kw_in => "`in`",
        Rule::train_stmt | Rule::kw_train => "`train`",
        Rule::budget_stmt | Rule::kw_budget => "`budget`",
        Rule::setting => "a setting",
        Rule::expr | Rule::sum | Rule::product | Rule::unary | Rule::primary => "an expression",
        Rule::stage => "a layer name",
        Rule::call => "a call",
        Rule::arg | Rule::keyword_arg => "an argument",
        Rule::list => "a list",
        Rule::pipe => "`|>`",
        Rule::add_op => "`+` or `-`",
        Rule::mul_op => "`*` or `/`",
        Rule::neg => "`-`",
        Rule::number => "a number",
        Rule::string => "a string",
        Rule::ident | Rule::ident_char => "a name",
        Rule::keyword => "a keyword",
        Rule::open_brace => "`{`",
        Rule::close_brace => "`}`",
        Rule::open_paren => "`(`",
        Rule::close_paren => "`)`",
        Rule::open_bracket => "`[`",
        Rule::close_bracket => "`]`",
    }
}
