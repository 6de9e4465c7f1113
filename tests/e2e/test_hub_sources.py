"""Hub model sources, through huggingface_hub's real `snapshot_download`, offline.

The Hub's servers are out of reach here, so the tests lay out a Hugging Face cache the way
huggingface_hub writes one (`models--<owner>--<name>/refs/main` naming a commit and
`snapshots/<commit>/...`) and run `bakery-slurm run-cell` with HF_HOME pointing at it and
HF_HUB_OFFLINE=1: the download call, the commit it resolves to, the subfolder handling and the
error for a missing repo are all the real code.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import unshared

pytestmark = pytest.mark.e2e

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root: Path, tiny_models: Path) -> Path:
    """An HF_HOME whose cache holds acme/tiny-text (the text base) and acme/tiny-adapters
    (subfolders eng/ and nob/) at COMMIT."""
    repos = {"acme/tiny-text": {"": tiny_models / "bases" / "text"},
             "acme/tiny-adapters": {name: tiny_models / "adapters" / "text" / name
                                    for name in ("eng", "nob")}}
    for repo, folders in repos.items():
        entry = root / "hub" / f"models--{repo.replace('/', '--')}"
        (entry / "refs").mkdir(parents=True)
        (entry / "refs" / "main").write_text(COMMIT)
        for sub, source in folders.items():
            shutil.copytree(source, entry / "snapshots" / COMMIT / sub, dirs_exist_ok=True)
    return root


def write_matrix(folder: Path, base_repo: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "matrix.toml"
    path.write_text(f"""
