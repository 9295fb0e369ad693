#!/usr/bin/env python3
"""Read kiln's TensorBoard event files with TensorBoard's own reader.

Usage: python3 tests/tensorboard_check.py LOGDIR EPOCHS

Exits non-zero, with a message, when the scalars, histograms or the model
summary that `kiln train --logdir` promises are missing or wrong.
"""

import math
import sys

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main():
    logdir, epochs = sys.argv[1], int(sys.argv[2])
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ["epoch/loss", "epoch/accuracy", "epoch/val_loss", "epoch/val_accuracy", "epoch/lr", "step/loss"]:
        assert tag in tags["scalars"], f"missing scalar {tag}; have {tags['scalars']}"
    losses = acc.Scalars("epoch/loss")
    assert [e.step for e in losses] == list(range(1, epochs + 1)), [e.step for e in losses]
    assert all(math.isfinite(e.value) and e.value > 0 for e in losses), losses
    accuracy = acc.Scalars("epoch/val_accuracy")[-1].value
    assert 0.0 <= accuracy <= 1.0, accuracy
    weights = [t for t in tags["histograms"] if t.startswith("weights/")]
    activations = [t for t in tags["histograms"] if t.startswith("activations/")]
    assert weights, f"no weight histograms; have {tags['histograms']}"
    assert activations, "no activation histograms"
    histogram = acc.Histograms(weights[0])[-1].histogram_value
    assert histogram.num > 0 and histogram.min <= histogram.max, histogram
    assert "model/summary" in tags["tensors"], f"no model summary; have {tags['tensors']}"
    text = acc.Tensors("model/summary")[0].tensor_proto.string_val[0].decode()
    assert "Trainable parameters" in text, text
    print(f"ok: {len(tags['scalars'])} scalar tags, {len(weights)} weight and {len(activations)} activation histograms")


if __name__ == "__main__":
    main()
