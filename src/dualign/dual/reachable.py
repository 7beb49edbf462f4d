"""The reachable tilt: plan on the part of each score that a fine-tune of π_ref can target.

The dual's K-sample tilt reweights π_ref's own samples by their scores, so within one prompt it
also favours the samples that score high for reasons no policy can reproduce on fresh samples
(the scorers' response-level noise, wording the policy cannot aim at). A fine-tune then delivers
less than the tilt predicts (docs/results/demo.md, "Why the learned reward falls"). ``dual: {tilt: reachable}``
replaces each score column by what π_ref's own representation of the response predicts of it,
before solving:

    s̃(x, y) = s̄(x) + ĥ(x, y)ᵀŵ,   ĥ = h(x, y) − h̄(x),   ŵ = ridge fit of s − s̄ on ĥ

with h(x, y) π_ref's final hidden state averaged over the response's tokens and taken at its last
token (:func:`response_features`), bars the means over the prompt's samples, and ŵ cross-fitted:
each fold of prompts is predicted by a fit on the others (:func:`cross_fitted_ridge`), so a score's
own noise cannot leak into its fitted value. The dual is then solved on s̃ as usual; the fine-tune
still trains on the original scores at that λ. The residual s − s̃ is noise that fresh samples
carry too, so its variance joins the evaluation's standard error of a confidence plan.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dualign._infra.errors import InputError
from dualign._infra.io import atomic_path, read_table
from dualign._infra.progress import Progress
from dualign._infra.segments import Segments
from dualign.modeling.templates import format_prompt


def within_prompt(seg: Segments, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x − x̄(prompt), x̄(prompt) per row) for grouped rows x [n] or [n, d]: x̄ the prompt's mean."""
    x = np.asarray(x, dtype=np.float64)
    flat = x.reshape(len(x), -1)
    means = seg.expand(seg.sum(flat.T) / seg.counts).T
    means = means.reshape(x.shape)
    return x - means, means


def prompt_folds(seg: Segments, folds: int, seed: int) -> np.ndarray:
    """Each grouped row's fold in 0..folds−1, drawn per prompt (all samples of a prompt together)."""
    return seg.expand(np.random.default_rng(seed).integers(0, folds, size=seg.num))


def cross_fitted_ridge(h: np.ndarray, y: np.ndarray, fold: np.ndarray, alpha: float) -> np.ndarray:
    """ŷ with each fold f predicted by ŵ_f = (HᵀH + α·tr(HᵀH)/d·I)⁻¹Hᵀy fitted on the other folds
    (H, y their rows; d = H's columns) → [n]. A fold whose complement is empty is predicted as 0."""
    pred = np.zeros(len(y))
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        if not train.any():
            continue
        gram = h[train].T @ h[train]
        penalty = alpha * np.trace(gram) / h.shape[1]
        w = np.linalg.solve(gram + penalty * np.eye(h.shape[1]), h[train].T @ y[train])
        pred[test] = h[test] @ w
    return pred


@dataclass
class ReachableFit:
    """Fitted columns s̃ (grouped rows), each column's cross-fitted within-prompt R² and the variance
    of its residual s − s̃ (pooled over rows, on n − N degrees of freedom: N prompt means were taken
    out); ``h_within``, ``s_within``, ``s_mean`` and ``fold`` keep what a refit on resampled prompts
    needs (:func:`refit_columns`)."""

    columns: dict[str, np.ndarray]
    r2: dict[str, float]
    residual_variance: dict[str, float]
    h_within: np.ndarray | None = None  # [n, d] ĥ
    s_within: np.ndarray | None = None  # [n, c] s − s̄, columns in ``columns``' order
    s_mean: np.ndarray | None = None  # [n, c] s̄
    fold: np.ndarray | None = None  # [n] each row's fold
    alpha: float = 1e-3
    seed: int = 0  # the folds' seed
    linearized: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)  # linearized_refit's


