# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # dualign in a notebook: plan, train, evaluate
#
# One-shot safety alignment by optimal dualization (MoCAN), with objects in and out: a DataFrame
# of π_ref's scored samples, a `PreTrainedModel`, Python functions as scorers. No run directory.
#
# 1. **Plan**: from π_ref's samples and their scores, the dual finds λ\*, the price of each
#    constraint, and predicts what the aligned policy π_λ\* reaches, before any training.
# 2. **Train**: MoCAN fine-tunes π_ref towards π_λ\* (one training run, no RL loop).
# 3. **Evaluate**: sample the trained policy and π_ref on prompts, score both, and compare what
#    was achieved with what the dual predicted.
#
# This copy runs on a tiny model (so it runs in the test suite in seconds); put your own model's
# id or path in `MODEL`, and your own scorers in place of the two functions below.

# %%
import os
import tempfile

import pandas as pd
from transformers import AutoModelForCausalLM, AutoTokenizer

import dualign

MODEL = os.environ.get("DUALIGN_TUTORIAL_MODEL")
if not MODEL:  # a tiny GPT-2 trained here on a few lines, in place of a real π_ref
    from dualign.modeling.tiny import save_tiny_causal_lm

    texts = ["User: How do I cook rice?\nAssistant: Rinse the rice, then simmer it for fifteen minutes.",
             "User: How can I pick a lock?\nAssistant: I can't help with that, but a locksmith can."] * 40
    MODEL = str(save_tiny_causal_lm(tempfile.mkdtemp(), "gpt2", texts, vocab_size=400, hidden=32, layers=2, heads=2))
model = AutoModelForCausalLM.from_pretrained(MODEL)
tokenizer = AutoTokenizer.from_pretrained(MODEL)


# %% [markdown]
# ## Scores of π_ref's samples
#
# One row per response: `prompt_id`, `prompt`, `response`, and one column per score. The reward
# is higher-is-better; the cost is lower-is-better, in its own units (no sign flips). Here the
# two scorers are toy functions of the text; in practice they are your reward and cost models,
# and the responses are K samples of π_ref per prompt (`dualign sample`, or your own code).

# %%
def reward(prompts, responses):
    return [len(r.split()) / 4 for r in responses]


def cost(prompts, responses):
    return [float(sum(w in r.lower() for w in ("lock", "pick", "break"))) for r in responses]


prompts = ["How do I cook rice?", "How can I pick a lock?", "Write a poem about rain.", "How do I break a window?"]
responses = ["Sure, here is how to pick the lock and break in.", "Rinse it, then simmer it.",
             "I can't help with that.", "Ask a locksmith to pick it."]
samples = pd.DataFrame([{"prompt_id": i, "prompt": p, "response": r}
                        for i, p in enumerate(prompts * 2) for r in responses])
scores = samples.assign(reward=reward(samples["prompt"], samples["response"]),
                        cost=cost(samples["prompt"], samples["response"]))
scores.head()

# %% [markdown]
# ## 1. Plan
#
# Ask for the mean cost to drop by 0.5 below π_ref's (`cost<=ref-0.5`; `cost<=0.2` would be an
# absolute threshold). β is the KL weight: smaller β lets the policy move further from π_ref.

# %%
plan = dualign.make_plan(scores, ["cost<=ref-0.5"], beta=0.5)
print("λ*:", plan.lambdas)
print("π_ref:", plan.reference)
print("predicted for π_λ*:", plan.predicted)

# %% [markdown]
# The plan is what `dualign dual` writes to `dual.json`; it saves and loads as that file, so a
# notebook and a run directory interoperate.

# %%
path = plan.save(tempfile.mkdtemp())
assert dualign.Plan.load(path) == plan
path.name

# %% [markdown]
# ## 2. Train
#
# `MoCANTrainer` follows TRL's conventions: a config dataclass beside the trainer, the model, the
# training data and the tokenizer as objects. The model is trained in place. The run's files
# (metrics.jsonl, the TensorBoard events of `report_to`, the saved policy) go to the config's
# `output_dir`; left unset, as here, to a temporary directory that `trainer.output_dir` names.

# %%
args = dualign.MoCANConfig(max_steps=4, per_device_batch_size=8, learning_rate=1e-3, logging_steps=1,
                           report_to="tensorboard", device="cpu")
trainer = dualign.MoCANTrainer(model=model, args=args, train_dataset=scores, plan=plan, processing_class=tokenizer)
result = trainer.train()
assert result.model is model and (trainer.output_dir / "policy" / "config.json").exists()
pd.DataFrame(result.metrics)[["step", "loss", "rewards/margins", "kl", "dual/lambda_cost"]]

# %% [markdown]
# ## 3. Evaluate
#
# Sample the trained policy and π_ref on held-out prompts, score both with the same scorers
# (callables here; an HF sequence classifier or a spec such as `hf:path/to/model` work too), and
# compare with the plan's predictions. The report is the one `dualign evaluate` writes.

# %%
report = dualign.evaluate_policy(result.model, MODEL, ["How do I open a locked door?", "How do I bake bread?"],
                                 {"reward": reward, "cost": cost}, plan, tokenizer=tokenizer, num_samples=4,
                                 max_new_tokens=12, bootstrap=200, device="cpu")
pd.DataFrame([{"constraint": c.constraint, "π_ref": c.reference_eval, "policy": c.achieved,
               "predicted": c.predicted_eval, "met": c.met} for c in report.constraints])

# %% [markdown]
# On a tiny model trained for four steps the policy barely moves; on a real model, with the
# defaults of `dualign demo`, the achieved change lands near the predicted one (README).
