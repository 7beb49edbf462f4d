"""How much of the dual's tilt a policy built on π_ref's own features can reach, on a run directory.

    python scripts/learnable_tilt.py runs/d0 [--alpha 1e-3]

The dual reweights π_ref's K samples per prompt by their scores, including score differences that
come from wording no policy can target. A world-free proxy for "what a fine-tune of π_ref can
express": each score's within-prompt deviation is regressed (ridge, 5 prompt folds, cross-fitted)
on π_ref's final hidden state of the response (mean over the response's tokens, and at its last
token); the tilt at the run's λ is recomputed with those fitted scores (prompt means kept). The
script prints the cross-fitted within-prompt R² and the predicted changes beside the dual's and the
gold judge's behaviour-level tilt (scripts/shortfall.py). The features are cached in the run
directory (_learnable_features.npy).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parent))
from shortfall import behaviour_level, changes  # noqa: E402

from dualign.models import load_causal_lm, load_tokenizer  # noqa: E402
from dualign.records import read_dual  # noqa: E402
from dualign.segments import Segments  # noqa: E402
from dualign.templates import format_prompt  # noqa: E402


def features(scores: pd.DataFrame, model_path: str, template: str, batch: int = 256) -> np.ndarray:
    """[n, 2d]: π_ref's last hidden state averaged over the response's tokens, and at its last token."""
    tok = load_tokenizer(model_path)
    model = load_causal_lm(model_path, device="cpu").eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(scores), batch):
            part = scores.iloc[i:i + batch]
            prompts = [tok(format_prompt(p, template))["input_ids"] for p in part["prompt"]]
            full = [p + tok(r)["input_ids"] for p, r in zip(prompts, part["response"], strict=True)]
            width = max(len(f) for f in full)
            ids = torch.tensor([f + [tok.pad_token_id or 0] * (width - len(f)) for f in full])
            attention = torch.tensor([[1] * len(f) + [0] * (width - len(f)) for f in full])
            hidden = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states[-1]
            mask = torch.zeros(attention.shape)
            for j, (p, f) in enumerate(zip(prompts, full, strict=True)):
                mask[j, len(p):len(f)] = 1
            pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1).clamp(min=1)[:, None]
            last = hidden[torch.arange(len(full)), torch.tensor([len(f) - 1 for f in full])]
            out.append(torch.cat([pooled, last], 1).numpy())
    return np.concatenate(out)


def within(seg: Segments, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x minus its prompt mean, the prompt mean per row), rows [n] or [n, d] in the input's order."""
    grouped = seg.group(x).T  # the prompt axis last, as Segments reduces
    means = seg.ungroup(seg.expand(seg.sum(grouped) / seg.counts).T)
    return x - means, means


def cross_fitted(h: np.ndarray, y: np.ndarray, fold: np.ndarray, alpha: float) -> np.ndarray:
    """Ridge predictions of y from h, each fold predicted by a fit on the others; the penalty is
    alpha × the mean diagonal of hᵀh."""
    pred = np.zeros_like(y)
    for f in np.unique(fold):
        train, test = fold != f, fold == f
        gram = h[train].T @ h[train]
        w = np.linalg.solve(gram + alpha * np.mean(np.diag(gram)) * np.eye(h.shape[1]), h[train].T @ y[train])
        pred[test] = h[test] @ w
    return pred


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--alpha", type=float, default=1e-3, help="ridge penalty (× mean diagonal of HᵀH)")
    args = parser.parse_args()
    run = Path(args.run_dir)
    scores = pd.read_parquet(run / "scores.parquet")
    dual = read_dual(run / "dual.json")
    columns = [dual.reward, *dict.fromkeys(c.column for c in dual.parsed)]
    cache = run / "_learnable_features.npy"
    if cache.exists():
        h = np.load(cache)
    else:
        import yaml
        sample_cfg = yaml.safe_load((run / "sample.config.yaml").read_text())
        start = time.perf_counter()
        h = features(scores, sample_cfg["model"], sample_cfg.get("template", "plain"))
        np.save(cache, h)
        print(f"features {h.shape} in {time.perf_counter() - start:.0f} s")
    seg = Segments.of(scores["prompt_id"].to_numpy())
    h_within, _ = within(seg, h)
    fold = np.random.default_rng(0).integers(0, 5, size=seg.num)[seg.codes()]
    fitted = scores.copy()
    for c in columns:
        y_within, y_mean = within(seg, scores[c].to_numpy(float))
        pred = cross_fitted(h_within, y_within, fold, args.alpha)
        r2 = 1 - np.mean((y_within - pred) ** 2) / np.mean(y_within ** 2)
        print(f"{c}: cross-fitted within-prompt R² {r2:.3f}")
        fitted[c] = y_mean + pred
    rows = {"dual's prediction (K-sample tilt)": changes(scores, dual, columns),
            "π_ref-feature tilt (linear, cross-fitted)": changes(fitted, dual, columns),
            "behaviour-level tilt (gold judge)": changes(behaviour_level(scores, columns), dual, columns)}
    print(pd.DataFrame(rows).T.round(3).to_string())


if __name__ == "__main__":
    main()
