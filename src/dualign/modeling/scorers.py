"""Scorers: ``NAME=KIND:TARGET[,higher_is_better|,lower_is_better]`` parsed and loaded as
functions ``(prompts, responses) -> scores``.

- ``hf:PATH`` — an ``AutoModelForSequenceClassification`` with ``num_labels=1``; the score is its
  logit. Input: ``tokenizer(prompt, response)`` text pairs (``hf_input=pair``), or the templated
  prompt followed by the response as one text (``hf_input=template``).
- ``beaver:PATH`` — a Safe-RLHF score model (Beaver reward/cost: LLaMA backbone ``model.*`` plus a
  linear ``score_head``), read without the safe-rlhf package. Input:
  ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}`` + eos, as in Safe-RLHF
  training; the score is ``score_head`` applied to the hidden state of the last token (its
  "end score"), normalised only when the model's config says ``do_normalize``.
- ``callable:MODULE:FUNCTION`` (or ``callable:FILE.py:FUNCTION``) — ``f(prompts, responses) -> list[float]``.
- ``implicit:PATH[,beta=B]`` — the implicit reward of a policy π (e.g. DPO-pre-aligned, PeCAN):
  h = B·(log π(y|x) − log π_ref(y|x)), sequence log-probs as the sample stage computes them
  (``models.tokenize_pairs`` + ``sequence_logprobs``, the sample stage's template). B defaults to
  the β the policy was trained with (its ``dualign_train.yaml``), else 0.1. An implicit reward is
  defined only up to a per-prompt constant, so the dual refuses absolute thresholds on it.

transformers and safetensors are imported inside the loaders: loading a scorer costs seconds
that parsing a spec should not.

The four scorer kinds, each a parser entry and a loader with its input format, and
the shared-encoder path that scores several heads in one pass; one file keeps the spec grammar
beside everything it can name.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open

from dualign._infra.config import load_yaml
from dualign._infra.distributed import Ranks
from dualign._infra.errors import ConfigError, DualignError, InputError, first_line
from dualign._infra.progress import Progress
from dualign._infra.timing import timed
from dualign.modeling.models import (
    load_causal_lm,
    load_error,
    load_tokenizer,
    resolve_device,
    sequence_logprobs,
    tokenize_pairs,
)
from dualign.modeling.templates import format_prompt

KINDS = ("hf", "beaver", "callable", "implicit")
DIRECTIONS = ("higher_is_better", "lower_is_better")
ScoreFn = Callable[[list[str], list[str]], Sequence[float]]


@dataclass(frozen=True)
class ScorerSpec:
    name: str
    kind: str
    target: str
    direction: str | None  # None: not declared
    beta: float | None = None  # implicit scorers only; None: not declared


def parse_scorer(spec: str) -> ScorerSpec:
    """Parse ``NAME=KIND:TARGET[,higher_is_better|,lower_is_better][,beta=B]`` (beta: implicit only)."""
    name, eq, rest = spec.partition("=")
    kind, colon, target = rest.partition(":")
    direction = beta = None
    while True:
        head, comma, tail = target.rpartition(",")
        tail = tail.strip()
        if comma and tail in DIRECTIONS:
            target, direction = head, tail
        elif comma and tail.startswith("beta="):
            target, beta = head, _beta_option(tail, spec, kind)
        else:
            break
    if not eq or not colon or not target:
        raise ConfigError(f"scorer {spec!r}: expected NAME=KIND:TARGET (e.g. cost=beaver:/models/cost)")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"scorer {spec!r}: name {name!r} is not a valid column name")
    if kind not in KINDS:
        raise ConfigError(f"scorer {spec!r}: unknown kind {kind!r} (kinds: {', '.join(KINDS)})")
    return ScorerSpec(name, kind, target, direction, beta)


def _beta_option(text: str, spec: str, kind: str) -> float:
    if kind != "implicit":
        raise ConfigError(f"scorer {spec!r}: beta= is an option of implicit scorers only")
    try:
        beta = float(text.removeprefix("beta="))
    except ValueError:
        raise ConfigError(f"scorer {spec!r}: {text!r} is not a number") from None
    if not beta > 0 or not np.isfinite(beta):
        raise ConfigError(f"scorer {spec!r}: beta must be a positive number, got {text!r}")
    return beta


def _torch_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(getattr(torch, dtype, None), torch.dtype):
        raise ConfigError(f"dtype {dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
    return getattr(torch, dtype)


def _model_dir(target: str) -> Path:
    """A local model directory, or a Hub id resolved to its (cached) snapshot."""
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InputError(f"scorer model '{target}' has no config.json (not a Hugging Face model directory)")
        return path
    if path.exists():
        raise InputError(f"scorer model '{target}' is a file, not a model directory")
    if target.startswith((".", "/", "~")) or target.count("/") > 1:
        raise InputError(f"scorer model '{target}' does not exist")
    try:
        return Path(snapshot_download(target))
    except Exception as e:  # noqa: BLE001 - offline, unknown id: one line
        raise InputError(f"scorer model '{target}' could not be loaded from the Hub: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}") from None


class HFClassifierScorer:
    """score = logit of a one-label ``AutoModelForSequenceClassification``."""

    def __init__(self, target: str, device: str = "auto", dtype: str = "auto", max_length: int = 1024,
                 hf_input: str = "pair", template: str = "auto", trust_remote_code: bool = False):
        from transformers import AutoModelForSequenceClassification

        model_dir = _model_dir(target)
        self.device = resolve_device(device)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                str(model_dir), dtype=_torch_dtype(dtype, self.device), trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: BLE001 - any failure to read a model's files is one line naming it
            raise load_error("scorer model", target, e) from None
        if model.config.num_labels != 1:
            raise InputError(f"scorer model '{target}' has {model.config.num_labels} labels; "
                             "a score model needs num_labels=1")
        self.tokenizer = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
        if model.config.pad_token_id is None:
            model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = model.to(self.device).eval()
        self.max_length, self.hf_input, self.template = max_length, hf_input, template

    @classmethod
    def from_model(cls, model, tokenizer, max_length: int = 1024, hf_input: str = "pair",
                   template: str = "auto") -> HFClassifierScorer:
        """The scorer of a one-label sequence classifier already loaded (the Python API's scorers)."""
        if getattr(model.config, "num_labels", None) != 1:
            raise InputError(f"scorer model has {getattr(model.config, 'num_labels', None)} labels; "
                             "a score model needs num_labels=1")
        scorer = cls.__new__(cls)
        scorer.model, scorer.tokenizer = model.eval(), tokenizer
        scorer.device = next(model.parameters()).device
        scorer.max_length, scorer.hf_input, scorer.template = max_length, hf_input, template
        return scorer

    @timed("score forward")
    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        if self.hf_input == "pair":
            args = (prompts, responses)
        else:
            args = ([format_prompt(p, self.template, self.tokenizer) + r
                     for p, r in zip(prompts, responses, strict=True)],)
        batch = self.tokenizer(*args, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        return self.model(**batch).logits[:, 0].float().cpu().tolist()


class _Replay(torch.nn.Module):
    """Stands in for a module whose output another model already computed on the same batch."""

    def __init__(self) -> None:
        super().__init__()
        self.value = None

    def forward(self, *args, **kwargs):
        return self.value


def _compute_weights(module: torch.nn.Module) -> int:
    """Parameters that cost multiplications: all but embedding tables (a lookup is cheap)."""
    return sum(p.numel() for m in module.modules() if not isinstance(m, torch.nn.Embedding)
               for p in m.parameters(recurse=False))


def shared_trunk(leader: torch.nn.Module, other: torch.nn.Module) -> str | None:
    """The name of the submodule of ``other`` with the most non-embedding weights whose parameters
    and buffers all equal the same-named ones of ``leader`` (e.g. ``bert.encoder`` of two
    classifiers fine-tuned on one frozen encoder), or None when there is none holding at least a
    quarter of those weights (freshly initialised layer norms are equal in any two models; sharing
    them saves nothing)."""
    if type(leader) is not type(other):
        return None
    mine = dict(leader.named_modules())
    best, size = None, _compute_weights(other) // 4
    for name, module in other.named_modules():
        twin = mine.get(name)
        if not name or twin is None:
            continue
        n = _compute_weights(module)
        ours, theirs = module.state_dict(), twin.state_dict()
        if n <= size or ours.keys() != theirs.keys():
            continue
        if all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours):
            best, size = name, n
    return best


class SharedEncoderScorers:
    """Several ``hf`` scorers run as one: where their classifiers share an encoder (equal weights,
    same tokenizer), the encoder runs once per batch and each scorer adds only its own head.

    The first scorer runs in full while a forward hook keeps its shared module's output; in every
    other scorer that module is replaced by a replay of the kept output (and its weights dropped).
    Naive equivalent: each scorer on its own (tests/test_score.py holds them equal).
    """

    def __init__(self, scorers: list[HFClassifierScorer]):
        self.scorers = scorers
        leader = scorers[0].model
        for follower in scorers[1:]:
            name = shared_trunk(leader, follower.model)
            replay = _Replay()
            leader.get_submodule(name).register_forward_hook(
                lambda module, args, output, replay=replay: setattr(replay, "value", output))
            follower.model.set_submodule(name, replay)

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str]) -> list[list[float]]:
        return [scorer(prompts, responses) for scorer in self.scorers]


