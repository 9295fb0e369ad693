//! Optimizer updates with PyTorch's semantics (`torch.optim` as of 2.x):
//! SGD with momentum and Nesterov, Adam, AdamW and RMSprop, each with weight
//! decay.

use super::Tensor;
use crate::check::train::Optimizer;

/// An optimizer's settings and its per-parameter buffers.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    pub optimizer: Optimizer,
    /// The learning rate of the next step; schedules change it.
    pub lr: f64,
    /// Steps taken so far.
    pub step: u64,
    /// Per parameter: momentum (or first moment) buffer, second moment
    /// buffer. Empty until the first step.
    pub buffers: Vec<[Option<Tensor>; 2]>,
}

impl OptimizerState {
    pub fn new(optimizer: Optimizer) -> Self {
        OptimizerState {
            lr: optimizer.lr(),
            optimizer,
            step: 0,
            buffers: Vec::new(),
        }
    }

    /// Applies one step to every parameter that has a gradient.
    pub fn update(&mut self, params: &mut [Tensor], grads: &[Option<&Tensor>]) {
        self.step += 1;
        self.buffers.resize(params.len(), [None, None]);
        for (i, (param, grad)) in params.iter_mut().zip(grads).enumerate() {
            if let Some(grad) = grad {
                let buffers = &mut self.buffers[i];
                update_one(
                    &self.optimizer,
                    self.lr as f32,
                    self.step,
                    param,
                    grad,
                    buffers,
                );
            }
        }
    }
}

fn zeros_like(t: &Tensor) -> Tensor {
    Tensor::zeros(t.raw_dim())
}

fn update_one(
    optimizer: &Optimizer,
    lr: f32,
    step: u64,
    param: &mut Tensor,
    grad: &Tensor,
    buffers: &mut [Option<Tensor>; 2],
) {
    match *optimizer {
        Optimizer::Sgd {
            momentum,
            nesterov,
            weight_decay,
            ..
        } => {
            let (momentum, decay) = (momentum as f32, weight_decay as f32);
            let mut g = grad + &(&*param * decay);
            if momentum != 0.0 {
                // The buffer starts at the first gradient, as in PyTorch.
                let buf = buffers[0].get_or_insert_with(|| zeros_like(param));
                *buf = &*buf * momentum + &g;
                g = if nesterov {
                    g + &(&*buf * momentum)
                } else {
                    buf.clone()
                };
            }
            *param -= &(g * lr);
        }
        Optimizer::Adam {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } => {
            let g = grad + &(&*param * weight_decay as f32);
            adam(
                param,
                &g,
                lr,
                step,
                (beta1 as f32, beta2 as f32, eps as f32),
                buffers,
            );
        }
        Optimizer::AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            ..
        } => {
            // Decoupled weight decay: shrink the weights, then an Adam step.
            *param *= 1.0 - lr * weight_decay as f32;
            adam(
                param,
                grad,
                lr,
                step,
                (beta1 as f32, beta2 as f32, eps as f32),
                buffers,
            );
        }
        Optimizer::RmsProp {
            alpha,
            eps,
            momentum,
            weight_decay,
            ..
        } => {
            let (alpha, eps, momentum) = (alpha as f32, eps as f32, momentum as f32);
            let g = grad + &(&*param * weight_decay as f32);
            let square = buffers[1].get_or_insert_with(|| zeros_like(param));
            *square = &*square * alpha + &(g.mapv(|v| v * v) * (1.0 - alpha));
            let scaled = &g / &square.mapv(|v| v.sqrt() + eps);
            if momentum > 0.0 {
                let buf = buffers[0].get_or_insert_with(|| zeros_like(param));
                *buf = &*buf * momentum + &scaled;
                *param -= &(&*buf * lr);
            } else {
                *param -= &(scaled * lr);
            }
        }
    }
}

/// One Adam step with bias correction:
/// `p -= lr / (1 - β1ᵗ) · m / (sqrt(v) / sqrt(1 - β2ᵗ) + eps)`.
fn adam(
    param: &mut Tensor,
    g: &Tensor,
    lr: f32,
    step: u64,
    (beta1, beta2, eps): (f32, f32, f32),
    buffers: &mut [Option<Tensor>; 2],
) {
    let [m, v] = buffers;
    let m = m.get_or_insert_with(|| zeros_like(param));
    let v = v.get_or_insert_with(|| zeros_like(param));
    *m = &*m * beta1 + &(g * (1.0 - beta1));
    *v = &*v * beta2 + &(g.mapv(|x| x * x) * (1.0 - beta2));
    let correction1 = 1.0 - beta1.powi(step as i32);
    let correction2 = (1.0 - beta2.powi(step as i32)).sqrt();
    let denom = v.mapv(|x| x.sqrt() / correction2 + eps);
    *param -= &(&*m / &denom * (lr / correction1));
}
