"""Loading Hugging Face models and computing sequence log-probabilities.

Every stage that needs log π(y|x) uses :func:`tokenize_pairs` + :func:`sequence_logprobs`, so the
reference log-probs stored by ``sample`` are exactly those ``train`` would compute.
Token convention: ``ids = tok(prompt_text, add_special_tokens=True) + tok(response, add_special_tokens=False) + [eos]``;
the response mask covers the response tokens and the final eos. A response cut off by
``max_new_tokens`` (``truncated`` in the samples table) never sampled an eos, so it gets none. :func:`disable_dropout` and
:func:`save_model` are the training utilities every trainer shares.

transformers is imported inside the loaders: its import costs a second that importing this
module (e.g. for ``dualign train --help``) should not pay.
"""

from __future__ import annotations

import inspect
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from dualign._infra.errors import ConfigError, InputError, first_line
from dualign._infra.io import honour_umask, is_model_dir
from dualign._infra.timing import timed


def resolve_device(device: str | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_model_ref(name_or_path: str | Path) -> None:
    """Fail early, in one line, on a local path that is missing or not a model directory.

    Anything that is not an existing path and looks like a Hub id (``name`` or ``org/name``)
    is left to ``from_pretrained``.
    """
    name_or_path = str(name_or_path)
    p = Path(name_or_path).expanduser()
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if not p.exists():
        if looks_local:
            raise InputError(f"model path '{name_or_path}' does not exist")
        return
    if p.is_dir() and not is_model_dir(p):
        raise InputError(f"model path '{name_or_path}' has no config.json (not a Hugging Face model directory)")


def load_error(what: str, name: str, e: BaseException) -> InputError:
    """One line for a model that cannot be loaded: a missing or refused file (a pickle that
    ``weights_only`` rejects), or code it ships that dualign will not run without the opt-in."""
    if "trust_remote_code" in str(e):
        return InputError(f"{what} '{name}' ships its own Python code (auto_map); dualign runs it only "
                          "with trust_remote_code: true (--trust-remote-code)")
    return InputError(f"{what} '{name}' could not be loaded: {first_line(e)}")


@timed("model load")
def load_tokenizer(name_or_path: str, revision: str | None = None, padding_side: str = "right",
                   trust_remote_code: bool = False):
    """AutoTokenizer with a pad token (falls back to eos) and the requested padding side."""
    from transformers import AutoTokenizer

    _check_model_ref(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(str(name_or_path), revision=revision,
                                            trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure to read a model's files is one line naming it
        raise load_error("tokenizer", name_or_path, e) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


@timed("model load")
def load_causal_lm(name_or_path: str, revision: str | None = None, dtype: str = "auto",
                   device: str | torch.device | None = None, trust_remote_code: bool = False,
                   load_in_4bit: bool = False):
    """AutoModelForCausalLM from a Hub id or a local directory, on ``device``.

    ``dtype='auto'`` gives bfloat16 on a GPU and float32 on the CPU. Code shipped with the model
    runs only with ``trust_remote_code=True``; otherwise such a model is refused (never a prompt).
    ``load_in_4bit``: the linear layers in bitsandbytes' 4-bit NF4 with bf16 compute (QLoRA),
    on a CUDA device only (:func:`check_4bit`).
    """
    from transformers import AutoModelForCausalLM

    _check_model_ref(name_or_path)
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    quantized = {}
    if load_in_4bit:
        check_4bit(device)
        from transformers import BitsAndBytesConfig

        quantized = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16),
            "device_map": {"": device}}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), revision=revision, dtype=torch_dtype,
                                                     trust_remote_code=trust_remote_code, **quantized)
    except Exception as e:  # noqa: BLE001 - any failure to read a model's files is one line naming it
        raise load_error("model", name_or_path, e) from None
    return model if load_in_4bit else model.to(device)


def check_4bit(device: torch.device) -> None:
    """4-bit weights need bitsandbytes and a CUDA device: refuse in one line before loading anything."""
    if device.type != "cuda":
        raise ConfigError(f"config key 'load_in_4bit': 4-bit (QLoRA) weights need a CUDA GPU; this run is on "
                          f"{device.type}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ConfigError("config key 'load_in_4bit': 4-bit (QLoRA) weights need bitsandbytes "
                          "(pip install bitsandbytes)") from None


