"""Experiment tracking (``report_to``): TensorBoard's event files and W&B's offline run hold every
metrics.jsonl line at its step, read back with each tool's own reader; a tracker that is unknown
or not installed is one ConfigError naming ``report_to``, before anything is written."""

from __future__ import annotations

import importlib.util
import json
import struct
import time
from pathlib import Path

import pandas as pd
import pytest

from dualign._infra.errors import ConfigError
from dualign._infra.tracking import Tracker, check_report_to
from dualign.baselines.dispatch import run_method
from dualign.baselines.grpo_lagrangian import GRPOLagrangianConfig

LINES = [{"step": 1, "loss": 0.69, "dual/lambda_cost": 0.5}, {"step": 2, "loss": 0.6, "dual/lambda_cost": 1.25},
         {"step": 3, "loss": 0.25, "dual/lambda_cost": 2.0}]


def reward_fn(prompts: list[str], responses: list[str]) -> list[float]:
    return [len(r) / 10 for r in responses]


def cost_fn(prompts: list[str], responses: list[str]) -> list[float]:
    return [float(r.count("e")) for r in responses]


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def wandb_records(path: Path) -> list:
    """The protobuf Records of an offline run's ``.wandb`` file: a LevelDB-style log (a 7-byte header,
    32 KiB blocks of chunks: crc32 4 bytes, length 2, type 1)."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, chunk, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        if pos + 7 + length > len(raw):  # a chunk still being written
            break
        chunk, pos = chunk + raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
        elif kind == 0 and length == 0:
            break
    return out


def wandb_history(log_dir: Path, timeout: float = 60.0) -> list[dict]:
    """The history records of the offline run under ``log_dir``, once its ``exit`` record is written:
    W&B's service process writes the file and may still be at it when ``finish()`` returns."""
    (path,) = log_dir.glob("wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    records = wandb_records(path)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = wandb_records(path)
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


def test_tensorboard_events_hold_each_line_at_its_step(tmp_path):
    tracker = Tracker("tensorboard", tmp_path, {"beta": 0.1}, "test")
    for line in LINES:
        tracker.log(line, line["step"])
    tracker.close()
    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    assert set(scalars) == {"loss", "dual/lambda_cost"}
    assert scalars["dual/lambda_cost"] == [(1, 0.5), (2, 1.25), (3, 2.0)]
    assert scalars["loss"] == [(s, pytest.approx(v)) for s, v in [(1, 0.69), (2, 0.6), (3, 0.25)]]


def test_wandb_offline_run_holds_each_line_at_its_step_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    tracker = Tracker(["wandb"], tmp_path, {"beta": 0.1}, "test")
    for line in LINES:
        tracker.log(line, line["step"])
    tracker.close()
    history = wandb_history(tmp_path)
    assert [(h["_step"], h["loss"], h["dual/lambda_cost"]) for h in history] == [
        (1, 0.69, 0.5), (2, 0.6, 1.25), (3, 0.25, 2.0)]


def test_an_unknown_or_missing_tracker_is_a_config_error_naming_report_to(tmp_path, monkeypatch):
    assert check_report_to("none") == [] and check_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    for bad, match in ((["mlflow"], "'mlflow' is not one of"), (["none", "wandb"], "none cannot go with wandb")):
        with pytest.raises(ConfigError, match=match):
            Tracker(bad, tmp_path / "x", {}, "test")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"config key 'report_to': wandb needs the wandb package"):
        Tracker(["tensorboard", "wandb"], tmp_path / "x", {}, "test")
    assert not (tmp_path / "x").exists()


def test_grpo_lagrangian_reports_its_lambda_to_tensorboard(tiny_gpt2, tmp_path):
    prompts = ["How do I cook rice?", "Write a poem about rain.", "Tell me a joke.", "How can I pick a lock?"]
    pd.DataFrame({"prompt_id": [0, 0, 1, 1, 2, 2, 3, 3], "prompt": [p for p in prompts for _ in range(2)],
                  "response": ["a", "b"] * 4, "reward": [0.0, 1.0] * 4, "cost": [1.0, 0.0] * 4}).to_parquet(
        tmp_path / "scores.parquet")
    cfg = GRPOLagrangianConfig(model=tiny_gpt2, run_dir=str(tmp_path / "run"), scores=str(tmp_path / "scores.parquet"),
                               scorers=[f"reward=callable:{__file__}:reward_fn", f"cost=callable:{__file__}:cost_fn"],
                               constraints=["cost<=-1"], beta=0.1, iterations=2, prompts_per_iteration=2,
                               num_samples=2, max_new_tokens=6, learning_rate=1e-3, lambda_init=1.0,
                               lambda_lr=0.5, cost_window=1, device="cpu", report_to=["tensorboard"])
    run_method(cfg)
    lines = [json.loads(s) for s in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scalars = tensorboard_scalars(tmp_path / "run" / "tensorboard")
    assert scalars["dual/lambda_cost"] == [(x["step"], pytest.approx(x["dual/lambda_cost"])) for x in lines]
    assert len(lines) == 2 and lines[1]["dual/lambda_cost"] > lines[0]["dual/lambda_cost"]  # cost ≥ 0 > −1: violated


def test_report_to_is_a_yaml_key_and_a_repeatable_flag_of_train():
    from dualign import cli
    from dualign._infra.config import build_config, overrides_from_args
    from dualign.train import TrainConfig

    yaml_cfg = build_config(TrainConfig, {"model": "m", "run_dir": "r", "report_to": "tensorboard"})
    assert yaml_cfg.report_to == ["tensorboard"]
    args = cli.build_parser("train").parse_args(["train", "--model", "m", "--run-dir", "r", "--report-to",
                                                 "tensorboard", "--report-to", "wandb"])
    flags = build_config(TrainConfig, overrides_from_args(args, exclude=("config",)))
    assert flags.report_to == ["tensorboard", "wandb"]
    assert TrainConfig(model="m", run_dir="r").report_to == ["none"]
