"""A multinomial logistic regression on every view, by L-BFGS: the benches' probe ("told the photo
is one of the new classes") and the ranker the calibrated head used until 2026-12-07."""

from __future__ import annotations

import numpy as np
import torch


def fit_logistic(t: np.ndarray, labels: np.ndarray, n: int, c: float, steps: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """0.5 |W|^2 + c * sum of cross-entropies over every view of ``t`` [m, V, D], ``steps`` L-BFGS
    steps from zero (deterministic). Weight [n, D] and bias [n]."""
    d, views = t.shape[-1], t.shape[1]
    if n == 1:
        return np.zeros((1, d), np.float32), np.zeros(1, np.float32)
    x = torch.from_numpy(t.reshape(-1, d).astype(np.float64))
    y = torch.from_numpy(np.repeat(labels, views)).long()
    w = torch.zeros(n, d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = 0.5 * (w * w).sum() + c * torch.nn.functional.cross_entropy(x @ w.T + b, y, reduction="sum")
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().float().numpy(), b.detach().float().numpy()
