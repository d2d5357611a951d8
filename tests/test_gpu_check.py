"""bench/gpu_check.sh, as far as it can be checked without a GPU: it parses, and the wheels it carries,
with what the GPU image already holds, are everything the benchmarks import."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import ROOT

SCRIPT = ROOT / "bench" / "gpu_check.sh"
# scalegpt's own requirements that neither the training path nor the benchmarks import.
NOT_IMPORTED = {"datasets", "wandb", "matplotlib", "scikit-learn", "sklearn", "rensa", "datatrove"}
"""datasets reads sources; scikit-learn (module sklearn), rensa and datatrove serve curation only."""
# The GPU image's Python and platform, against which requirement markers are evaluated.
IMAGE_ENV = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "extra": ""}


def bash_array(name: str) -> list[str]:
    match = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), re.M | re.S)
    assert match, f"{name}=(...) not found in {SCRIPT}"
    return match[1].split()


def needs(dist: str) -> list[Requirement]:
    """`dist`'s requirements that apply on the GPU image (no extras)."""
    reqs = [Requirement(r) for r in importlib.metadata.requires(dist) or []]
    return [r for r in reqs if r.marker is None or r.marker.evaluate(IMAGE_ENV)]


def test_the_script_parses() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_the_wheels_are_the_installed_versions_and_complete() -> None:
    wheels = dict(w.split("==") for w in bash_array("WHEELS"))
    wheels = {canonicalize_name(k): v for k, v in wheels.items()}
    image = {canonicalize_name(n) for n in bash_array("IMAGE_HAS")}
    for name, version in wheels.items():
        assert importlib.metadata.version(name) == version, f"{name}: the script pins {version}"
    wanted = [r for r in needs("scalegpt") if canonicalize_name(r.name) not in NOT_IMPORTED]
    wanted += [r for name in wheels for r in needs(name)]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert name in wheels or name in image, f"{req} is neither carried nor on the image"
        if name in wheels:
            assert req.specifier.contains(wheels[name], prereleases=True), (
                f"{req} but the script carries {wheels[name]}"
            )


def test_the_benchmarks_import_without_what_is_not_carried() -> None:
    blocked = "; ".join(f"sys.modules[{m!r}] = None" for m in sorted(NOT_IMPORTED))
    code = (
        f"import os, sys; os.environ['DS_ACCELERATOR'] = 'cpu'; {blocked}\n"
        "import deepspeed, scalegpt.train.loop, scalegpt.train.engine, scalegpt.launch.plan, scalegpt.model\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
