"""The built wheel holds the whole package: every module and every data file that an editable install would
read from the source tree, and nothing of tests/ or bench/. The expected files are found by walking the
source tree, so a new module, subpackage or preset is checked with no edit here."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # pip builds the wheel in a subprocess: tens of seconds

CODE = ("model", "train", "launch")  # ../shared/DESIGN.md: the package's folders beside pyproject.toml
NOT_PACKAGED = ("tests", "bench")
# What a working copy holds besides the source: never copied into the build.
GENERATED = shutil.ignore_patterns(".*", "build", "dist", "*.egg-info", "__pycache__", "runs", "prepared", "wandb")


def _can_build_here() -> bool:
    """Whether this environment's setuptools builds wheels itself (pyproject asks for setuptools>=68;
    bdist_wheel moved into setuptools in 70.1), so that no build environment has to be downloaded."""
    try:
        return tuple(int(p) for p in version("setuptools").split(".")[:2]) >= (70, 1)
    except Exception:
        return False


def _source_files() -> set[str]:
    """The files the wheel must hold, as paths inside it, from the source tree."""
    expected = {f"scalegpt/{p.name}" for p in ROOT.glob("*.py") if p.name != "setup.py"}
    for folder in CODE:
        expected |= {f"scalegpt/{p.relative_to(ROOT)}" for p in (ROOT / folder).rglob("*.py")}
    expected |= {f"scalegpt/{p.relative_to(ROOT)}" for p in (ROOT / "configs").rglob("*.yaml")}
    for data in (ROOT / "train" / "data" / "gpt2", ROOT / "launch" / "templates"):
        expected |= {f"scalegpt/{p.relative_to(ROOT)}" for p in data.iterdir() if p.is_file()}
    return {name for name in expected if "__pycache__" not in name}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The names in a wheel built from a copy of the working tree (a build writes build/ and *.egg-info
    beside the sources, and a stale build/ could hide a missing file)."""
    root = tmp_path_factory.mktemp("wheel")
    src = shutil.copytree(ROOT, root / "src", ignore=GENERATED)
    here = ["--no-build-isolation"] if _can_build_here() else []  # else pip fetches setuptools for the build
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *here, "-w", str(root / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (built,) = (root / "dist").glob("scalegpt-*.whl")
    with zipfile.ZipFile(built) as z:
        return z.namelist()


def test_the_wheel_holds_every_module_preset_tokenizer_and_template(wheel: list[str]) -> None:
    expected = _source_files()
    assert any(n.startswith("scalegpt/configs/model/") for n in expected)  # the walk found the presets
    assert "scalegpt/train/data/gpt2/vocab.json" in expected and "scalegpt/launch/templates/sbatch.sh" in expected
    missing = sorted(expected - set(wheel))
    assert not missing, f"in the source tree but not in the wheel: {missing}"


def test_the_wheel_holds_nothing_but_the_package(wheel: list[str]) -> None:
    tops = sorted({name.split("/")[0] for name in wheel})
    assert len(tops) == 2 and tops[0] == "scalegpt" and tops[1].endswith(".dist-info"), tops
    stray = [n for n in wheel if n.split("/")[1] in NOT_PACKAGED or n == "scalegpt/setup.py"]
    assert not stray, stray
    assert not [n for n in wheel if "__pycache__" in n or n.endswith(".pyc")]