name = "hub-sources"
adapters = ["eng", "nob"]
[base]
repo = "{base_repo}"
[adapter]
repo = "acme/tiny-adapters"
subfolder = "{{adapter}}"
[push]
target = "dir:published"
[variants.std]
[sizes.tiny1b]
[methods.ties]
density = 0.5
weight = 0.5
[runtime]
container = "none"
[paths]
work = "work"
""")
    return path


def run_cell(matrix: Path, hf_home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "bakery_slurm", "run-cell", str(matrix),
                           "tiny1b-std/eng-nob__ties", "--device", "cpu"],
                          env=env, capture_output=True, text=True)


def test_hub_sources_are_fetched_and_identified_by_commit(tmp_path, tiny_models):
    hf_home = hub_cache(tmp_path / "hf-home", tiny_models)
    matrix = write_matrix(tmp_path / "project", "acme/tiny-text")
    done = run_cell(matrix, hf_home)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    inputs = result["stages"]["bake"]["inputs"]
    assert inputs["base"] == {"repo": "acme/tiny-text", "subfolder": None, "revision": None,
                              "commit": COMMIT}
    assert inputs["adapters"]["nob"] == {"repo": "acme/tiny-adapters", "subfolder": "nob",
                                         "revision": None, "commit": COMMIT}
    card = (tmp_path / "project" / "published" / "tiny1b-std" / "eng-nob__ties" / "README.md").read_text()
    assert "base_model:\n- acme/tiny-text\n" in card
    assert f"`acme/tiny-text@{COMMIT}`" in card and f"`acme/tiny-adapters/nob@{COMMIT}`" in card
    # The root card names the same inputs at their commits.
    root = (tmp_path / "project" / "published" / "README.md").read_text()
    assert "base_model:\n- acme/tiny-text\n" in root and f"`acme/tiny-text@{COMMIT}`" in root
    cell = tmp_path / "project" / "published" / "tiny1b-std" / "eng-nob__ties"
    recipe = (cell / "mergekit_config.yml").read_text()
    assert f'"acme/tiny-text@{COMMIT}+acme/tiny-adapters/nob@{COMMIT}"' in recipe


def test_a_missing_hub_repo_fails_the_bake_naming_it(tmp_path, tiny_models):
    hf_home = hub_cache(tmp_path / "hf-home", tiny_models)
    matrix = write_matrix(tmp_path / "project", "acme/not-there")
    done = run_cell(matrix, hf_home)
    assert done.returncode == 1
    assert "stage bake failed: cannot download hub:acme/not-there" in done.stderr
    assert not (tmp_path / "project" / "published").exists()


# ---------------------------------------------------------------------------------------------
# Pinned inputs and [runtime] offline

NEWER = "fedcba9876543210fedcba9876543210fedcba98"


def offline_matrix(folder: Path, hf_home: Path) -> Path:
    matrix = write_matrix(folder, "acme/tiny-text")
    matrix.write_text(matrix.read_text().replace(
        'container = "none"', f'container = "none"\noffline = true\nenv = {{ HF_HOME = "{hf_home}" }}'))
    return matrix


def task_command(matrix: Path) -> list[str]:
    """The command `submit --dry-run` shows for the matrix's one cell."""
    from click.testing import CliRunner

    from bakery_slurm.cli import cli

    dry = CliRunner().invoke(cli, ["submit", str(matrix), "--executor", "local", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    line = next(line for line in dry.stdout.splitlines() if " run-cell " in line)
    return shlex.split(line)


def test_an_adapter_pushed_after_submit_does_not_change_what_the_task_bakes(tmp_path, tiny_models):
    hf_home = hub_cache(tmp_path / "hf-home", tiny_models)
    matrix = offline_matrix(tmp_path / "project", hf_home)
    command = task_command(matrix)
    assert f"nob={COMMIT}" in command
    # Then a new nob adapter lands, and main moves to it, before the task starts.
    adapters = hf_home / "hub" / "models--acme--tiny-adapters"
    shutil.copytree(adapters / "snapshots" / COMMIT, adapters / "snapshots" / NEWER)
    (adapters / "snapshots" / NEWER / "nob" / "adapter_model.safetensors").write_bytes(b"junk")
    (adapters / "refs" / "main").write_text(NEWER)
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    inputs = json.loads(done.stdout)["stages"]["bake"]["inputs"]
    assert inputs["adapters"]["nob"]["commit"] == inputs["adapters"]["eng"]["commit"] == COMMIT
    # Unpinned, the same cell would now read the new commit, whose junk adapter fails the bake.
    unpinned = [c for c in command if c != "--pin" and not c.startswith(("base=", "eng=", "nob="))]
    assert subprocess.run(unpinned, capture_output=True, text=True).returncode == 1


def test_an_offline_task_fails_at_once_naming_the_file_missing_from_the_cache(tmp_path, tiny_models):
    hf_home = hub_cache(tmp_path / "hf-home", tiny_models)
    snapshot = hf_home / "hub" / "models--acme--tiny-adapters" / "snapshots" / COMMIT
    matrix = offline_matrix(tmp_path / "project", hf_home)
    command = task_command(matrix)  # submit now checks the cache: the file goes after it
    (snapshot / "eng" / "adapter_model.safetensors").unlink()
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 1
    assert (f"{snapshot / 'eng' / 'adapter_model.safetensors'} is not in the Hub cache and the "
            "runtime is offline") in done.stderr
    assert "bakery-slurm prefetch" in done.stderr


# ---------------------------------------------------------------------------------------------
# A Hub cache shared by a group: what a download writes there is the group's to read

def group_cache_download(tmp_path: Path, tiny_models: Path, *command: str) -> Path:
    """Run `bakery-slurm *command` (on the matrix of `write_matrix`) under umask 077 with its Hub
    cache in a group's setgid folder, downloading from tests/hub_server.py's stand-in for the Hub
    with huggingface_hub's real `snapshot_download`; return the cache."""
    from hub_server import HubServer

    group = tmp_path / "group"
    group.mkdir()
    os.chmod(group, 0o2770)
    matrix = write_matrix(tmp_path / "project", "acme/tiny-text")
    repos = {"acme/tiny-text": tiny_models / "bases" / "text",
             "acme/tiny-adapters": tiny_models / "adapters" / "text"}
    with HubServer(repos) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0",
               "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(group / "hub")}
        done = subprocess.run([sys.executable, "-m", "bakery_slurm", *command, str(matrix),
                               *(["tiny1b-std/eng-nob__ties", "--device", "cpu"]
                                 if command == ("run-cell",) else [])],
                              env=env, capture_output=True, text=True, umask=0o077)
    assert done.returncode == 0, done.stderr[-3000:]
    return group / "hub"


def test_what_prefetch_downloads_into_a_groups_cache_the_group_may_read(tmp_path, tiny_models):
    """huggingface_hub writes a repo's tree listing (trees/<commit>.json) 0600 whatever the
    umask, and the rest under the umask: a teammate's offline task could not read what
    prefetch downloaded, nor lock the cache entry to download more."""
    cache = group_cache_download(tmp_path, tiny_models, "prefetch")
    assert (cache / "models--acme--tiny-text" / "trees" / "").is_dir()
    assert unshared(cache) == {}


def test_what_a_task_downloads_into_a_groups_cache_the_group_may_read(tmp_path, tiny_models):
    cache = group_cache_download(tmp_path, tiny_models, "run-cell")
    assert list((cache / "models--acme--tiny-adapters" / "blobs").iterdir())
    assert unshared(cache) == {}
