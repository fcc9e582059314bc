"""Linear-probe accuracy of a backbone's blocks: how much class information its hidden states hold.

The protocol of REPA / SRA at toy scale: the frozen (EMA) model sees held-out labelled images noised to
``t`` (rectified flow: ``x_t = (1 − t)·x0 + t·ε``, fixed noise) and the *null* condition (so the label cannot
leak in through the conditioning); each block's data-token hidden states, averaged over tokens, are the
features. A closed-form ridge classifier (one-hot targets, features standardised on the fitting set, λ chosen
on a held-out fifth of it, then refitted on all of it) is scored on a separate test set.

Labelled data come from the built-in datasets: synthetic shapes (fit: stream 1001, test: stream 7, the
probe's held-out stream) and digits (fit: its training split, test: its test split).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from selfflow.core.backbone_protocol import captured
from selfflow.core.modality import preview_conditions

LEVELS = (0.0, 0.25, 0.5)
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)  # × the number of fitting samples


def labelled_splits(modality: Any, n_fit: int, n_test: int
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``((images, labels) to fit, (images, labels) to test)`` of an image modality's built-in dataset;
    digits use their whole fixed splits (``n_fit`` / ``n_test`` cap them)."""
    o = getattr(modality, "options", None)
    dataset = getattr(o, "dataset", None)
    if dataset == "synthetic_shapes":
        from selfflow.image.synthetic_shapes import render_batch

        return render_batch(1001, range(n_fit), o.image_size), render_batch(7, range(n_test), o.image_size)
    if dataset == "digits":
        from selfflow.image.digits import digits_split

        (xf, yf), (xt, yt) = digits_split("train", o.image_size), digits_split("test", o.image_size)
        return (xf[:n_fit], yf[:n_fit]), (xt[:n_test], yt[:n_test])
    raise ValueError(f"the linear probe needs labelled held-out data: data.options.dataset must be "
                     f"synthetic_shapes or digits, got {dataset!r}")


@torch.no_grad()
def block_features(model: nn.Module, modality: Any, images: torch.Tensor, t: float, blocks: Sequence[int],
                   seed: int = 0, batch: int = 256) -> dict[int, torch.Tensor]:
    """``{block: (N, D)}``: token-mean hidden states after each of ``blocks`` for ``images`` noised to ``t``
    under the null condition (noise drawn from ``seed``, the same for every model)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in blocks}
    for i in range(0, len(images), batch):
        chunk = images[i:i + batch]
        n = len(chunk)
        tokens, _ = modality.encode({"media": chunk, "labels": torch.zeros(n, dtype=torch.long),
                                     "captions": [""] * n}, device)
        _, null, _ = preview_conditions(modality, n, device)
        noise = torch.randn(tokens.x.shape, generator=gen).to(device)
        x_t = (1 - t) * tokens.x + t * noise
        tt = torch.full((n,), float(t), device=device)
        _, feats = captured(model(x_t, tokens.ids, tt, null, modality=modality.name, capture=tuple(blocks),
                                  stop_after=max(blocks)), tuple(blocks))
        for k in blocks:
            out[k].append(feats[k].float().mean(1).cpu())  # (B, L, D) → (B, D)
    return {k: torch.cat(v) for k, v in out.items()}


def ridge_probe(x_fit: torch.Tensor, y_fit: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                num_classes: int, lambdas: Sequence[float] = LAMBDAS, seed: int = 0) -> tuple[float, float]:
    """``(test accuracy, chosen λ)`` of a closed-form ridge classifier (float64) on standardised features."""
    x_fit, x_test = x_fit.double(), x_test.double()
    mean, std = x_fit.mean(0), x_fit.std(0).clamp_min(1e-6)

    def design(x: torch.Tensor) -> torch.Tensor:  # standardised, with a constant column for the intercept
        z = (x - mean) / std
        return torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], 1)

    a_fit, a_test = design(x_fit), design(x_test)
    onehot = nn.functional.one_hot(y_fit, num_classes).double()
    perm = torch.randperm(len(a_fit), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, len(a_fit) // 5)
    val, train = perm[:n_val], perm[n_val:]

    def solve(a: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
        eye = torch.eye(a.shape[1], dtype=a.dtype)
        return torch.linalg.solve(a.T @ a + lam * len(a) * eye, a.T @ y)

    def accuracy(a: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> float:
        return float(((a @ w).argmax(1) == y).double().mean())

    best = max(lambdas, key=lambda lam: accuracy(a_fit[val], solve(a_fit[train], onehot[train], lam), y_fit[val]))
    return accuracy(a_test, solve(a_fit, onehot, best), y_test), best


def linear_probe(model: nn.Module, modality: Any, levels: Sequence[float] = LEVELS,
                 blocks: Sequence[int] | None = None, n_fit: int = 1000, n_test: int = 500, seed: int = 0,
                 progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
    """``{"accuracy": {block: {t: acc}}, "lambda": {block: {t: λ}}, "levels", "blocks", "n_fit", "n_test"}``
    (block and level keys are strings, as in JSON). ``progress(1)`` is called as each level is done."""
    (xf, yf), (xt, yt) = labelled_splits(modality, n_fit, n_test)
    blocks = list(blocks or range(1, model.depth + 1))
    num_classes = int(torch.cat([yf, yt]).max()) + 1  # the data's labels, also for a text-conditioned run
    acc: dict[str, dict[str, float]] = {str(k): {} for k in blocks}
    lam: dict[str, dict[str, float]] = {str(k): {} for k in blocks}
    for t in levels:
        fit = block_features(model, modality, xf, t, blocks, seed)
        test = block_features(model, modality, xt, t, blocks, seed + 1)
        for k in blocks:
            acc[str(k)][str(t)], lam[str(k)][str(t)] = ridge_probe(fit[k], yf, test[k], yt, num_classes,
                                                                 seed=seed)
        if progress is not None:
            progress(1)
    return {"accuracy": acc, "lambda": lam, "levels": list(levels), "blocks": blocks,
            "n_fit": len(yf), "n_test": len(yt)}


def plot_probe(result: dict[str, Any], path: Any, title: str = "") -> Any:
    """Accuracy per block (x) with one line per noise level, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    blocks = result["blocks"]
    for t in result["levels"]:
        ax.plot(blocks, [result["accuracy"][str(k)][str(t)] for k in blocks], marker="o", label=f"t = {t}")
    ax.set_xlabel("block")
    ax.set_ylabel("linear-probe accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks(blocks)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "linear probe (token-mean features, null condition)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class LinearProbeEvaluator:
    """Online form (``eval.evaluators: [linear_probe]``): ``LinearProbeEvaluator(modality)(model)`` →
    ``{"lp_acc/b<k>/t<t>": acc, "lp_acc_best": …}``. ``needs_model``: the trainer hands it the EMA model
    (or the student with ``sample.use_ema: false``) instead of generated samples."""

    needs_model = True

    def __init__(self, modality: Any, levels: Sequence[float] = LEVELS, n_fit: int = 1000, n_test: int = 500):
        self.modality, self.levels, self.n_fit, self.n_test = modality, tuple(levels), n_fit, n_test
        labelled_splits(modality, 1, 1)  # fail at construction on a dataset without labels

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            result = linear_probe(model, self.modality, self.levels, n_fit=self.n_fit, n_test=self.n_test)
        finally:
            model.train(was_training)
        out = {f"lp_acc/b{k}/t{t}": v for k, row in result["accuracy"].items() for t, v in row.items()}
        out["lp_acc_best"] = max(out.values())
        return out
