"""push targets: Hub retries and give-ups through `FakeHubApi` (tests/fakes.py), `dir:` targets,
backoff bounds, and (marked e2e) a whole cell pushed to a fake Hub repo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fakes import FakeHubApi
from huggingface_hub.errors import HfHubHTTPError

from bakery_slurm.errors import PushError
from bakery_slurm.stages import push
from bakery_slurm.stages.push import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    MAX_TRIES,
    RECORD_FILE,
    DirTarget,
    HubTarget,
)

REPO = "owner/name"
CELL = "4b-std/eng-nob__ties"
RECIPE_HASH = "ab" * 32


def recipe_hash(target, path_in_repo):
    """The recipe hash a target has published at `path_in_repo`, or None."""
    return (target.published_record(path_in_repo) or {}).get("recipe_hash")


def bound(attempt: int) -> float:
    """The largest delay after failed try number `attempt` (1-based): capped exponential."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A publish folder: a record, a card and a (fake) weights file."""
    out = tmp_path / "publish"
    out.mkdir()
    (out / RECORD_FILE).write_text(json.dumps({"recipe_hash": RECIPE_HASH, "inputs": {"x": 1}}))
    (out / "README.md").write_text("---\nbase_model_relation: merge\n---\n")
    (out / "model.safetensors").write_bytes(b"\0" * 64)
    return out


@pytest.fixture
def sleeps() -> list[float]:
    return []


def hub(tmp_path: Path, sleeps: list[float], **failures: list[int]) -> tuple[HubTarget, FakeHubApi]:
    api = FakeHubApi(download_dir=tmp_path / "downloads", failures=dict(failures))
    return HubTarget(REPO, api=api, sleep=sleeps.append), api


# ------------------------------------------------------------------------------------------------
# The fake itself behaves like the Hub where HubTarget looks


def test_fake_raises_real_hub_errors(tmp_path):
    api = FakeHubApi(download_dir=tmp_path, failures={"create_repo": [429]})
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(REPO, exist_ok=True)
    assert isinstance(info.value, HfHubHTTPError) and info.value.response.status_code == 429
    assert api.create_repo(REPO, exist_ok=True) == f"https://huggingface.co/{REPO}"
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(REPO)  # exists, exist_ok=False
    assert info.value.response.status_code == 409
    with pytest.raises(TypeError):  # a keyword HubTarget does not use is refused, not ignored
        api.upload_folder(repo_id=REPO, folder_path=tmp_path, token="hf_x")


# ------------------------------------------------------------------------------------------------
# HubTarget: retries, give-ups, one commit


@pytest.mark.parametrize("status", [412, 429, 500, 502, 503, 504])
def test_retryable_status_is_retried_then_succeeds(tmp_path, folder, sleeps, status):
    target, api = hub(tmp_path, sleeps, upload_folder=[status, status])
    url = target.publish(folder, CELL, "bakery-slurm: test")
    assert len(api.calls_to("upload_folder")) == 3
    assert len(api.commits) == 1  # one commit, after two refused tries
    commit = api.commits[0]
    assert url == commit.commit_url and commit.path_in_repo == CELL
    assert set(commit.files) == {f"{CELL}/{n}" for n in (RECORD_FILE, "README.md", "model.safetensors")}
    assert len(sleeps) == 2 and all(0 <= d <= bound(i) for i, d in enumerate(sleeps, 1))


def test_mixed_failures_on_every_call_then_one_commit(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps, create_repo=[503], upload_folder=[412, 429, 503])
    target.publish(folder, CELL, "msg")
    assert len(api.calls_to("create_repo")) == 2 and len(api.calls_to("upload_folder")) == 4
    assert len(api.commits) == 1 and api.commits[0].message == "msg"
    assert len(sleeps) == 1 + 3
    assert all(call["exist_ok"] is True for call in api.calls_to("create_repo"))


def test_connection_errors_are_retried(tmp_path, folder, sleeps):
    import httpx2

    target, api = hub(tmp_path, sleeps, upload_folder=[httpx2.ConnectError("proxy reset"),
                                                       httpx2.ReadTimeout("slow proxy")])
    target.publish(folder, CELL, "msg")
    assert len(api.calls_to("upload_folder")) == 3 and len(api.commits) == 1
    assert len(sleeps) == 2


