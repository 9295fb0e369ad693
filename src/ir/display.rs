//! The text form of the IR, as `kiln compile --emit ir` prints it and the
//! snapshot tests compare it.

use super::{Act, Graph, Init, Op, PoolKind};
use std::fmt::{self, Write};

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph batch={}", self.batch)?;
        for (i, p) in self.params.iter().enumerate() {
            writeln!(f, "param #{i} {} {:?} {}", p.name, p.shape, init(&p.init))?;
        }
        for (i, s) in self.states.iter().enumerate() {
            writeln!(f, "state #{i} {} {:?} {}", s.name, s.shape, init(&s.init))?;
        }
        for (i, node) in self.nodes.iter().enumerate() {
            let mut line = format!("%{i} = {}", op_text(&node.op));
            if !node.inputs.is_empty() {
                let inputs: Vec<String> = node.inputs.iter().map(ToString::to_string).collect();
                let _ = write!(line, " {}", inputs.join(", "));
            }
            writeln!(f, "{line:<60} : {:?}  # {}", node.shape, node.name)?;
        }
        if let Some(logits) = self.logits {
            writeln!(f, "logits = {logits}")?;
        }
        if let Some(loss) = self.loss {
            writeln!(f, "loss = {loss}")?;
        }
        for (state, value) in &self.state_updates {
            writeln!(f, "update {} = {value}", self.states[*state].name)?;
        }
        for (param, value) in &self.grads {
            writeln!(f, "grad {} = {value}", self.params[*param].name)?;
        }
        Ok(())
    }
}

fn init(init: &Init) -> String {
    match init {
        Init::Uniform { bound } => format!("uniform(±{bound:.4})"),
        Init::Zeros => "zeros".into(),
        Init::Ones => "ones".into(),
    }
}

fn act(a: &Act) -> String {
    match a {
        Act::Relu => "relu".into(),
        Act::LeakyRelu(slope) => format!("leaky_relu({slope})"),
        Act::Sigmoid => "sigmoid".into(),
        Act::Tanh => "tanh".into(),
        Act::Gelu { tanh: false } => "gelu".into(),
        Act::Gelu { tanh: true } => "gelu(tanh)".into(),
    }
}

fn op_text(op: &Op) -> String {
    match op {
        Op::Param(i) => format!("param #{i}"),
        Op::State(i) => format!("state #{i}"),
        Op::Conv2d(a) | Op::Conv2dGradInput(a) | Op::Conv2dGradWeight(a) => format!(
            "{}[k={} s={} d={} g={} pad={:?}]",
            op.name(),
            a.kernel,
            a.stride,
            a.dilation,
            a.groups,
            a.pad
        ),
        Op::Pool(a) | Op::PoolGrad(a) => {
            let kind = match a.kind {
                PoolKind::Max => "max",
                PoolKind::Avg => "avg",
            };
            let name = if matches!(op, Op::Pool(_)) {
                "pool"
            } else {
                "pool_grad"
            };
            format!(
                "{name}[{kind} {}x{} s={} pad={:?}]",
                a.size, a.size, a.stride, a.pad
            )
        }
        Op::Act(a) => act(a),
        Op::ActGrad(a) => format!("{}_grad", act(a)),
        Op::BatchNorm { eps } | Op::BatchNormGradInput { eps } | Op::BatchNormGradGamma { eps } => {
            format!("{}[eps={eps:e}]", op.name())
        }
        Op::RunningUpdate {
            momentum,
            correction,
        } => format!("running_update[m={momentum} c={correction:.6}]"),
        Op::DropoutMask { rate, stream } => format!("dropout_mask[p={rate} stream={stream}]"),
        Op::Slice { start, len } => format!("slice[{start}..{}]", start + len),
        Op::SoftmaxCrossEntropy { smoothing } | Op::SoftmaxCrossEntropyGrad { smoothing }
            if *smoothing != 0.0 =>
        {
            format!("{}[smoothing={smoothing}]", op.name())
        }
        other => other.name().to_string(),
    }
}
