"""Installing the pack must not change a user's ComfyUI.

ComfyUI-Manager runs `pip install -r requirements.txt` inside the user's ComfyUI environment. If
that file names a package ComfyUI pins (its frontend, for one) or asks for a newer version of one
ComfyUI needs, pip moves it and the user's ComfyUI may no longer start. These tests keep
requirements.txt to what the pack imports, with floors ComfyUI's own requirements already meet,
and ask pip's resolver (offline, dry run) what installing it into this environment, which holds
ComfyUI 0.3.75's requirements, would change: nothing.
"""
from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import re
import subprocess
import sys
import tomllib

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIREMENTS = os.path.join(ROOT, "requirements.txt")
DEV_REQUIREMENTS = os.path.join(ROOT, "requirements-dev.txt")
COMFY_REQUIREMENTS = os.path.join(ROOT, ".cache", "ComfyUI", "requirements.txt")
PACK_CODE = ("__init__.py", "fp8_optimization.py", "nodes", "wanvideo", "multitalk")

# Modules ComfyUI itself provides to the node layer; never a pip requirement of the pack.
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths",
                 "latent_preview", "node_helpers", "server", "execution"}
# Imported only when present, each with a working fallback: Triton kernels (CUDA builds of torch
# bring triton), extra attention backends the user installs on purpose, psutil for free host RAM
# (/proc/meminfo otherwise). sentencepiece: only the full-size stand-in generator (a developer
# tool; ComfyUI requires sentencepiece) uses it, and says so when it is missing.
OPTIONAL_MODULES = {"triton", "flash_attn", "sageattention", "psutil", "sentencepiece"}
# scripts/setup.sh installs these first and pinned, outside the requirement files.
SETUP_PINNED = {"torch", "torchvision"}


def read_requirements(path: str) -> list[Requirement]:
    """Requirement lines of a pip requirements file (comments, blanks and options skipped)."""
    out = []
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = re.sub(r"(^|\s)#.*$", "", raw).strip()
            if not line or line.startswith("-"):
                continue
            try:
                out.append(Requirement(line))
            except InvalidRequirement as e:
                pytest.fail(f"{os.path.basename(path)}: unreadable line {raw.strip()!r}: {e}")
    return out


def by_name(reqs: list[Requirement]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in reqs}


def comfy_requirements() -> dict[str, Requirement]:
    if not os.path.isfile(COMFY_REQUIREMENTS):
        pytest.skip(f"no ComfyUI checkout at {os.path.dirname(COMFY_REQUIREMENTS)} "
                    f"(scripts/setup.sh extracts it)")
    return by_name(read_requirements(COMFY_REQUIREMENTS))


def installed_versions() -> dict[str, str]:
    """name -> version of every distribution this interpreter sees: the environment the pack
    would be installed into."""
    out = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(canonicalize_name(name), dist.version)
    return out


def lowest_allowed(req: Requirement) -> Version | None:
    """The smallest version `req` admits, when a specifier states one (>=, ==, ~=)."""
    floors = []
    for spec in req.specifier:
        if spec.operator in (">=", "==", "~=", "==="):
            try:
                floors.append(Version(spec.version.rstrip(".*")))
            except InvalidVersion:
                pass
    return max(floors) if floors else None


def is_exact_pin(req: Requirement) -> bool:
    return any(spec.operator in ("==", "===") and "*" not in spec.version
               for spec in req.specifier)


def imported_top_level_modules() -> set[str]:
    """Absolute imports anywhere in the pack's run-time code (nested imports included)."""
    names = set()
    for entry in PACK_CODE:
        path = os.path.join(ROOT, entry)
        files = [path] if path.endswith(".py") else [
            os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py")]
        for file in files:
            with open(file, encoding="utf-8") as f:
                tree = ast.parse(f.read(), file)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"__future__"}


# ----------------------------------------------------------------------------- what the files say

def test_requirements_are_what_the_pack_imports():
    needed = imported_top_level_modules() - COMFY_MODULES - OPTIONAL_MODULES
    providers = metadata.packages_distributions()
    unknown = sorted(m for m in needed if m not in providers)
    assert not unknown, f"the pack imports {unknown}, which no installed distribution provides"
    wanted = {canonicalize_name(d) for m in needed for d in providers[m]}
    listed = set(by_name(read_requirements(REQUIREMENTS)))
    assert listed == wanted, (
        f"requirements.txt should name exactly the distributions the pack imports at run time; "
        f"listed but never imported: {sorted(listed - wanted)}; imported but not listed: "
        f"{sorted(wanted - listed)} (optional imports with a fallback go in OPTIONAL_MODULES)")


