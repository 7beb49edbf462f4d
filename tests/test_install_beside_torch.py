"""Installing dualign into an environment that already holds another torch keeps that torch.

A real second torch is gigabytes, so the environment gets a stub distribution named ``torch``
(metadata only, another version). pip then resolves ``dualign`` in that environment with
``--dry-run --report``, from a metadata-only dualign wheel whose ``Requires-Dist`` lines are
pyproject.toml's dependencies, as a built wheel's are. Its resolver checks torch against
dualign's requirement and against every installed dependency's (accelerate's, peft's, ...); the
other dependencies are the suite's own, seen through a ``.pth`` file. ``--no-index`` keeps it
offline; the only index is a local folder holding the dualign wheel and another stub torch, so
that pip *can* replace the installed torch, and the report says whether it would (the control: a
torch below the floor is replaced).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
DUALIGN = PROJECT["version"] + "+stub"


def _wheel(directory: Path, name: str, version: str, requires: list[str] = ()) -> Path:
    """A metadata-only wheel (no code): what pip reads of a distribution to resolve it."""
    dist_info = f"{name}-{version}.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    metadata += "".join(f"Requires-Dist: {r}\n" for r in requires)
    files = {
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: dualign-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in files) + f"{dist_info}/RECORD,,\n"
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for path, text in files.items():
            zf.writestr(path, text)
        zf.writestr(f"{dist_info}/RECORD", record)
    return wheel


def _venv_with_torch(tmp_path: Path, version: str) -> Path:
    """A fresh venv whose own site-packages holds torch VERSION (the stub); the suite's other
    packages (pip, setuptools, dualign's dependencies) come after it on sys.path via a .pth file,
    so the stub is the torch pip and importlib.metadata see there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    Path(site, "suite-packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = _wheel(tmp_path, "torch", version)
    _pip(python, "install", "--no-index", "--no-deps", "--quiet", str(wheel), check=True)
    return python


def _pip(python: Path, *args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PYTHONPATH="")
    return subprocess.run([str(python), "-m", "pip", *args], check=check, capture_output=True,
                          text=True, env=env)


def _torch_version(python: Path) -> str:
    return subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('torch'))"],
        check=True, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=""),
    ).stdout.strip()


def _would_install(tmp_path: Path, torch_version: str) -> dict[str, str]:
    """{name: version} of what ``pip install dualign`` would install into a venv holding torch
    TORCH_VERSION, offered a stub torch 2.13.0 (the version the suite runs on) as a replacement."""
    python = _venv_with_torch(tmp_path, torch_version)
    assert _torch_version(python) == torch_version
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    _wheel(wheelhouse, "torch", "2.13.0")
    # a local version of its own, so that an installed dualign (the suite's) does not satisfy it
    _wheel(wheelhouse, "dualign", DUALIGN, PROJECT["dependencies"])
    report = tmp_path / "report.json"
    _pip(python, "install", "--dry-run", "--no-index", "--find-links", str(wheelhouse),
         "--report", str(report), "--quiet", f"dualign=={DUALIGN}", check=True)
    return {item["metadata"]["name"].lower(): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


@pytest.mark.parametrize("torch_version", ["2.6.0", "2.9.1+cu128"])
def test_pip_keeps_an_installed_torch_of_another_version(tmp_path, torch_version):
    """The floor the docs state (2.6, transformers' and accelerate's) and a CUDA build's local
    version: pip would install dualign alone and keep that torch."""
    assert _would_install(tmp_path, torch_version) == {"dualign": DUALIGN}


def test_a_torch_below_the_floor_is_replaced(tmp_path):
    """The control: a torch the requirements exclude is replaced by the one on offer, so the
    check above can fail."""
    assert _would_install(tmp_path, "2.5.1") == {"dualign": DUALIGN, "torch": "2.13.0"}