def share_encoders(scorers: list) -> list:
    """The scorers with every group of ``hf`` classifiers that share an encoder made one
    :class:`SharedEncoderScorers` (at the place of its first member); the others unchanged."""
    groups: list[list] = []
    for fn in scorers:
        group = next((g for g in groups if can_share(g[0], fn)), None)
        if group is None:
            groups.append([fn])
        else:
            group.append(fn)
    return [SharedEncoderScorers(g) if len(g) > 1 else g[0] for g in groups]


def can_share(leader, fn) -> bool:
    """Two ``hf`` scorers with the same input settings, the same vocabulary and a shared trunk."""
    if not (isinstance(leader, HFClassifierScorer) and isinstance(fn, HFClassifierScorer)):
        return False
    same_input = (leader.hf_input, leader.template, leader.max_length) == (fn.hf_input, fn.template, fn.max_length)
    return (same_input and leader.tokenizer.get_vocab() == fn.tokenizer.get_vocab()
            and shared_trunk(leader.model, fn.model) is not None)


def same_architecture(dir_a: str | Path, dir_b: str | Path) -> bool:
    """Cheap pre-check before loading two ``hf`` scorers side by side: equal ``config.json`` apart
    from the label names and the model's own path."""
    ignore = {"id2label", "label2id", "_name_or_path", "transformers_version"}

    def config(d):
        path = _model_dir(str(d)) / "config.json"
        return {k: v for k, v in json.loads(path.read_text()).items() if k not in ignore}

    return config(dir_a) == config(dir_b)