def test_pyproject_dependencies_equal_requirements():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    canon = lambda reqs: {(canonicalize_name(r.name), str(r.specifier), str(r.marker or ""))  # noqa: E731
                          for r in reqs}
    assert canon(Requirement(d) for d in deps) == canon(read_requirements(REQUIREMENTS))


def test_floors_are_met_by_comfyui_own_requirements():
    # The dry run below cannot see this one: pip leaves an already-met unversioned name alone,
    # but an upgrade (`pip install -U`, or a user without that package yet) would take the newest
    # release, e.g. a frontend newer than ComfyUI's core supports.
    comfy = comfy_requirements()
    installed = installed_versions()
    problems = []
    for name, ours in by_name(read_requirements(REQUIREMENTS)).items():
        theirs = comfy.get(name)
        if theirs is None:
            continue
        if is_exact_pin(theirs):
            problems.append(f"{name}: ComfyUI pins it ({theirs}); leave it to ComfyUI")
            continue
        floor = lowest_allowed(theirs)
        if floor is not None:
            if not ours.specifier.contains(floor, prereleases=True):
                problems.append(f"{name}: ComfyUI allows {floor} ({theirs}) but we ask {ours}")
        elif name in installed and not ours.specifier.contains(installed[name], prereleases=True):
            problems.append(f"{name}: ComfyUI leaves it unversioned; the installed "
                            f"{installed[name]} does not meet our {ours}")
    assert not problems, "\n".join(problems)


def test_dev_environment_keeps_all_of_comfyui_requirements():
    # The pack's file no longer carries ComfyUI's packages, so the dev file has to.
    comfy = comfy_requirements()
    have = set(by_name(read_requirements(DEV_REQUIREMENTS))) | \
        set(by_name(read_requirements(REQUIREMENTS))) | SETUP_PINNED
    assert not sorted(set(comfy) - have), "requirements-dev.txt lacks ComfyUI requirements"


# ----------------------------------------------------------------------------- what pip would do

def _pip_dry_run(tmp_path) -> dict:
    """pip's resolver against the installed set only: --no-index with an empty --find-links
    folder, so a requirement that is not already met cannot be fetched and shows up as an error."""
    empty = tmp_path / "no-packages"
    empty.mkdir()
    report = tmp_path / "report.json"
    env = dict(os.environ, PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1")
    cmd = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check",
           "--no-cache-dir", "--dry-run", "--no-index", "--find-links", str(empty),
           "--report", str(report), "-r", REQUIREMENTS]
    try:
        run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"pip could not run offline here: {e}")
    output = run.stdout + run.stderr
    if run.returncode != 0:
        fetch = re.findall(r"No matching distribution found for (\S+)", output)
        if fetch or "ResolutionImpossible" in output:
            pytest.fail("installing requirements.txt would need packages this ComfyUI "
                        f"environment lacks or has at other versions: {fetch or output[-2000:]}")
        pytest.skip(f"pip could not run offline here (exit {run.returncode}): {output[-500:]}")
    if not report.is_file():
        pytest.skip("this pip writes no --report (pip >= 22.2 needed)")
    return json.loads(report.read_text())


def test_installing_requirements_changes_nothing_in_a_comfyui_environment(tmp_path):
    comfy = comfy_requirements()
    before = installed_versions()
    unmet = sorted(f"{name} ({req}; installed {before.get(name, 'none')})"
                   for name, req in comfy.items()
                   if name not in before or not req.specifier.contains(before[name],
                                                                      prereleases=True))
    if unmet:
        pytest.skip(f"this interpreter does not hold ComfyUI's requirements: {unmet}")

    result = _pip_dry_run(tmp_path)
    would = {canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
             for item in result.get("install", [])}
    changed = sorted(f"{name} {before.get(name, 'not installed')} -> {version}"
                     for name, version in would.items() if name in comfy)
    assert not changed, f"installing the pack would change ComfyUI's packages: {changed}"
    assert not would, f"installing the pack into this ComfyUI environment would install: {would}"
    assert installed_versions() == before  # a dry run, whatever pip version this is