def test_a_repush_leaves_exactly_the_new_files(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    target.publish(folder, CELL, "first")
    (folder / "model-00002-of-00002.safetensors").unlink()
    api.repos[REPO]["other-cell/README.md"] = b"untouched"
    target.publish(folder, CELL, "second")
    assert sorted(api.repos[REPO]) == sorted(
        [f"{CELL}/{n}" for n in (RECORD_FILE, "README.md", "model.safetensors")]
        + ["other-cell/README.md"])
    assert all(call["delete_patterns"] == "*" for call in api.calls_to("upload_folder"))


def test_gives_up_after_max_tries(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps, upload_folder=[503] * MAX_TRIES)
    with pytest.raises(PushError, match=rf"{REPO}: could not upload: HTTP 503"):
        target.publish(folder, CELL, "msg")
    assert len(api.calls_to("upload_folder")) == MAX_TRIES
    assert api.commits == [] and len(sleeps) == MAX_TRIES - 1


def test_succeeds_on_the_last_try(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps, upload_folder=[429] * (MAX_TRIES - 1))
    target.publish(folder, CELL, "msg")
    assert len(api.commits) == 1 and len(api.calls_to("upload_folder")) == MAX_TRIES


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(tmp_path, folder, sleeps, status):
    target, api = hub(tmp_path, sleeps, upload_folder=[status])
    with pytest.raises(PushError, match=rf"HTTP {status}"):
        target.publish(folder, CELL, "msg")
    assert len(api.calls_to("upload_folder")) == 1 and api.commits == [] and sleeps == []


def test_unauthorised_create_repo_stops_before_any_upload(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps, create_repo=[401])
    with pytest.raises(PushError, match=r"could not create the repo: HTTP 401"):
        target.publish(folder, CELL, "msg")
    assert api.calls_to("upload_folder") == [] and sleeps == []


def test_backoff_is_capped_exponential_with_full_jitter(tmp_path, folder, sleeps, monkeypatch):
    """Each delay is drawn from uniform(0, min(cap, base * 2**attempt)): record the draws."""
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    tries = 9  # enough failures to reach the cap
    monkeypatch.setattr(push, "MAX_TRIES", tries)
    monkeypatch.setattr(push.random, "uniform", uniform)
    target, api = hub(tmp_path, sleeps, upload_folder=[503] * (tries - 1))
    target.publish(folder, CELL, "msg")
    expected = [bound(attempt) for attempt in range(1, tries)]
    assert draws == [(0, b) for b in expected]
    assert sleeps == expected
    assert expected[:3] == [4.0, 8.0, 16.0] and expected[-1] == BACKOFF_CAP_S
    assert len(api.commits) == 1


def test_real_jitter_stays_within_bounds(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps, upload_folder=[503] * (MAX_TRIES - 1))
    target.publish(folder, CELL, "msg")
    assert len(sleeps) == MAX_TRIES - 1
    assert all(0 <= d <= bound(i) for i, d in enumerate(sleeps, 1))


# ------------------------------------------------------------------------------------------------
# Reading what is published (the pipeline skips a push when recipe hash and inputs match)


def test_hub_published_record(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps)
    assert recipe_hash(target, CELL) is None  # no repo: RepositoryNotFoundError
    api.create_repo(REPO)
    assert target.published_record(CELL) is None  # repo, no file: RemoteEntryNotFoundError
    target.publish(folder, CELL, "msg")
    assert recipe_hash(target, CELL) == RECIPE_HASH
    assert target.published_record(CELL) == {"recipe_hash": RECIPE_HASH, "inputs": {"x": 1}}
    assert recipe_hash(target, "1b-std/eng-nob__ties") is None
    assert api.calls_to("hf_hub_download")[-1]["filename"] == f"1b-std/eng-nob__ties/{RECORD_FILE}"
    api.repos[REPO][f"{CELL}/{RECORD_FILE}"] = b"not json"
    assert target.published_record(CELL) is None


def test_hub_published_record_retries_and_gives_up(tmp_path, folder, sleeps):
    target, api = hub(tmp_path, sleeps, hf_hub_download=[429])
    api.repos[REPO] = {f"{CELL}/{RECORD_FILE}": json.dumps({"recipe_hash": "h"}).encode()}
    assert recipe_hash(target, CELL) == "h" and len(sleeps) == 1
    api.failures["hf_hub_download"] = [401]
    with pytest.raises(PushError, match=r"could not read the published record: HTTP 401"):
        recipe_hash(target, CELL)


def test_dir_target_publishes_and_reads_back(tmp_path, folder):
    target = DirTarget(tmp_path / "published")
    assert target.published_record(CELL) is None and recipe_hash(target, CELL) is None
    where = target.publish(folder, CELL, "ignored")
    assert Path(where) == tmp_path / "published" / CELL
    assert sorted(p.name for p in Path(where).iterdir()) == sorted(p.name for p in folder.iterdir())
    assert recipe_hash(target, CELL) == RECIPE_HASH
    # A second publish replaces the folder whole (no stale files, no staging folder left).
    (folder / "model.safetensors").unlink()
    (folder / RECORD_FILE).write_text(json.dumps({"recipe_hash": "new"}))
    target.publish(folder, CELL, "ignored")
    assert not (Path(where) / "model.safetensors").exists()
    assert recipe_hash(target, CELL) == "new"
    assert not [p for p in Path(where).parent.iterdir() if p.name.endswith(".partial")]


# ------------------------------------------------------------------------------------------------
# A whole cell pushed to a (fake) Hub repo


@pytest.mark.e2e
def test_cell_pushed_to_hub_once(tmp_path, write_tiny_matrix, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bakery_slurm.matrix import expand, load_matrix
    from bakery_slurm.pipeline import run_cell

    secret = "hf_secret_test_value"
    monkeypatch.setenv("HF_TOKEN", secret)
    matrix = load_matrix(write_tiny_matrix(tmp_path / "m", push=f"hub:{REPO}", methods=("ties",)))
    cell = {c.id: c for c in expand(matrix)}["tiny1b-std/eng-nob__ties"]
    api = FakeHubApi(download_dir=tmp_path / "downloads")

    result = run_cell(cell, matrix.work_dir, device="cpu", hub_api=api)
    assert result["status"] == "done" and result["stages"]["push"]["status"] == "done"
    assert len(api.commits) == 1 and len(api.calls_to("upload_folder")) == 1
    commit = api.commits[0]
    assert commit.repo_id == REPO and commit.path_in_repo == cell.id
    assert result["stages"]["push"]["target"] == commit.commit_url
    names = {name.removeprefix(f"{cell.id}/") for name in commit.files}
    assert all(name.startswith(f"{cell.id}/") for name in commit.files)
    assert {"README.md", RECORD_FILE, "config.json", "model.safetensors", "mergekit_config.yml",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads(commit.files[f"{cell.id}/{RECORD_FILE}"])["recipe_hash"] == cell.recipe_hash
    assert not [n for n, data in commit.files.items() if secret.encode() in data]

    # The uploaded folder is a loadable model, as the card's "How to load" says.
    clone = api.materialize(REPO, tmp_path / "clone")
    model, info = AutoModelForCausalLM.from_pretrained(clone, subfolder=cell.id,
                                                       output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert AutoTokenizer.from_pretrained(clone, subfolder=cell.id)("Hei").input_ids

    # Rerun: the repo holds this recipe hash and these inputs: no second commit.
    again = run_cell(cell, matrix.work_dir, device="cpu", hub_api=api)
    assert again["stages"]["push"]["status"] == "skipped"
    assert len(api.commits) == 1 and len(api.calls_to("upload_folder")) == 1

    # A published record from other inputs (say, an older adapter) is replaced: one more commit.
    record_name = f"{cell.id}/{RECORD_FILE}"
    stale = json.loads(api.repos[REPO][record_name])
    stale["inputs"]["adapters"]["nob"]["sha256"] = "0" * 64
    api.repos[REPO][record_name] = json.dumps(stale).encode()
    third = run_cell(cell, matrix.work_dir, device="cpu", hub_api=api)
    assert third["stages"]["push"]["status"] == "done" and len(api.commits) == 2
    assert json.loads(api.repos[REPO][record_name])["inputs"] == result["stages"]["bake"]["inputs"]