@timed("tokenize")
def tokenize_pairs(tokenizer, prompt_texts: list[str], responses: list[str],
                   max_length: int | None = None,
                   truncated: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``response_mask`` for (prompt, response) pairs.

    ``prompt_texts`` are already templated. Each response ends with eos unless ``truncated`` says
    it was cut by ``max_new_tokens`` (no eos was sampled). Over-long sequences are cut from the end
    of the response (the prompt is kept whole).
    """
    eos = tokenizer.eos_token_id
    truncated = [False] * len(responses) if truncated is None else list(truncated)
    rows, masks = [], []
    for p, r, cut in zip(prompt_texts, responses, truncated, strict=True):
        p_ids = tokenizer(p, add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(r, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None and not cut else [])
        if max_length is not None and len(p_ids) + len(r_ids) > max_length:
            r_ids = r_ids[: max(1, max_length - len(p_ids))]
        rows.append(p_ids + r_ids)
        masks.append([0] * len(p_ids) + [1] * len(r_ids))
    width = max(len(x) for x in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    response_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, m) in enumerate(zip(rows, masks, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        response_mask[i, : len(m)] = torch.tensor(m)
    return {"input_ids": input_ids, "attention_mask": attention, "response_mask": response_mask}


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_t | x_<t) for t ≥ 1: logits [B, T, V], ids [B, T] -> [B, T-1] (float32).

    Computed as logit(x_t) − logsumexp(logits), which never materialises the [B, T, V] log-softmax
    (the naive equivalent, ``log_softmax(logits).gather(x_t)``; tests/test_models.py holds them equal).
    """
    logits = logits[:, :-1].float()
    picked = torch.gather(logits, 2, input_ids[:, 1:, None]).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (run the output layer on the last k positions only)."""
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@timed("forward (log-probs)")
def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      response_mask: torch.Tensor) -> torch.Tensor:
    """log π(y|x) = Σ_{t in response} log π(y_t | x, y_<t), one value per row [B] (float32).

    Right-padded rows of mixed lengths run in groups of similar length (:func:`length_groups`),
    each trimmed to its longest row: in a batch of short and long responses padding is otherwise a
    third of the work. The output layer runs only from the first position that predicts a response
    token (the model's ``logits_to_keep``, where it has one): prompt positions carry no log-prob,
    and with a small model the vocabulary projection is most of the work. The result equals one
    padded forward over the whole batch up to float rounding (tests/test_models.py).
    """
    lengths = attention_mask.sum(1)
    width = int(lengths.max()) if len(lengths) else input_ids.shape[1]
    right_padded = torch.arange(width, device=lengths.device) < lengths[:, None]  # each row's ones, then zeros
    if not torch.equal(attention_mask[:, :width].bool(), right_padded):
        return _padded_logprobs(model, input_ids, attention_mask, response_mask)
    groups = length_groups(lengths.cpu())
    if len(groups) == 1:
        return _padded_logprobs(model, input_ids[:, :width], attention_mask[:, :width], response_mask[:, :width])
    parts = []
    for rows in groups:
        w = int(lengths[rows].max())
        rows = rows.to(input_ids.device)
        parts.append(_padded_logprobs(model, input_ids[rows, :w], attention_mask[rows, :w], response_mask[rows, :w]))
    order = torch.cat(groups).to(input_ids.device)
    return torch.cat(parts)[torch.argsort(order)]


def length_groups(lengths: torch.Tensor, min_rows: int = 16, max_groups: int = 4) -> list[torch.Tensor]:
    """Row indices sorted by length and cut into k = min(max_groups, ⌊B / min_rows⌋) (at least 1)
    groups of near-equal count: each group keeps at least ``min_rows`` rows, so its matrix products
    stay large enough to run at full speed, while its padding shrinks to its own length spread."""
    k = max(1, min(max_groups, len(lengths) // min_rows))
    if k == 1:
        return [torch.arange(len(lengths))]
    return list(torch.tensor_split(torch.argsort(lengths, stable=True), k))


def _padded_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     response_mask: torch.Tensor) -> torch.Tensor:
    width = input_ids.shape[1]
    first = int(response_mask.float().argmax(dim=1).min()) if response_mask.any() else width - 1
    keep = width - max(first - 1, 0)
    if keep < width and accepts_logits_to_keep(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
        ids, mask = input_ids[:, width - keep:], response_mask[:, width - keep:]
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        ids, mask = input_ids, response_mask
    lp = token_logprobs(logits, ids)
    return (lp * mask[:, 1:].to(lp.dtype)).sum(-1)


def stop_ids(generation_config, tokenizer) -> list[int]:
    """The tokenizer's eos plus any extra stop ids of the model's generation config (chat models)."""
    ids = getattr(generation_config, "eos_token_id", None)
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.insert(0, tokenizer.eos_token_id)
    if not ids:
        raise InputError("the tokenizer has no eos token, so responses could not stop")
    return ids


def disable_dropout(model) -> None:
    """p = 0 in every dropout module: a policy trained against π_ref must equal it at step 0, and
    its implicit rewards (and PPO's ratio) must not be noisy (TRL does the same)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def save_model(model, tokenizer, out_dir: str | Path, files: dict[str, str],
               state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A Hugging Face model directory: ``model``, ``tokenizer`` and text ``files`` (name → content),
    written to a temporary sibling and renamed over ``out_dir`` (nothing half-written); every file
    gets the umask's mode (transformers writes weight shards through 0600 temporary files).
    ``state_dict``: the full weights when ``model``'s own are sharded (FSDP, DeepSpeed)."""
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(tmp)
    for name, text in files.items():
        (tmp / name).write_text(text)
    honour_umask(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
