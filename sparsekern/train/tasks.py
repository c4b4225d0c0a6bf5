"""What a dataset asks of the model: its training loss and its evaluation.

* :class:`Classification`: logits float [N, classes] against labels int64 [N]; accuracy,
  NLL and expected calibration error (:func:`sparsekern.metrics.evaluate`).
* :class:`LanguageModelling`: next-token logits float [N, T, vocab] against the next tokens
  int64 [N, T]; validation loss (nats per token), perplexity, bits per byte (the tokens are
  bytes) and next-byte accuracy.

The loss calls ``F.cross_entropy`` exactly once per training step (as a mean over the
examples or tokens it is given).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sparsekern.metrics import evaluate


class Classification:
    """One label per example."""

    name = "classification"
    headline, short = "accuracy", "acc"      # the metric the plots and progress bars show

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of logits float [N, classes] against y int64 [N]."""
        return F.cross_entropy(logits, y)

    def evaluate(self, model, x: torch.Tensor, y: torch.Tensor) -> dict:
        """accuracy, nll, ece of ``model`` on (x, y), in eval mode."""
        return evaluate(model, x, y)


class LanguageModelling:
    """Next-token prediction over byte sequences."""

    name = "language-model"
    headline, short = "perplexity", "ppl"

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy per token of logits float [N, T, V] against y int64 [N, T]."""
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self, model, x: torch.Tensor, y: torch.Tensor, batch: int = 64) -> dict:
        """loss (mean nats per token), perplexity (exp of it), bits_per_byte (loss / ln 2) and
        accuracy (next byte) of ``model`` over every token of (x, y), in eval mode."""
        was = model.training
        model.eval()
        nll, correct = 0.0, 0
        for i in range(0, len(x), batch):
            logits = model(x[i:i + batch]).float()
            target = y[i:i + batch]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                   reduction="sum").item()
            correct += int((logits.argmax(-1) == target).sum())
        model.train(was)
        tokens = y.numel()
        loss = nll / tokens
        return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": loss / math.log(2),
                "accuracy": correct / tokens}


TASKS = {t.name: t for t in (Classification(), LanguageModelling())}


def task_of(split) -> Classification | LanguageModelling:
    """The task of a :class:`sparsekern.data.Split` (by its ``task`` field)."""
    return TASKS[split.task]
