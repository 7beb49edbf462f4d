"""What a run will cost before it starts: tokens, FLOPs, GPU-hours and resident memory of each stage,
for MoCAN and for a primal-dual RL baseline at a stated budget (``dualign compute``).

Token counts follow the pipeline's own accounting (:mod:`dualign.modeling.flops`): a sequence of P prompt
and R response tokens costs 2·N·(P + R) FLOPs forward and 6·N·(P + R) forward + backward.

MoCAN (N_d dual prompts × K samples, E epochs, evaluation on N_e prompts × k_e responses):

    generation  N_d·K·(P + R)          through π_ref        (sample)
    scored      N_d·K·(P + R)          through each scorer  (score)
    reference   N_d·K·(P + R)          through π_ref        (log π_ref, once)
    training    E·N_d·K·(P + R)        forward + backward   (grouped batches: each response once an epoch)
    evaluation  N_e·k_e·(P + R)        generation + each scorer (the policy; π_ref's is cached)

Primal-dual RL (PPO- or GRPO-Lagrangian, critic-free as ``dualign compare`` runs them), T iterations
of B prompts × S rollouts, U update epochs:

    generation  T·B·S·(P + R)          every iteration samples the current policy
    scored      T·B·S·(P + R)          through each scorer
    reference   T·B·S·(P + R)          log π_ref of the rollouts (the KL penalty)
    training    T·B·S·(P + R)·(U·6 + 2)/6 in forward + backward units (log π_old, then U updates)

Seconds come from FLOPs over an achieved throughput per stage: by default a stated fraction of an
H100's dense bf16 peak (:data:`dualign.modeling.flops.UTILISATION`; an assumption, printed as one), or the
FLOP/s a GPU check measured (``--throughputs``). Memory counts weights and optimizer state of the
models held at once (:func:`dualign.modeling.flops.resident_memory_gb`), not activations or KV cache.

:func:`literature_runs` gives the token counts of the published recipes, each figure with its
source (:data:`SAFE_RLHF_PPO_LAG`: Safe-RLHF's critic-ful PPO-Lagrangian, two critics included;
:data:`MOCAN_RECIPE`: the paper's MoCAN), for a 7B projection at the iteration counts those runs use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from dualign._infra.errors import InputError
from dualign._infra.io import read_json
from dualign._infra.text_table import text_table
from dualign.modeling.flops import (
    BYTES_FROZEN,
    BYTES_TRAINED,
    H100_BF16_FLOPS,
    STAGES,
    UTILISATION,
    forward_flops,
    model_forward_params,
)
from dualign.modeling.flops import stage_flops as pipeline_stage_flops


@dataclass
class ComputePlanConfig:
    """``dualign compute``: the cost of a MoCAN run and of a primal-dual baseline, before starting."""

    policy: str | None = field(default=None, metadata={
        "help": "π_ref: HF model id or local path; its parameter count is read from its config (no weights)"})
    policy_params: float | None = field(default=None, metadata={
        "help": "π_ref's parameters, e.g. 7e9 (instead of --policy)"})
    scorer_params: float | None = field(default=None, metadata={
        "help": "parameters of each reward/cost model (default: the policy's)"})
    scorers: int = field(default=2, metadata={"help": "reward and cost models scoring every response"})
    prompt_tokens: float = field(default=64, metadata={"help": "mean prompt length, tokens (template included)"})
    response_tokens: float = field(default=256, metadata={"help": "mean response length, tokens"})
    prompts: int = field(default=1000, metadata={"help": "MoCAN: dual prompts N_d"})
    samples: int = field(default=128, metadata={"help": "MoCAN: responses per dual prompt K"})
    epochs: int = field(default=2, metadata={"help": "MoCAN: training epochs E over the N_d·K responses"})
    eval_prompts: int = field(default=500, metadata={"help": "held-out evaluation prompts (0: none)"})
    eval_samples: int = field(default=2, metadata={"help": "evaluation responses per prompt"})
    rl_iterations: int = field(default=1000, metadata={"help": "primal-dual RL: iterations T"})
    rl_prompts: int = field(default=64, metadata={"help": "primal-dual RL: prompts per iteration B"})
    rl_samples: int = field(default=4, metadata={"help": "primal-dual RL: rollouts per prompt S"})
    rl_epochs: int = field(default=2, metadata={"help": "primal-dual RL: update epochs U per rollout batch"})
    throughputs: str | None = field(default=None, metadata={
        "help": "JSON {stage: achieved FLOP/s} measured on your GPU (stages: generation, scoring, reference, "
                "training); default: an H100 at an assumed utilisation per stage"})

    def __post_init__(self) -> None:
        for name in ("prompts", "samples", "epochs", "rl_iterations", "rl_prompts", "rl_samples", "rl_epochs",
                     "scorers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        for name in ("eval_prompts", "eval_samples"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be ≥ 0, got {getattr(self, name)}")
        for name in ("prompt_tokens", "response_tokens", "policy_params", "scorer_params"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        if (self.policy is None) == (self.policy_params is None):
            raise ValueError("give the policy's size: --policy MODEL (id or path) or --policy-params N, one of them")


def mocan_tokens(cfg: ComputePlanConfig) -> dict[str, float]:
    """Tokens through each stage of a MoCAN run (module docstring's table); ``evaluation`` counts the
    policy's generated sequences, scored by every scorer."""
    seq = cfg.prompt_tokens + cfg.response_tokens
    n = cfg.prompts * cfg.samples * seq
    return {"generation": n, "scored": n, "reference": n, "training": cfg.epochs * n,
            "evaluation": cfg.eval_prompts * cfg.eval_samples * seq}


def rl_tokens(cfg: ComputePlanConfig) -> dict[str, float]:
    """Tokens through each stage of T primal-dual RL iterations; ``training`` counts forward+backward
    sequences (U per rollout) and ``forward`` the log π_old pass (one per rollout)."""
    seq = cfg.prompt_tokens + cfg.response_tokens
    n = cfg.rl_iterations * cfg.rl_prompts * cfg.rl_samples * seq
    return {"generation": n, "scored": n, "reference": n, "training": cfg.rl_epochs * n, "forward": n,
            "evaluation": cfg.eval_prompts * cfg.eval_samples * seq}


def stage_flops(tokens: dict[str, float], policy: float, scorer: float, scorers: int) -> dict[str, float]:
    """FLOPs per stage as the pipeline counts them (:func:`dualign.modeling.flops.stage_flops`: generation,
    reference, forward 2·N·T; scoring 2·N_s·T per scorer; training 6·N·T), plus the evaluation:
    generation by the policy and every scorer, 2·(N + scorers·N_s)·T."""
    out = pipeline_stage_flops(tokens, policy, [scorer] * scorers)
    out["evaluation"] = forward_flops(policy + scorers * scorer, tokens["evaluation"])
    out["total"] += out["evaluation"]
    return out


def read_throughputs(path: str | Path | None) -> tuple[dict[str, float], str]:
    """Achieved FLOP/s per stage and where they come from: a measured JSON file, or the stated H100
    utilisation (peak × u_stage). Evaluation runs at the generation rate."""
    if path is None:
        rates = {s: H100_BF16_FLOPS * u for s, u in UTILISATION.items()}
        source = ("assumed: one H100 (989 TFLOP/s dense bf16) at "
                  + ", ".join(f"{int(100 * u)}% for {s}" for s, u in UTILISATION.items()))
    else:
        data = read_json(path)
        if not isinstance(data, dict):
            raise InputError(f"{path}: expected a JSON object {{stage: FLOP/s}}")
        rates = {}
        for stage in STAGES:
            value = data.get(stage)
            if not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
                raise InputError(f"{path}: key '{stage}' must be a positive number (achieved FLOP/s), got {value!r}")
            rates[stage] = float(value)
        source = f"measured: {path}"
    rates["evaluation"] = rates["generation"]
    return rates, source


def hours(flops: dict[str, float], rates: dict[str, float]) -> dict[str, float]:
    """GPU-hours per stage: C_stage / rate_stage / 3600, and their total."""
    out = {s: flops[s] / rates[s] / 3600 for s in (*STAGES, "evaluation")}
    out["total"] = sum(out.values())
    return out


def memory_gb(policy: float, scorer: float, scorers: int, method: str) -> float:
    """Peak resident weights + optimizer state, GB: MoCAN's largest stage holds one model at a time
    (training: the policy, 16 B/param; scoring: the scorers, 2 B/param); primal-dual RL holds the
    trained policy, π_ref and the scorers at once."""
    if method == "mocan":
        return max(BYTES_TRAINED * policy, BYTES_FROZEN * scorer * scorers) / 1e9
    return (BYTES_TRAINED * policy + BYTES_FROZEN * (policy + scorer * scorers)) / 1e9


def plan_compute(cfg: ComputePlanConfig) -> dict:
    """The two methods' tokens, FLOPs, GPU-hours and memory (a JSON-ready dict)."""
    if cfg.policy is not None:
        policy = model_forward_params(cfg.policy)
        if policy is None:
            raise InputError(f"could not read a parameter count from {cfg.policy!r} (a local path, or a Hub id "
                             "this machine can reach); give --policy-params instead")
    else:
        policy = float(cfg.policy_params)
    scorer = float(cfg.scorer_params) if cfg.scorer_params is not None else float(policy)
    rates, source = read_throughputs(cfg.throughputs)
    out = {"policy_params": float(policy), "scorer_params": scorer, "scorers": cfg.scorers,
           "throughputs_flop_per_s": rates, "throughput_source": source, "methods": {}}
    for method, tokens in (("mocan", mocan_tokens(cfg)), ("primal-dual RL", rl_tokens(cfg))):
        flops = stage_flops(tokens, policy, scorer, cfg.scorers)
        out["methods"][method] = {"tokens": tokens, "flops": flops, "gpu_hours": hours(flops, rates),
                                  "memory_gb": memory_gb(policy, scorer, cfg.scorers, method)}
    return out


def format_compute(plan: dict, cfg: ComputePlanConfig) -> str:
    """The table ``dualign compute`` prints: per method and stage, FLOPs and GPU-hours, then memory."""
    rows = []
    for method, m in plan["methods"].items():
        for stage in (*STAGES, "evaluation", "total"):
            rows.append([method if stage == "generation" else "", stage, f"{m['flops'][stage]:.3g}",
                         f"{m['gpu_hours'][stage]:.3g}"])
    mocan, rl = plan["methods"]["mocan"], plan["methods"]["primal-dual RL"]
    lines = [f"Policy {plan['policy_params'] / 1e9:.3g}B parameters, {plan['scorers']} scorers of "
             f"{plan['scorer_params'] / 1e9:.3g}B; sequences of {cfg.prompt_tokens:g} + {cfg.response_tokens:g} tokens.",
             f"MoCAN: {cfg.prompts} dual prompts × {cfg.samples} samples, {cfg.epochs} epochs. Primal-dual RL: "
             f"{cfg.rl_iterations} iterations × {cfg.rl_prompts} prompts × {cfg.rl_samples} rollouts, "
             f"{cfg.rl_epochs} update epochs. Evaluation: {cfg.eval_prompts} prompts × {cfg.eval_samples}.", ""]
    lines += text_table(["method", "stage", "FLOPs", "GPU-hours"], rows)
    lines += ["", f"Peak weights + optimizer state: MoCAN {mocan['memory_gb']:.0f} GB (one model at a time), "
              f"primal-dual RL {rl['memory_gb']:.0f} GB (policy trained, π_ref and scorers held).",
              f"GPU-hours: primal-dual RL / MoCAN = {rl['gpu_hours']['total'] / mocan['gpu_hours']['total']:.2g}×.",
              f"Throughputs {plan['throughput_source']}."]
    return "\n".join(lines)


# ------------------------------------------------------------------ the 7B projection's iteration counts

@dataclass(frozen=True)
class Sourced:
    """A figure from the literature and where it comes from."""
    value: float
    source: str


SAFE_RLHF = "PKU-Alignment/safe-rlhf scripts/ppo-lag.sh"
# Safe-RLHF's PPO-Lagrangian as its script runs it, one epoch over PKU-SafeRLHF's prompts. Their
# number: the PKU-SafeRLHF-prompt card's count of PKU-SafeRLHF's unique prompts (the dataset's 2024
# release; the 2023 release ppo-lag.sh first trained on is not counted there). The FLOPs of a
# PPO-Lagrangian run are linear in it: pass another count to :func:`literature_runs`.
PKU_SAFERLHF_PROMPTS = Sourced(44_600, "huggingface.co/datasets/PKU-Alignment/PKU-SafeRLHF-prompt, dataset card: "
                                       "\"44.6K unique prompts from PKU-SafeRLHF\"")
SAFE_RLHF_PPO_LAG = {
    "epochs": Sourced(1, f"{SAFE_RLHF}: --epochs 1 (passes over the training prompts)"),
    "responses_per_prompt": Sourced(1, f"{SAFE_RLHF}: --num_return_sequences 1"),
    "update_iters": Sourced(1, f"{SAFE_RLHF}: --update_iters 1 (PPO passes over each rollout)"),
    "prompts_per_device_step": Sourced(16, f"{SAFE_RLHF}: --per_device_prompt_batch_size 16, "
                                           "--per_device_train_batch_size 16, --gradient_accumulation_steps 1"),
    "ptx_steps_per_rl_step": Sourced(1, f"{SAFE_RLHF}: --ptx_datasets alpaca, --ptx_coeff 16; "
                                        "safe_rlhf/trainers/rl_trainer.py RLTrainer.train: one ptx_step per rl_step"),
    "critics": Sourced(2, "safe_rlhf/algorithms/ppo_lag/trainer.py PPOLagTrainer: a reward and a cost critic, "
                          "initialised from the reward and cost models (ppo-lag.sh: the critics' paths default to them)"),
    "max_length": Sourced(512, f"{SAFE_RLHF}: --max_length 512 (prompt + response, a cap)"),
}
PAPER_MOCAN = "configs/paper_mocan.yaml (from the official code, shuoli90/CAN)"
# MoCAN as the paper's official code runs it.
MOCAN_RECIPE = {
    "prompts": Sourced(1000, f"{PAPER_MOCAN}: the dual from 1,000 prompts (model_based_dual_trainer.ipynb)"),
    "samples": Sourced(128, f"{PAPER_MOCAN}: 128 responses per prompt"),
    "beta": Sourced(0.1, f"{PAPER_MOCAN}: β = 0.1 for MoCAN"),
    "epochs": Sourced(3, f"{PAPER_MOCAN}: 3 epochs (cdpo/dpo.py)"),
    "pairs": Sourced(27000, f"{PAPER_MOCAN}: 27 pairs per prompt, about the ~27k PKU-SafeRLHF-30K train pairs the "
                            "official code trained on (a dualign choice; the paper's pair count is not stated there)"),
    "max_length": Sourced(512, f"{PAPER_MOCAN}: max_length 512 (a cap)"),
}


def literature_runs(rl_train_prompts: int | None, prompt_tokens: float = 64,
                    response_tokens: float = 256) -> dict[str, dict]:
    """Tokens through each stage and the models held, (trained, frozen), of MoCAN's paper recipe and
    of Safe-RLHF's PPO-Lagrangian at its script's iteration counts, for sequences of P + R tokens:

    MoCAN:  generation, scored, reference  N·K·(P + R);  training 2·pairs·E·(P + R) (both responses of a pair)
    PPO-Lag (E_p = prompts × epochs × responses episodes, U update passes):
            generation, scored, reference, forward (log π_old)  E_p·(P + R);
            training  E_p·(P + R)·U  +  E_p·(P + R)·ptx  (the PTX batch taken as long as a rollout's);
            critic_forward  2·E_p·(P + R);  critic_training  2·E_p·(P + R)·U.

    ``rl_train_prompts`` None: the PPO-Lagrangian row is left out (its iteration count not sourced).
    """
    seq = prompt_tokens + response_tokens
    m = {k: v.value for k, v in MOCAN_RECIPE.items()}
    n = m["prompts"] * m["samples"] * seq
    out = {"mocan (paper recipe)": {"tokens": {"generation": n, "scored": n, "reference": n,
                                               "training": 2 * m["pairs"] * m["epochs"] * seq},
                                    "resident": (1, 0)}}
    if rl_train_prompts is not None:
        s = {k: v.value for k, v in SAFE_RLHF_PPO_LAG.items()}
        e = rl_train_prompts * s["epochs"] * s["responses_per_prompt"] * seq
        out["ppo-lagrangian-critic (Safe-RLHF)"] = {
            "tokens": {"generation": e, "scored": e, "reference": e, "forward": e,
                       "training": e * s["update_iters"] + e * s["ptx_steps_per_rl_step"],
                       "critic_forward": s["critics"] * e, "critic_training": s["critics"] * e * s["update_iters"]},
            "resident": (1 + int(s["critics"]), 3)}
    return out


def literature_table(points: int, rl_train_prompts: int | None = int(PKU_SAFERLHF_PROMPTS.value),
                     params: float = 7e9) -> list[dict]:
    """The literature's recipes at ``params`` for ``points`` thresholds, FLOPs and memory:

    MoCAN      F = F_shared + points · F_train   (sample, score and log π_ref once; a fine-tune per point)
    PPO-Lag    F = points · F_run                (a whole run per point)
    """
    from dualign.modeling.flops import project_flops, project_run

    rows = []
    for name, run in literature_runs(rl_train_prompts).items():
        one = project_run(run["tokens"], run["resident"], params)
        if name.startswith("mocan"):
            shared = project_flops({k: v for k, v in run["tokens"].items() if k != "training"}, params)["total"]
            total = shared + points * (one["flops"]["total"] - shared)
        else:
            total = points * one["flops"]["total"]
        rows.append({"recipe": name, "points": points, "flops_one_point": one["flops"]["total"],
                     "flops_all_points": total, "memory_gb": one["memory_gb"]})
    return rows
