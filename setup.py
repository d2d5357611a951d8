"""The package list, found rather than written: pyproject.toml holds everything else.

The repository root is the package `scalegpt` and each top-level folder one of its subpackages
(../shared/DESIGN.md). pyproject's `packages.find` would name those folders `model`, `train.data`, ...
with no way to put them under `scalegpt.`, so the list is computed here. Every folder with an
`__init__.py` is found (tests/ and bench/ excepted, which are not part of the package); below those
folders and configs/, every folder is a subpackage, data folders included (configs/model,
train/data/gpt2, launch/templates), so a new folder ships in the wheel with no edit here.
"""

import warnings

from setuptools import find_namespace_packages, find_packages, setup
from setuptools.warnings import InformationOnly

CODE = find_packages(exclude=["tests", "tests.*", "bench", "bench.*"])
TOP = sorted({name.split(".")[0] for name in CODE} | {"configs"})
FOUND = find_namespace_packages(include=[*TOP, *(f"{top}.*" for top in TOP)], exclude=["*.__pycache__"])

# `pip install -e .` maps `scalegpt` to this folder with an import hook, because the folder is not named
# scalegpt; setuptools then always prints a box about folders named like the package in the working
# directory. Only that notice is silenced: every other warning of the build still shows.
warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)

setup(
    # This file sits in the package's own folder: named as the setup script, build_py leaves it out. (Under
    # pip the script name would otherwise be pip's hook runner, and scalegpt/setup.py would ship.)
    script_name="setup.py",
    package_dir={"scalegpt": "."},
    packages=["scalegpt", *(f"scalegpt.{name}" for name in FOUND)],
    package_data={"": ["*.yaml", "*.json", "*.txt", "LICENSE"], "scalegpt.launch.templates": ["*"]},
)