class BeaverScorer:
    """Safe-RLHF score model: end score = score_head(h_last), h_last = LLaMA hidden state at the
    last non-pad token of ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}<eos>``
    (no eos for a response cut by ``max_new_tokens``: it never ended)."""

    reads_truncated = True

    def __init__(self, target: str, device: str = "auto", dtype: str = "auto", max_length: int = 1024,
                 append_eos: bool = True, trust_remote_code: bool = False):
        from transformers import LlamaModel
        from transformers.utils import logging as hf_logging

        model_dir = _model_dir(target)
        self.device = resolve_device(device)
        torch_dtype = _torch_dtype(dtype, self.device)
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # score_head.* and normalizer.* are expected leftovers
        try:
            # the checkpoint's ``model.*`` keys are LlamaModel's (base_model_prefix "model")
            backbone, info = LlamaModel.from_pretrained(str(model_dir), dtype=torch_dtype,
                                                        output_loading_info=True)
        except Exception as e:  # noqa: BLE001 - any failure to read a model's files is one line naming it
            raise load_error("beaver scorer", target, e) from None
        finally:
            hf_logging.set_verbosity(verbosity)
        if info["missing_keys"]:
            raise InputError(f"beaver scorer '{target}': weights lack {sorted(info['missing_keys'])[0]} "
                             f"({len(info['missing_keys'])} backbone tensors missing)")
        extra = _read_tensors(model_dir, ("score_head.", "normalizer."))
        if "score_head.weight" not in extra:
            raise InputError(f"beaver scorer '{target}': no score_head.weight in the weights "
                             "(not a Safe-RLHF score model)")
        weight = extra["score_head.weight"]
        self.head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias="score_head.bias" in extra)
        self.head.load_state_dict({k.removeprefix("score_head."): v for k, v in extra.items()
                                   if k.startswith("score_head.")})
        self.head = self.head.to(self.device, torch_dtype)
        self.normalize = _beaver_normalizer(backbone.config, extra)
        self.model = backbone.to(self.device).eval()
        self.tokenizer = load_tokenizer(str(model_dir), trust_remote_code=trust_remote_code)
        self.max_length, self.append_eos = max_length, append_eos

    @timed("score forward")
    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str],
                 truncated: list[bool] | None = None) -> list[float]:
        tok = self.tokenizer
        rows = []
        for p, r, cut in zip(prompts, responses, truncated or [False] * len(prompts), strict=True):
            ids = tok(format_prompt(p, "beaver") + r)["input_ids"]
            if self.append_eos and not cut and tok.eos_token_id is not None:
                ids = ids + [tok.eos_token_id]
            rows.append(ids[: self.max_length])
        width = max(len(x) for x in rows)
        input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            attention[i, : len(ids)] = 1
        hidden = self.model(input_ids=input_ids.to(self.device),
                            attention_mask=attention.to(self.device)).last_hidden_state
        end = attention.sum(-1).to(self.device) - 1
        end_hidden = hidden[torch.arange(len(rows), device=self.device), end]
        scores = self.normalize(self.head(end_hidden).float())
        return scores[:, 0].cpu().tolist()


