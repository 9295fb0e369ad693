"""Trains bn_convnet on the full Fashion-MNIST in PyTorch with the recipe
that `kiln train models/bn_convnet.model` uses, for a side-by-side record.

Recipe: pixels divided by 255, then standardised with the training set's
mean and standard deviation; batch 128, reshuffled every epoch; SGD with
momentum 0.9 and learning rate 0.01; PyTorch's default initialisation.
Prints the test accuracy and wall time of every epoch.

    python3 bench/pytorch_fashion.py [--data DIR] [--epochs 10] [--threads 2]
        [--channels-last]
"""

import argparse
import gzip
import pathlib
import time

import numpy as np
import torch
from torch import nn

from pytorch_zoo import build


def idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(folder):
    folder = pathlib.Path(folder)
    x = idx(folder / "train-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    y = idx(folder / "train-labels-idx1-ubyte.gz").astype(np.int64)
    tx = idx(folder / "t10k-images-idx3-ubyte.gz").astype(np.float32) / 255.0
    ty = idx(folder / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    mean, std = x.mean(), x.std()
    norm = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)
    return norm(x), torch.from_numpy(y), norm(tx), torch.from_numpy(ty)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    x, y, tx, ty = load(args.data)
    model = build("bn_convnet")
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    started = time.perf_counter()
    for epoch in range(args.epochs):
        epoch_start = time.perf_counter()
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            batch = order[i : i + 128]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x[batch].contiguous(memory_format=fmt)), y[batch])
            loss.backward()
            opt.step()
        model.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(tx), 1000):
                logits = model(tx[i : i + 1000].contiguous(memory_format=fmt))
                correct += (logits.argmax(1) == ty[i : i + 1000]).sum().item()
        print(
            f"epoch {epoch + 1}/{args.epochs}  test_accuracy {100 * correct / len(tx):.2f}%  "
            f"{time.perf_counter() - epoch_start:.1f}s",
            flush=True,
        )
    print(f"total {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