def reachable_columns(seg: Segments, columns: dict[str, np.ndarray], features: np.ndarray, *,
                      alpha: float = 1e-3, folds: int = 5, seed: int = 0) -> ReachableFit:
    """s̃ = s̄(x) + cross-fitted ridge of (s − s̄) on (h − h̄) for each column [n] (grouped rows);
    R² = 1 − Σ(s − s̃)² / Σ(s − s̄)²; residual variance ε² = Σ(s − s̃)² / (n − N), N prompts: the
    within-prompt centring leaves n − N degrees of freedom, so dividing by n would shrink ε² by
    (K−1)/K at K samples per prompt."""
    if features.ndim != 2 or len(features) != seg.size:
        raise ValueError(f"features must be [{seg.size}, d], got {features.shape}")
    h_within, _ = within_prompt(seg, features)
    fold = prompt_folds(seg, folds, seed)
    fitted, r2, resid, within, means = {}, {}, {}, [], []
    dof = max(seg.size - seg.num, 1)
    for name, s in columns.items():
        s_within, s_mean = within_prompt(seg, s)
        pred = cross_fitted_ridge(h_within, s_within, fold, alpha)
        fitted[name] = s_mean + pred
        total = float(np.sum(s_within**2))
        err = float(np.sum((s_within - pred) ** 2))
        r2[name] = 1.0 - err / total if total > 0 else 1.0
        resid[name] = err / dof
        within.append(s_within)
        means.append(s_mean)
    return ReachableFit(fitted, r2, resid, h_within, np.stack(within, 1), np.stack(means, 1), fold, alpha, seed)


def refit_columns(seg: Segments, fit: ReachableFit, counts: np.ndarray) -> np.ndarray:
    """s̃ of every row [n, c] (columns in ``fit.columns``' order) with ŵ refitted on the resample
    that draws prompt x ``counts[x]`` times: each row's fold is predicted by the ridge fitted on the
    other folds' drawn rows, each row weighted by its prompt's count (folds and centring as in the
    fit, so a prompt drawn twice stays in one fold). Naive equivalent: :func:`reachable_columns`
    on the table with each prompt's rows repeated ``counts[x]`` times (tests/test_plan_statistics.py)."""
    weight = seg.expand(np.asarray(counts, dtype=np.float64))
    h, y, fold = fit.h_within, fit.s_within, fit.fold
    drawn = weight > 0
    grams, moments = {}, {}
    for f in np.unique(fold):
        rows = drawn & (fold == f)
        hw = h[rows] * weight[rows, None]
        grams[f], moments[f] = hw.T @ h[rows], hw.T @ y[rows]
    gram_all, moment_all = sum(grams.values()), sum(moments.values())
    pred = np.zeros_like(y)
    for f in grams:
        gram = gram_all - grams[f]
        trace = np.trace(gram)
        if trace <= 0:
            continue
        w = np.linalg.solve(gram + fit.alpha * trace / h.shape[1] * np.eye(h.shape[1]), moment_all - moments[f])
        pred[fold == f] = h[fold == f] @ w
    return fit.s_mean + pred


def linearized_refit(seg: Segments, fit: ReachableFit) -> Callable[[np.ndarray], np.ndarray]:
    """counts [N] → s̃ of every row [n, c] with each fold's ŵ_f refitted to first order on the
    resample that draws prompt x counts[x] times:

        ŵ_f(c) = ŵ_f + (G_f + α·tr(G_f)/d·I)⁻¹ Σ_{i ∉ f} (c_i − 1)·ĥ_i·(s_i − s̄_i − ĥ_iᵀŵ_f)

    (G_f = Σ_{i ∉ f} ĥ_iĥ_iᵀ, c_i the count of row i's prompt): one Newton step of the weighted
    ridge from ŵ_f, the gram held at the sample's. It costs two passes over the rows instead of a
    new gram per resample, and its perturbations average zero, so the bootstrap is not biased by
    the duplicates' smaller effective sample. Naive equivalent: :func:`refit_columns`, the exact
    weighted refit (tests/test_plan_statistics.py holds them close)."""
    h, y, fold = fit.h_within, fit.s_within, fit.fold
    labels = [f for f in np.unique(fold) if (fold != f).any()]
    c = y.shape[1]
    inverses, resid, base = [], np.zeros((len(y), len(labels) * c)), fit.s_mean.copy()
    for i, f in enumerate(labels):
        train, test = fold != f, fold == f
        gram = h[train].T @ h[train]
        inverses.append(np.linalg.inv(gram + fit.alpha * np.trace(gram) / h.shape[1] * np.eye(h.shape[1])))
        w = inverses[-1] @ (h[train].T @ y[train])
        resid[train, i * c:(i + 1) * c] = y[train] - h[train] @ w  # zero on fold f's own rows
        base[test] += h[test] @ w
    own = np.zeros(len(y), dtype=np.int64)  # each row's position among the fitted folds
    for i, f in enumerate(labels):
        own[fold == f] = i
    rows = np.isin(fold, labels)

    def refit(counts: np.ndarray) -> np.ndarray:
        delta = seg.expand(np.asarray(counts, dtype=np.float64)) - 1.0
        moments = h.T @ (delta[:, None] * resid)  # [d, folds·c]: every fold's Σ (c_i − 1)ĥ_i r_i at once
        steps = np.concatenate([inv @ moments[:, i * c:(i + 1) * c] for i, inv in enumerate(inverses)], 1)
        shift = (h @ steps).reshape(len(y), len(labels), c)
        out = base.copy()
        out[rows] += shift[np.flatnonzero(rows), own[rows]]
        return out

    return refit


