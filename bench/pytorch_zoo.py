"""Times the five reference models in PyTorch on the CPU, for comparison
with `kiln bench`.

Builds mlp, convnet, bn_convnet, sepconv and resnet as in `models/*.model`
and reports, per model and variant (eager or torch.compile, NCHW or
channels_last): the median training step (SGD with momentum 0.9, batch
128), inference throughput, compile time and achieved GFLOP/s, counted as
kiln counts them (2 FLOP per multiply-accumulate, a training step as three
forward passes).

    python3 bench/pytorch_zoo.py [--threads 2] [--steps 10] [--json]
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn


def conv_bn(cin, cout, stride=1):
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def sep_bn(cin, cout):
    return [
        nn.Conv2d(cin, cin, 3, 1, 1, groups=cin, bias=False),
        nn.Conv2d(cin, cout, 1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    ]


class Residual(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.body = nn.Sequential(
            *conv_bn(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def build(name):
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
    if name == "convnet":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.5), nn.Linear(64 * 5 * 5, 10),
        )
    if name == "bn_convnet":
        return nn.Sequential(
            *conv_bn(1, 32), *conv_bn(32, 32), nn.MaxPool2d(2),
            *conv_bn(32, 64), *conv_bn(64, 64), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Dropout(0.3), nn.Linear(128, 10),
        )
    if name == "sepconv":
        return nn.Sequential(
            *conv_bn(1, 32), *sep_bn(32, 64), *sep_bn(64, 64), nn.MaxPool2d(2),
            *sep_bn(64, 128), *sep_bn(128, 128),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10),
        )
    if name == "resnet":
        return nn.Sequential(
            *conv_bn(1, 32), Residual(32, 32, 1), Residual(32, 32, 1),
            Residual(32, 64, 2), Residual(64, 64, 1),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10),
        )
    raise ValueError(name)


def macs(model, x):
    """Multiply-accumulates of one forward pass per sample."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
            total += output.numel() // output.shape[0] * k
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model.eval()(x[:1])
    for h in handles:
        h.remove()
    return total


def measure(name, compiled, channels_last, steps, batch=128):
    # Every variant compiles afresh; otherwise guards from earlier models
    # pile up until dynamo's recompile limit silently falls back to eager.
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build(name)
    x = torch.rand(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    flops = 2 * macs(model, x) * batch
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()

    train_step = torch.compile(step) if compiled else step
    model.train()
    start = time.perf_counter()
    train_step()
    first = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        train_step()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)

    model.eval()
    infer = torch.compile(model) if compiled else model
    with torch.no_grad():
        infer(x)
        infer_times = []
        for _ in range(steps):
            start = time.perf_counter()
            infer(x)
            infer_times.append(time.perf_counter() - start)
    infer_median = statistics.median(infer_times)
    return {
        "model": name,
        "variant": ("compile" if compiled else "eager") + (" channels_last" if channels_last else " nchw"),
        "train_step_ms": median * 1e3,
        "compile_s": first - median if compiled else 0.0,
        "train_gflops": 3 * flops / median / 1e9,
        "inference_samples_per_s": batch / infer_median,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--models", default="mlp,convnet,bn_convnet,sepconv,resnet")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    variants = [(False, False), (False, True)]
    if not args.no_compile:
        variants += [(True, False), (True, True)]
    for name in args.models.split(","):
        for compiled, channels_last in variants:
            r = measure(name, compiled, channels_last, args.steps)
            if args.json:
                print(json.dumps(r))
            else:
                print(
                    f"{r['model']:<11} {r['variant']:<22} step {r['train_step_ms']:8.2f} ms "
                    f"{r['train_gflops']:6.1f} GFLOP/s  infer {r['inference_samples_per_s']:9.0f}/s"
                    f"  compile {r['compile_s']:.1f} s"
                )


if __name__ == "__main__":
    main()
