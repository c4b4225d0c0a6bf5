"""Classification metrics shared by the training command and the ensemble methods."""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def classification_metrics(logits: torch.Tensor, y: torch.Tensor, bins: int = 15) -> dict:
    """Accuracy, mean NLL and expected calibration error (``bins`` equal-width bins).

    logits: float [N, classes] (logits or log-probabilities); y: int64 [N].
    """
    prob = logits.softmax(1)
    conf, pred = prob.max(1)
    correct = (pred == y).float()
    ece = 0.0
    edges = torch.linspace(0, 1, bins + 1)
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.float().mean().item() * abs(conf[m].mean().item() - correct[m].mean().item())
    return {"accuracy": correct.mean().item(), "nll": F.cross_entropy(logits, y).item(), "ece": ece}


@torch.no_grad()
def evaluate(model, x, y, batch=512, bins=15) -> dict:
    """:func:`classification_metrics` of ``model`` on (x, y), in eval mode, batch by batch."""
    was = model.training
    model.eval()
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train(was)
    return classification_metrics(logits, y, bins)
