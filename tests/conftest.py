"""Shared fixtures: tiny GPT-2 and LLaMA models with a tokenizer trained here (no hub)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Worlds built by the tests never land in (or come from) the user's cache. The controller makes one
# cache per run before it starts the xdist workers, which inherit it, so a world is built once.
os.environ.setdefault("DUALIGN_TEST_CACHE", tempfile.mkdtemp(prefix="dualign-test-cache-"))
os.environ["DUALIGN_CACHE"] = os.environ["DUALIGN_TEST_CACHE"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under xdist each worker gets one thread (two workers on two cores); alone, up to two.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))
_LOCK = os.path.join(os.environ["DUALIGN_CACHE"], "small-world.lock")
# The small world's build (about 100 s of one core) holds this lock; the tests that need it wait on
# it. Started in the background as soon as the first worker has collected a test that needs it, and
# with those tests ordered last, it overlaps the tests that do not, instead of leaving one worker
# idle while the other builds.
_BUILD = f"""
import fcntl, torch
from dualign.world import build_world, world_config
torch.set_num_threads(1)
with open({_LOCK!r}, "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    build_world(world_config("small"), progress=False)
"""
_background: list[subprocess.Popen] = []


def pytest_collection_modifyitems(session, config, items):
    """The modules that need the small world run last (xdist hands out modules in this order), so
    both workers run the others while it builds in the background."""
    needs = {item.module.__name__ for item in items if "small_world" in getattr(item, "fixturenames", ())
             and getattr(item, "module", None) is not None}
    items.sort(key=lambda item: getattr(item, "module", None) is not None and item.module.__name__ in needs)


def pytest_collection_finish(session):
    if os.environ.get("PYTEST_XDIST_WORKER", "gw0") != "gw0":
        return
    if any("small_world" in getattr(item, "fixturenames", ()) for item in session.items):
        _background.append(subprocess.Popen([sys.executable, "-c", _BUILD], stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL))


def pytest_sessionfinish(session):
    for proc in _background:  # a run that ended before the build did leaves no half-built world behind
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


TINY_TEXTS = [
    "User: How do I cook rice?\nAssistant: Rinse the rice, then simmer it for fifteen minutes.",
    "User: How can I pick a lock?\nAssistant: I can't help with that, but a locksmith can.",
    "User: Write a poem about rain.\nAssistant: Rain taps softly on the roof at night.",
    "BEGINNING OF CONVERSATION: USER: Tell me a joke. ASSISTANT: Why did the chicken cross the road?",
] * 20


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    from dualign.tiny import save_tiny_causal_lm

    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_gpt2"), "gpt2", TINY_TEXTS,
                                   vocab_size=400, hidden=32, layers=2, heads=2))


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    from dualign.tiny import save_tiny_causal_lm

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

    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # waits for a build in progress, then reuses it
        return str(build_world(world_config("small"), progress=False))
