"""FreeTickets (Liu et al. 2022): ensembles of sparse subnetworks, EDST and DST Ensemble.

* :class:`EDST`: one sparse run that yields M tickets. An exploration phase at a
  constant high learning rate is followed by M refinement phases; each starts
  with a large drop-and-regrow (``refine_drop``, default 0.8, of every layer's
  nonzeros, by the engine's grow rule) and an LR reset (a cosine from ``lr`` down
  within the phase), and ends by freezing a copy of the model: one ticket.
* DST Ensemble: M independent sparse runs (the training command's
  ``--method ensemble``), each a ticket.
* :class:`TicketEnsemble` averages its members' softmax outputs, one forward per
  member on the sparse kernels; :func:`ensemble_report` gives each member's and
  the ensemble's accuracy, NLL and ECE, and the members' diversity (pairwise
  prediction disagreement and KL divergence).
"""
from __future__ import annotations

import copy
import math
from itertools import permutations

import torch
from torch import nn

from sparsekern.dst.engine import DSTEngine
from sparsekern.metrics import classification_metrics


class EDST:
    """Exploration, then ``n_tickets`` refinement phases, each emitting a ticket.

    Args:
        model, engine: the sparse model and its DST engine (ordinary updates continue).
        total_steps: training steps planned.
        lr: the exploration LR and each phase's starting LR.
        n_tickets: M, the number of refinement phases and tickets (>= 1).
        exploration_fraction: share of training before the first phase, in [0, 1).
        refine_drop: fraction of each layer's nnz rewired at each phase start, in (0, 1).
    """

    def __init__(self, model: nn.Module, engine: DSTEngine, total_steps: int, lr: float, n_tickets: int = 3,
                 exploration_fraction: float = 0.5, refine_drop: float = 0.8):
        if not isinstance(n_tickets, int) or n_tickets < 1:
            raise ValueError(f"n_tickets must be an int >= 1, got {n_tickets!r}")
        if not 0.0 <= exploration_fraction < 1.0:
            raise ValueError(f"exploration_fraction must be in [0, 1), got {exploration_fraction!r}")
        if not 0.0 < refine_drop < 1.0:
            raise ValueError(f"refine_drop must be in (0, 1), got {refine_drop!r}")
        self.model, self.engine, self.lr_base, self.n_tickets = model, engine, lr, n_tickets
        explore = int(round(exploration_fraction * total_steps))
        phase = (total_steps - explore) // n_tickets
        if phase < 1:
            raise ValueError(f"{total_steps} steps leave no room for {n_tickets} refinement phases")
        # phase m covers steps [starts[m], ends[m]); the last absorbs the remainder
        self.starts = [explore + m * phase for m in range(n_tickets)]
        self.ends = self.starts[1:] + [total_steps]
        for s in self.starts:
            if s + 1 > engine.step_count:
                engine.force_update(s + 1, refine_drop)      # the phase's first step rewires
        self.tickets: list[nn.Module] = []

    def lr(self, step: int) -> float:
        """Learning rate for training step ``step`` (0-based)."""
        if step < self.starts[0]:
            return self.lr_base
        m = max(i for i, s in enumerate(self.starts) if s <= step)
        t = (step - self.starts[m]) / (self.ends[m] - self.starts[m])
        return self.lr_base * 0.5 * (1 + math.cos(math.pi * t))

    def after_step(self) -> bool:
        """Call once per step after ``engine.step()``; True when a ticket was emitted."""
        if self.engine.step_count in self.ends:
            ticket = copy.deepcopy(self.model).eval()
            for p in ticket.parameters():
                p.requires_grad_(False)
            self.tickets.append(ticket)
            return True
        return False

    def result(self) -> "TicketEnsemble":
        if not self.tickets:
            raise RuntimeError("no ticket yet: EDST emits one at the end of each refinement phase")
        return TicketEnsemble(self.tickets)

    def state_dict(self) -> dict:
        return {"tickets": [t.state_dict() for t in self.tickets]}

    def load_state_dict(self, state: dict) -> None:
        self.tickets = []
        for sd in state["tickets"]:
            t = copy.deepcopy(self.model).eval()
            t.load_state_dict(sd)
            for p in t.parameters():
                p.requires_grad_(False)
            self.tickets.append(t)


class TicketEnsemble(nn.Module):
    """The average of its members' softmax outputs.

    ``predict_proba(x)`` -> float [N, classes], the mean of ``softmax(member(x))``;
    ``forward(x)`` returns its log (log-probabilities), so ``cross_entropy`` of the
    output is the ensemble's NLL and ``softmax`` of it gives the probabilities back.
    Each member runs its own forward pass on its sparse layers.
    """

    def __init__(self, members):
        super().__init__()
        members = list(members)
        if not members:
            raise ValueError("a TicketEnsemble needs at least one member")
        self.members = nn.ModuleList(members)

    def member_probs(self, x: torch.Tensor) -> torch.Tensor:
        """float [M, N, classes]: each member's softmax output."""
        return torch.stack([m(x).softmax(-1) for m in self.members])

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return self.member_probs(x).mean(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.predict_proba(x).clamp_min(1e-30).log()


@torch.no_grad()
def diversity(probs: torch.Tensor) -> dict:
    """Mean pairwise prediction disagreement and KL(p_i || p_j) over ordered pairs i != j.

    probs: float [M, N, classes] (members' softmax outputs on the same inputs).
    """
    M = probs.shape[0]
    if M < 2:
        return {"disagreement": 0.0, "kl": 0.0}
    pred = probs.argmax(-1)
    logp = probs.clamp_min(1e-30).log()
    dis, kl = [], []
    for i, j in permutations(range(M), 2):
        dis.append((pred[i] != pred[j]).float().mean().item())
        kl.append((probs[i] * (logp[i] - logp[j])).sum(-1).mean().item())
    return {"disagreement": sum(dis) / len(dis), "kl": sum(kl) / len(kl)}


@torch.no_grad()
def ensemble_report(ensemble: TicketEnsemble, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> dict:
    """Accuracy, NLL and ECE of each member and of the ensemble, and the members' diversity."""
    was = ensemble.training
    ensemble.eval()
    probs = torch.cat([ensemble.member_probs(x[i:i + batch]) for i in range(0, len(x), batch)], dim=1)
    ensemble.train(was)
    members = [classification_metrics(p.clamp_min(1e-30).log(), y) for p in probs]
    return {"members": members, "ensemble": classification_metrics(probs.mean(0).clamp_min(1e-30).log(), y),
            **diversity(probs)}
