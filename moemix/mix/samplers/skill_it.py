"""Skill-It online data mixing (Chen et al., "Skill-it! A Data-Driven Skills Framework for Understanding and
Training Language Models", NeurIPS 2023).

Every ``update_steps`` the mixture over k data groups (skills) is recomputed from recent validation losses::

    w = w_prior * exp(eta * A @ sum_{last window evaluations} L)        # A: skills graph, 1 on the diagonal
    p = w / sum(w)

so groups whose own (or prerequisite-linked) validation loss lags get sampled more.
"""
from __future__ import annotations

from collections import deque
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from ..functional._checks import as_positive_int, check_positive

__all__ = ["SkillItSampler"]


class SkillItSampler(Sampler[int]):
    """Sample dataset indices group by group with Skill-It's online mixture weights.

    Args:
        group_index: ``[N]`` group (skill) id in ``[0, k)`` of each dataset item.
        num_groups: k. Defaults to ``max(group_index) + 1``.
        skills_graph: ``[k, k]`` A; defaults to the identity (no cross-skill links). The diagonal must be 1.
        prior: ``[k]`` w_prior > 0. Defaults to uniform.
        eta: learning rate, > 0. Defaults to 0.2 (the paper uses 0.2-0.5).
        window: how many recent evaluations to sum. Defaults to 3.
        num_samples: indices per epoch. Defaults to N.
        generator: optional ``torch.Generator``.

    Call :meth:`update` with the per-group validation losses ``[k]`` after each evaluation (every
    ``update_steps`` training steps); :attr:`proportions` is the current mixture. :meth:`state_dict` and
    :meth:`load_state_dict` carry the loss history across a resume.
    """

    def __init__(self, group_index: torch.Tensor, *, num_groups: int | None = None,
                 skills_graph: torch.Tensor | None = None, prior: Sequence[float] | torch.Tensor | None = None,
                 eta: float = 0.2, window: int = 3, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        group_index = torch.as_tensor(group_index).long().reshape(-1)
        k = int(group_index.max()) + 1 if num_groups is None else int(num_groups)
        if group_index.numel() == 0 or int(group_index.min()) < 0 or int(group_index.max()) >= k:
            raise ValueError(f"group_index must hold group ids in [0, num_groups={k})")
        a = torch.eye(k, dtype=torch.float64) if skills_graph is None else torch.as_tensor(skills_graph).double()
        if a.shape != (k, k):
            raise ValueError(f"skills_graph must have shape [{k}, {k}], got {tuple(a.shape)}")
        if not torch.allclose(a.diagonal(), torch.ones(k, dtype=torch.float64)):
            raise ValueError("skills_graph must have 1 on the diagonal (each skill helps itself)")
        w0 = torch.ones(k, dtype=torch.float64) if prior is None else torch.as_tensor(prior).double()
        if w0.shape != (k,) or not bool((w0 > 0).all()):
            raise ValueError(f"prior must be [{k}] positive weights, got {w0!r}")
        check_positive("eta", eta)
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if num_samples is not None:
            num_samples = as_positive_int("num_samples", num_samples)
        self.group_index = group_index
        self.members = [torch.nonzero(group_index == g).squeeze(1) for g in range(k)]
        self.skills_graph, self.prior, self.eta = a, w0, float(eta)
        self.history: deque[torch.Tensor] = deque(maxlen=window)
        self.proportions = (w0 / w0.sum()).float()
        self.num_samples = num_samples if num_samples is not None else group_index.numel()
        self.generator = generator

    def update(self, val_losses: Sequence[float] | torch.Tensor) -> torch.Tensor:
        """Record per-group validation losses ``[k]`` and return the new proportions ``[k]``."""
        losses = torch.as_tensor(val_losses, dtype=torch.float64).reshape(-1)
        if losses.numel() != self.prior.numel():
            raise ValueError(f"val_losses must have one loss per group ({self.prior.numel()}), got {losses.numel()}")
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"val_losses must be finite, got {losses.tolist()}")
        self.history.append(losses)
        self._recompute()
        return self.proportions

    def _recompute(self) -> None:
        total = torch.stack(tuple(self.history)).sum(0)
        logits = self.prior.log() + self.eta * (self.skills_graph @ total)
        self.proportions = torch.softmax(logits, dim=0).float()  # w / sum(w), computed stably

    def state_dict(self) -> dict:
        """The loss history the mixture comes from (a resumed run continues from the same proportions)."""
        return {"history": [h.clone() for h in self.history], "window": self.history.maxlen}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; the window must match this sampler's."""
        if state["window"] != self.history.maxlen:
            raise ValueError(f"state has window={state['window']}, this sampler {self.history.maxlen}")
        history = [torch.as_tensor(h, dtype=torch.float64) for h in state["history"]]
        if any(h.shape != self.prior.shape for h in history):
            raise ValueError(f"state's losses must have one entry per group ({self.prior.numel()})")
        self.history.clear()
        self.history.extend(history)
        if self.history:
            self._recompute()
        else:
            self.proportions = (self.prior / self.prior.sum()).float()

    def sample(self, n: int) -> torch.Tensor:
        """``[n]`` dataset indices: a group from :attr:`proportions`, then an item uniformly within it."""
        p = self.proportions.clone()
        for g, m in enumerate(self.members):
            if m.numel() == 0:
                p[g] = 0
        groups = torch.multinomial(p, n, replacement=True, generator=self.generator)
        out = torch.empty(n, dtype=torch.long)
        for g in groups.unique().tolist():
            sel = groups == g
            pick = torch.randint(0, self.members[g].numel(), (int(sel.sum()),), generator=self.generator)
            out[sel] = self.members[g][pick]
        return out

    def __iter__(self) -> Iterator[int]:
        yield from self.sample(self.num_samples).tolist()

    def __len__(self) -> int:
        return self.num_samples
