"""The conda environment stays consistent with pyproject.toml (conda is not on CI's machine)."""

from __future__ import annotations

import re
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from workflow_helpers import REPO

CONDA_NAMES = {"snakemake": "snakemake-minimal"}


def conda_pins() -> dict[str, str]:
    env = yaml.safe_load((REPO / "envs" / "cryoday.yaml").read_text())
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            name, _, version = dep.partition(" ")
            pins[name] = version.lstrip("=").strip()
    return pins


def test_every_runtime_dependency_is_pinned_in_the_conda_env():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = conda_pins()
    python_floor = Version(re.sub(r"[^0-9.]", "", project["requires-python"]))
    assert Version(pins["python"]) >= python_floor
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = CONDA_NAMES.get(req.name, req.name)
        assert name in pins, f"{req.name} is in pyproject.toml but not in envs/cryoday.yaml"
        assert pins[name], f"{name} is not pinned in envs/cryoday.yaml"
        # A pin "=X.Y" means X.Y.*: its lowest release must satisfy pyproject's lower bound.
        assert req.specifier.contains(Version(pins[name]), prereleases=True), (
            f"envs/cryoday.yaml pins {name} ={pins[name]}, outside pyproject's {req.specifier}"
        )


def test_the_env_installs_the_package_itself():
    script = (REPO / "envs" / "cryoday.post-deploy.sh").read_text()
    assert "pip install" in script
    rules = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    n_rules = len(re.findall(r"^rule \w+:", rules, flags=re.M))
    n_with_env = len(re.findall(r"^    conda:\n        ENV$", rules, flags=re.M))
    assert n_rules > 0 and n_with_env == n_rules, "every rule declares envs/cryoday.yaml"