def response_features(model, tokenizer, prompts: list[str], responses: list[str], template: str,
                      batch_size: int = 64, progress: bool = False) -> np.ndarray:
    """π_ref's final hidden state of each response → [n, 2d] float32: its mean over the response's
    tokens beside its value at the response's last token (no eos appended: the text itself)."""
    import torch

    from dualign._infra.timing import part
    from dualign.modeling.models import accepts_logits_to_keep, tokenize_pairs

    device = next(model.parameters()).device
    # the output layer is not needed: one position's logits where the model can skip the others
    keep_one = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
    texts = [format_prompt(p, template, tokenizer) for p in prompts]
    order = np.argsort([len(t) + len(r) for t, r in zip(texts, responses, strict=True)], kind="stable")
    out: np.ndarray | None = None
    for start in Progress(range(0, len(order), batch_size), desc="π_ref features", unit="batches",
                          enabled=progress):
        idx = order[start:start + batch_size]
        batch = tokenize_pairs(tokenizer, [texts[i] for i in idx], [responses[i] for i in idx],
                               truncated=[True] * len(idx))
        with torch.inference_mode(), part("forward (features)"):
            hidden = model(input_ids=batch["input_ids"].to(device),
                           attention_mask=batch["attention_mask"].to(device),
                           output_hidden_states=True, **keep_one).hidden_states[-1].float()
            mask = batch["response_mask"].to(device).float()
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]
            last = hidden[torch.arange(len(idx), device=device), batch["attention_mask"].to(device).sum(1) - 1]
            block = torch.cat([pooled, last], 1).cpu().numpy().astype(np.float32)
        if out is None:
            out = np.empty((len(texts), block.shape[1]), dtype=np.float32)
        out[idx] = block
    return out if out is not None else np.empty((0, 0), dtype=np.float32)


FEATURES = "reachable_features.safetensors"


def reference_features(model: str | None, scores_path: str | Path, cache: Path | None = None, *,
                       revision: str | None = None, template: str = "auto", trust_remote_code: bool = False,
                       device: str = "auto", reuse: Path | None = None) -> np.ndarray:
    """π_ref's features (:func:`response_features`) of every row of the
    scores table, in its file order → [n, 2d]. ``cache`` (a safetensors file) is reused when it was
    made from the same model, revision, template and texts, and written otherwise; ``reuse``, a
    cache that is only read (e.g. a run's, from ``dualign plan``), is tried first."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from dualign.modeling.models import load_tokenizer, resolve_device
    from dualign.modeling.refprobs import load_reference

    if model is None:
        raise InputError("π_ref's features need a model: give --model")
    table = read_table(scores_path)
    missing = [c for c in ("prompt", "response") if c not in table.columns]
    if missing:
        raise InputError(f"{scores_path}: π_ref's features need the texts, but column {missing[0]!r} is missing")
    prompts, responses = table["prompt"].astype(str).tolist(), table["response"].astype(str).tolist()
    digest = hashlib.sha256("\0".join(prompts + responses).encode()).hexdigest()
    key = {"model": str(model), "revision": str(revision), "template": template, "texts": digest}
    for path in (reuse, cache):
        if path is not None and path.exists():
            with safe_open(str(path), framework="np") as f:
                if (f.metadata() or {}) == key:
                    return f.get_tensor("features")
    device = resolve_device(device)
    tokenizer = load_tokenizer(model, revision=revision, trust_remote_code=trust_remote_code)
    reference = load_reference(model, device, revision, trust_remote_code)
    features = response_features(reference, tokenizer, prompts, responses, template, progress=True)
    if cache is not None:
        with atomic_path(cache) as tmp:
            save_file({"features": features}, str(tmp), metadata=key)
    return features
