"""Shared fixtures: tiny GPT-2 and LLaMA models with a tokenizer trained here (no hub)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Worlds built by the tests never land in (or come from) the user's cache. The xdist workers of one
# run share one cache (named after the controller's run id), so a world is built once.
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
os.environ["DUALIGN_CACHE"] = (os.path.join(tempfile.gettempdir(), f"dualign-test-cache-{_RUN}") if _RUN
                               else tempfile.mkdtemp(prefix="dualign-test-cache-"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under xdist each worker gets one thread (two workers on two cores); alone, up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))

TINY_TEXTS = [
    "User: How do I cook rice?\nAssistant: Rinse the rice, then simmer it for fifteen minutes.",
    "User: How can I pick a lock?\nAssistant: I can't help with that, but a locksmith can.",
    "User: Write a poem about rain.\nAssistant: Rain taps softly on the roof at night.",
    "BEGINNING OF CONVERSATION: USER: Tell me a joke. ASSISTANT: Why did the chicken cross the road?",
] * 20


@pytest.fixture(scope="session")
def script():
    """``script(name)``: scripts/<name>.py loaded as a module named ``name`` (scripts/ on sys.path,
    so it imports its siblings; registered in sys.modules, where a dataclass looks itself up)."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "scripts"

    def load(name: str):
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    from dualign.modeling.tiny import save_tiny_causal_lm

    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2", TINY_TEXTS,
                                   vocab_size=400, hidden=32, layers=2, heads=2))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from dualign.modeling.tiny import save_tiny_causal_lm

    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"), "llama", TINY_TEXTS,
                                   vocab_size=400, hidden=32, layers=2, heads=2))


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model(request, tiny_gpt2, tiny_llama) -> str:
    """Each test using this runs once per architecture."""
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]


@pytest.fixture(scope="session")
def small_world() -> str:
    """The ``small`` built-in world, built once per session into the test cache (so that
    ``world: {size: small}`` in a run config finds it). One thread: faster for tiny models."""
    import fcntl

    from dualign.world import build_world, world_config

    os.makedirs(os.environ["DUALIGN_CACHE"], exist_ok=True)
    with open(os.path.join(os.environ["DUALIGN_CACHE"], "small-world.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for this build, then reuses it
        return str(build_world(world_config("small"), progress=False))


# The end-to-end modules first, heaviest first, so that xdist's scope scheduler (``--dist loadscope
# --no-loadscope-reorder``, pyproject.toml: scopes in this order, not by test count) starts the long
# jobs at once and ends on short modules. The small world's module leads: it builds the world the
# demo modules then find built. Measured with ``--durations=0`` (seconds of one worker): world 91,
# pipeline 66, data_parallel 58, demo 78, demo_pecan 40, compare 28, gpu_check 26, quiet 12,
# train 12, fuzz 11. Ordered by test count, one worker finished a minute before the other (4 min
# 47 s); in this order the two workers' busy times were 250 s each (4 min 18 s).
FIRST = ("test_world.py", "test_pipeline.py", "test_data_parallel.py", "test_demo.py", "test_demo_pecan.py",
         "test_compare.py", "test_gpu_check.py", "test_quiet.py", "test_train.py", "test_fuzz.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(FIRST)))  # stable: each module keeps its order