def _read_tensors(model_dir: Path, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors whose names start with ``prefixes``, from safetensors (else pytorch_model*.bin)."""
    out: dict[str, torch.Tensor] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                out.update({k: fh.get_tensor(k) for k in fh.keys() if k.startswith(prefixes)})
        return out
    for f in sorted(model_dir.glob("pytorch_model*.bin")):
        try:
            state = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001 - a refused pickle or a damaged file: one line
            raise load_error("beaver scorer weights", str(f), e) from None
        out.update({k: v for k, v in state.items() if k.startswith(prefixes)})
    return out


def _beaver_normalizer(config, extra: dict[str, torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Safe-RLHF's ``Normalizer.normalize`` when ``do_normalize`` is set: reward models are affine
    (x − μ)/(σ + 1e-8), cost models scale x/(σ + 1e-8), critics identity; else the raw score."""
    if not getattr(config, "do_normalize", False):
        return lambda x: x
    mean = torch.as_tensor(getattr(config, "mean", None) or extra.get("normalizer.mean", 0.0), dtype=torch.float32)
    var = torch.as_tensor(getattr(config, "var", None) or extra.get("normalizer.var", 1.0), dtype=torch.float32)
    std = var.sqrt() + 1e-8
    kind = getattr(config, "score_type", "reward")
    if kind == "reward":
        return lambda x: (x - mean.to(x.device)) / std.to(x.device)
    if kind == "cost":
        return lambda x: x / std.to(x.device)
    return lambda x: x


class LogProbScorer:
    """log π(y|x) of a causal LM, tokenized as the sample stage does (``tokenize_pairs``, no cut)."""

    reads_truncated = True

    def __init__(self, target: str, device: str = "auto", dtype: str = "auto", template: str = "auto",
                 revision: str | None = None, trust_remote_code: bool = False):
        self.device = resolve_device(device)
        self.tokenizer = load_tokenizer(target, revision=revision, trust_remote_code=trust_remote_code)
        self.model = load_causal_lm(target, revision=revision, dtype=dtype, device=self.device,
                                    trust_remote_code=trust_remote_code).eval()
        self.template = template

    @torch.inference_mode()
    def __call__(self, prompts: list[str], responses: list[str],
                 truncated: list[bool] | None = None) -> list[float]:
        texts = [format_prompt(p, self.template, self.tokenizer) for p in prompts]
        enc = tokenize_pairs(self.tokenizer, texts, responses, truncated=truncated)
        batch = {k: v.to(self.device) for k, v in enc.items()}
        return sequence_logprobs(self.model, **batch).float().cpu().tolist()


def implicit_reward(policy_logps: np.ndarray, ref_logps: np.ndarray, beta: float) -> np.ndarray:
    """h(x, y) = β·(log π(y|x) − log π_ref(y|x)), the DPO implicit reward (up to a per-prompt β·log Z(x))."""
    return beta * (np.asarray(policy_logps, dtype=float) - np.asarray(ref_logps, dtype=float))


def implicit_beta(spec: ScorerSpec) -> float:
    """β of an implicit scorer: declared, else the policy's training β (``dualign_train.yaml``), else 0.1."""
    if spec.beta is not None:
        return spec.beta
    recorded = Path(spec.target) / "dualign_train.yaml"
    if recorded.exists():
        beta = load_yaml(recorded).get("beta")
        if isinstance(beta, int | float) and beta > 0:
            return float(beta)
    return 0.1


def load_callable(target: str) -> ScoreFn:
    """``module:function`` or ``path/to/file.py:function``: the user's own code (configs are code).
    An exception it raises becomes one line naming it."""
    module_name, colon, func_name = target.rpartition(":")
    if not colon or not module_name or not func_name:
        raise InputError(f"callable scorer {target!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if module_name.endswith(".py"):
            if not Path(module_name).exists():
                raise InputError(f"callable scorer {target!r}: file {module_name} not found")
            spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
        fn = getattr(module, func_name)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's module failed to import: one line
        raise InputError(f"callable scorer {target!r} cannot be imported: {type(e).__name__}: {first_line(e)}") from None
    if not callable(fn):
        raise InputError(f"callable scorer {target!r} is not callable")

    def guarded(prompts: list[str], responses: list[str]) -> Sequence[float]:
        try:
            return fn(prompts, responses)
        except DualignError:
            raise
        except Exception as e:  # noqa: BLE001 - the user's scorer failed: one line naming it
            raise InputError(f"callable scorer {target!r} raised {type(e).__name__}: {first_line(e)}") from None

    return guarded


@timed("model load")
def load_scorer(spec: ScorerSpec, *, device: str = "auto", dtype: str = "auto", max_length: int = 1024,
                hf_input: str = "pair", template: str = "auto", append_eos: bool = True,
                trust_remote_code: bool = False) -> ScoreFn:
    """The scorer of ``spec``. Model code shipped with a model runs only with ``trust_remote_code``;
    a ``callable:`` scorer is the user's own code and runs as asked."""
    if spec.kind == "hf":
        return HFClassifierScorer(spec.target, device, dtype, max_length, hf_input, template, trust_remote_code)
    if spec.kind == "beaver":
        return BeaverScorer(spec.target, device, dtype, max_length, append_eos, trust_remote_code)
    if spec.kind == "implicit":  # log π(y|x) only: _run_scorer turns it into β·(log π − log π_ref)
        return LogProbScorer(spec.target, device, dtype, template, trust_remote_code=trust_remote_code)
    return load_callable(spec.target)


def score_column(fn: ScoreFn, name: str, prompts: list[str], responses: list[str], batch_size: int = 16,
                 progress: bool = True, truncated: list[bool] | None = None, dp: Ranks | None = None) -> np.ndarray:
    """``fn`` on every (prompt, response), in batches of similar length; every score must be finite.

    Scorers that read the eos (``reads_truncated``: Beaver's end score, log π) are told which
    responses were cut by ``max_new_tokens``. Errors name the scorer and the 0-based row of the table.
    """
    eos_aware = truncated is not None and getattr(fn, "reads_truncated", False)
    return score_columns(lambda p, r, **cut: [fn(p, r, **cut)], [name], prompts, responses, batch_size,
                         progress, truncated if eos_aware else None, dp)[name]


def score_columns(fn, names: list[str], prompts: list[str], responses: list[str], batch_size: int = 16,
                  progress: bool = True, truncated: list[bool] | None = None,
                  dp: Ranks | None = None) -> dict[str, np.ndarray]:
    """One column per name from ``fn(prompts, responses) -> [scores of names[0], scores of names[1], ...]``
    (a :class:`SharedEncoderScorers`), batched by length as :func:`score_column`; with ``truncated``,
    ``fn`` also gets each batch's flags (``truncated=``).

    With ``dp`` (the score stage under ``torchrun`` / ``accelerate launch``) the batches are dealt to
    the processes in turn (batch j to process j mod n) and summed back (:meth:`dualign._infra.distributed.Ranks.sum`): each row is
    scored by one process in the very batch one process would have scored it in, so every process
    gets the whole column, equal to a single process's.
    """
    n, dp = len(prompts), dp or Ranks()
    order = np.argsort([len(p) + len(r) for p, r in zip(prompts, responses, strict=True)], kind="stable")
    out = {name: np.zeros(n, dtype=float) for name in names}
    batches = [order[start: start + batch_size] for start in range(0, n, batch_size)]
    mine = [batches[j] for j in dp.mine(len(batches))]
    with Progress(total=sum(map(len, mine)), desc=f"score {', '.join(names)}", unit="responses",
                  enabled=progress and dp.main) as bar:
        for idx in mine:
            batch = ([prompts[i] for i in idx], [responses[i] for i in idx])
            cut = {} if truncated is None else {"truncated": [truncated[i] for i in idx]}
            for name, values in zip(names, fn(*batch, **cut), strict=True):
                out[name][idx] = _batch_scores(values, name, idx)
            bar.update(len(idx))
    out = {name: dp.sum(column) for name, column in out.items()}
    for name, column in out.items():
        bad = np.flatnonzero(~np.isfinite(column))
        if bad.size:
            raise InputError(f"scorer '{name}': score {column[bad[0]]} at row {bad[0]} is not finite "
                             f"({bad.size} non-finite rows)")
    return out


def _batch_scores(values, name: str, idx: np.ndarray) -> np.ndarray:
    try:
        values = np.asarray(list(values), dtype=float)
    except (TypeError, ValueError):
        raise InputError(f"scorer '{name}': returned non-numeric scores for the batch with row {idx[0]}") from None
    if values.shape != (len(idx),):
        raise InputError(f"scorer '{name}': returned {values.size} scores for a batch of "
                         f"{len(idx)} responses (the batch with row {idx[0]})")
    return values
