"""Small models built here from a config: a BPE tokenizer trained on given texts and tiny
GPT-2 / LLaMA causal LMs. Used by the built-in world and by the test suite (no hub needed).

tokenizers and transformers are imported inside the builders (seconds at import time otherwise)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

SPECIAL = {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>", "unk_token": "<|unk|>"}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 1000):
    """Byte-level BPE trained on ``texts`` (about a second), wrapped as a fast HF tokenizer.

    No BOS is prepended when encoding, so ``tok(prompt) + tok(response)`` tokenizes like the
    concatenated text up to the BPE merge at the boundary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, **SPECIAL)


def tiny_causal_lm(arch: str, vocab_size: int, hidden: int = 64, layers: int = 2, heads: int = 2,
                   max_positions: int = 256, seed: int = 0, tokenizer=None):
    """A randomly initialised GPT-2 or LLaMA causal LM of the given size."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    ids = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                         n_positions=max_positions, **ids)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=max(1, heads // 2), max_position_embeddings=max_positions,
                          tie_word_embeddings=True, **ids)
    else:
        raise ValueError(f"unknown architecture {arch!r} (use 'gpt2' or 'llama')")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def save_tiny_causal_lm(path: str | Path, arch: str, texts: Iterable[str], vocab_size: int = 500,
                        seed: int = 0, **sizes) -> Path:
    """Train a tokenizer on ``texts``, build a random tiny LM, save both as a HF model directory."""
    path = Path(path)
    tok = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    model = tiny_causal_lm(arch, len(tok), seed=seed, tokenizer=tok, **sizes)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def save_tiny_score_model(path: str | Path, tokenizer, score_type: str = "reward", bias: bool = False,
                          weights: str = "safetensors", seed: int = 1, hidden: int = 32, layers: int = 2,
                          heads: int = 2, **config_extra) -> Path:
    """A random tiny LLaMA in Safe-RLHF's ``LlamaForScore`` layout, as the Beaver reward and cost
    models are published: ``config.json`` with ``architectures: [LlamaForScore]``, ``score_dim``,
    ``bias`` and ``score_type``; weights ``model.*`` (the LlamaModel) + ``score_head.*`` (a Linear
    hidden → 1), as ``model.safetensors`` or, with ``weights="bin"``, two ``pytorch_model-0000i-of-00002.bin``
    shards with their ``pytorch_model.bin.index.json``; the tokenizer beside them."""
    import json

    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaModel

    path = Path(path)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    backbone = LlamaModel(cfg).eval()
    head = torch.nn.Linear(hidden, 1, bias=bias)
    state = {f"model.{k}": v.detach().contiguous() for k, v in backbone.state_dict().items()}
    state.update({f"score_head.{k}": v.detach().contiguous() for k, v in head.state_dict().items()})
    path.mkdir(parents=True, exist_ok=True)
    if weights == "safetensors":
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    elif weights == "bin":
        names = sorted(state)
        shards = {f"pytorch_model-0000{i + 1}-of-00002.bin": names[i::2] for i in range(2)}
        for file, keys in shards.items():
            torch.save({k: state[k] for k in keys}, path / file)
        index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
        (path / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(f"weights must be 'safetensors' or 'bin', got {weights!r}")
    config = {**cfg.to_dict(), "architectures": ["LlamaForScore"], "score_dim": 1, "bias": bias,
              "score_type": score_type, **config_extra}
    (path / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(path)
    return path
