"""push targets: Hub retries, conflicts, transfer failures and reads through `FakeHubApi`
(tests/fakes.py), `dir:` targets, the root card they keep, backoff bounds, and (marked e2e) a
whole cell pushed to a fake Hub repo."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import httpx2
import pytest
from fakes import ANSWER_LOST, TRANSFER_FAILURE, FakeHubApi, http_error
from huggingface_hub.errors import HfHubHTTPError

from bakery_slurm.errors import PushError
from bakery_slurm.matrix import PushTarget
from bakery_slurm.rootcard import MANUAL_END, MANUAL_START, CardContext
from bakery_slurm.stages import push
from bakery_slurm.stages.push import (
    BACKOFF_BASE_S,
    BACKOFF_CAP_S,
    MAX_RETRY_AFTER_S,
    MAX_TRIES,
    RECORD_FILE,
    DirTarget,
    HubTarget,
    Publication,
    public_inputs,
)

REPO = "owner/name"
CELL = "4b-std/eng-nob__ties"
RECIPE_HASH = "ab" * 32


def record(cell_id: str = CELL, recipe_hash: str = RECIPE_HASH) -> dict:
    """A complete `bakery.json` record, as `push.prepare` writes it."""
    size_variant, method = cell_id.split("/")[0], cell_id.rsplit("__", 1)[1]
    size, variant = size_variant.split("-")
    hub = {"repo": "org/base", "subfolder": None, "revision": None, "commit": "c" * 40}
    return {"cell": cell_id, "size": size, "variant": variant, "method": method,
            "adapters": ["eng", "nob"], "recipe_hash": recipe_hash, "dtype": "bfloat16",
            "inputs": {"base": hub, "adapters": {
                "eng": {**hub, "repo": "org/adapters", "subfolder": f"{size_variant}/eng"},
                "nob": {**hub, "repo": "org/adapters", "subfolder": f"{size_variant}/nob"}}},
            "parameters": {"weight": {"eng": 0.5, "nob": 0.5}},
            "base_card": {"license": "gemma", "language": ["no", "en"]},
            "output": {"content_sha256": "d" * 64, "files": {}},
            "device": "cpu", "fallback_reason": None, "versions": {"mergekit": "0.1.5"}}


def publish_folder(root: Path, cell_id: str = CELL, weights: bytes = b"\0" * 64) -> Publication:
    """A publish folder: a record, a card and a (fake) weights file."""
    out = root / "publish" / cell_id
    out.mkdir(parents=True)
    rec = record(cell_id)
    (out / RECORD_FILE).write_text(json.dumps(rec))
    (out / "README.md").write_text("---\nbase_model_relation: merge\n---\n")
    (out / "model.safetensors").write_bytes(weights)
    return Publication(cell_id, out, rec)


def render_root(target: str = f"hub:{REPO}"):
    kind, _, location = target.partition(":")
    return push.root_renderer(PushTarget(kind, location), CardContext("merges", ("1b", "4b")))


def bound(attempt: int) -> float:
    """The largest delay after failed try number `attempt` (1-based): capped exponential."""
    return min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt)


@pytest.fixture
def item(tmp_path: Path) -> Publication:
    return publish_folder(tmp_path)


@pytest.fixture
def sleeps() -> list[float]:
    return []


def hub(tmp_path: Path, sleeps: list[float], **failures: list) -> tuple[HubTarget, FakeHubApi]:
    api = FakeHubApi(download_dir=tmp_path / "downloads", failures=dict(failures))
    return HubTarget(REPO, api=api, sleep=sleeps.append), api


def cells_in(card: str) -> list[str]:
    """The (size, variant, methods) rows of a root card's table."""
    return [line for line in card.splitlines() if line.startswith("| 1b") or line.startswith("| 4b")]


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
        api.create_commit(REPO, [], commit_message="m", token="hf_x")
    assert http_error(429, retry_after=7).response.headers["Retry-After"] == "7"


def test_fake_commit_on_a_moved_branch_is_refused_with_412(tmp_path):
    from huggingface_hub import CommitOperationAdd

    api = FakeHubApi(download_dir=tmp_path)
    api.create_repo(REPO)
    parent = api.repo_info(REPO).sha
    api.put(REPO, {"other": b"x"})
    with pytest.raises(HfHubHTTPError) as info:
        api.create_commit(REPO, [CommitOperationAdd("a", b"1")], commit_message="m",
                          parent_commit=parent)
    assert info.value.response.status_code == 412 and "a" not in api.repos[REPO]


def test_fake_download_of_main_reads_a_stale_cache_on_a_connection_error(tmp_path):
    """The hazard HubTarget avoids: huggingface_hub returns the cached copy of main silently."""
    api = FakeHubApi(download_dir=tmp_path)
    api.create_repo(REPO)
    api.put(REPO, {"f": b"old"})
    assert Path(api.hf_hub_download(REPO, "f")).read_bytes() == b"old"
    api.put(REPO, {"f": b"new"})
    api.failures["hf_hub_download"] = [httpx2.ConnectError("proxy reset")]
    assert Path(api.hf_hub_download(REPO, "f")).read_bytes() == b"old"


# ------------------------------------------------------------------------------------------------
# HubTarget: retries, give-ups, one commit


@pytest.mark.parametrize("status", [429, 500, 502, 503, 504])
def test_retryable_status_is_retried_then_succeeds(tmp_path, item, sleeps, status):
    target, api = hub(tmp_path, sleeps, create_commit=[status, status])
    url = target.publish([item], "bakery-slurm: test", render_root())
    assert len(api.calls_to("create_commit")) == 3
    assert len(api.commits) == 2  # the repo's initial commit, then ours after two refused tries
    commit = api.commits[-1]
    assert url == commit.commit_url and commit.message == "bakery-slurm: test"
    assert set(commit.files) == {f"{CELL}/{n}" for n in (RECORD_FILE, "README.md", "model.safetensors")} | {"README.md"}
    assert len(sleeps) == 2 and all(0 <= d <= bound(i) for i, d in enumerate(sleeps, 1))


def test_mixed_failures_on_every_call_then_one_commit(tmp_path, item, sleeps):
    # list_repo_tree fails as it is iterated (HfApi's fetches its pages so): retried all the same
    target, api = hub(tmp_path, sleeps, create_repo=[503], repo_info=[502], list_repo_tree=[503],
                      preupload_lfs_files=[429], create_commit=[503, 500])
    target.publish([item], "msg", render_root())
    assert len(api.calls_to("create_repo")) == 2 and len(api.calls_to("create_commit")) == 3
    assert len(api.calls_to("list_repo_tree")) == 2
    assert [c.message for c in api.commits] == ["initial commit", "msg"]
    assert len(sleeps) == 6
    assert all(call["exist_ok"] is True for call in api.calls_to("create_repo"))


def test_a_transfer_failure_is_retried_and_resumes(tmp_path, sleeps):
    item = publish_folder(tmp_path)
    (item.folder / "model-00002.safetensors").write_bytes(b"\1" * 64)
    target, api = hub(tmp_path, sleeps, preupload_lfs_files=[TRANSFER_FAILURE])
    target.publish([item], "msg", render_root())
    assert len(api.calls_to("preupload_lfs_files")) == 2 and len(sleeps) == 1
    # The file transferred before the failure is not transferred again.
    files = {f"{CELL}/{n}" for n in (RECORD_FILE, "README.md", "model.safetensors",
                                     "model-00002.safetensors")}
    assert sorted(api.transfers[:-1]) == sorted(files) and api.transfers[-1] == "README.md"
    assert files <= set(api.repos[REPO])


def test_transfer_failures_give_up_naming_the_file(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps, preupload_lfs_files=[TRANSFER_FAILURE] * MAX_TRIES)
    (item.folder / "second").write_bytes(b"2")
    with pytest.raises(PushError, match=r"could not upload: transfer failed: Error while uploading"):
        target.publish([item], "msg", render_root())
    assert api.calls_to("create_commit") == []


def test_a_refused_token_during_a_transfer_is_not_retried(tmp_path, item, sleeps):
    class XetAuthenticationError(PermissionError):  # as hf_xet's: a PermissionError
        pass

    target, api = hub(tmp_path, sleeps,
                      preupload_lfs_files=[XetAuthenticationError("token refused")])
    with pytest.raises(PushError, match=r"could not upload: transfer failed: token refused"):
        target.publish([item], "msg", render_root())
    assert sleeps == [] and len(api.calls_to("preupload_lfs_files")) == 1


def test_offline_mode_is_said_not_retried(tmp_path, item, sleeps):
    from huggingface_hub.errors import OfflineModeIsEnabled

    target, api = hub(tmp_path, sleeps, repo_info=[OfflineModeIsEnabled("offline")])
    with pytest.raises(PushError, match=r"could not read the head commit: HF_HUB_OFFLINE is set"):
        target.published_record(CELL)
    assert sleeps == []


def test_a_429_waits_as_long_as_retry_after_says(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps, create_commit=[http_error(429, retry_after=90)])
    target.publish([item], "msg", render_root())
    assert sleeps == [pytest.approx(90, abs=bound(1))] and sleeps[0] >= 90
    assert len(api.commits) == 2


def test_a_429_asking_for_longer_than_we_wait_stops_and_says_push_later(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps,
                      create_commit=[http_error(429, retry_after=int(MAX_RETRY_AFTER_S) + 1)])
    with pytest.raises(PushError, match=r"rate limited for 601 s .*bakery-slurm push"):
        target.publish([item], "msg", render_root())
    assert sleeps == []


class Clock:
    """A monotonic clock that only the fake sleep moves (no wall clock in these tests)."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_retries_give_up_before_the_deadline_not_at_the_task_time_limit(tmp_path, item):
    """Five 429s asking for 10 minutes each: 50 minutes of a 1 hour task's time, after which
    SLURM kills it mid-push (no record of why, and `bakery-slurm push` will not take the cell)."""
    clock = Clock()
    api = FakeHubApi(download_dir=tmp_path / "downloads",
                     failures={"create_commit": [http_error(429, retry_after=600)] * 5})
    target = HubTarget(REPO, api=api, sleep=clock.sleep, clock=clock, deadline=1000.0)
    with pytest.raises(PushError, match=r"could not commit: HTTP 429.*waiting \d+ s more would run "
                                        r"past the task's time limit.*bakery-slurm push"):
        target.publish([item], "msg", render_root())
    assert clock.sleeps == [pytest.approx(600, abs=bound(1))] and clock.now <= 1000.0
    assert len(api.commits) == 1


def test_conflicts_give_up_before_the_deadline(tmp_path, item, monkeypatch):
    monkeypatch.setattr(push.random, "uniform", lambda low, high: high)
    clock = Clock()
    api = FakeHubApi(download_dir=tmp_path / "downloads")
    api.create_repo(REPO)
    # Another task commits between every read of main and our commit.
    api.before["create_commit"] = lambda: api.put(REPO, {"other/README.md": b"x"})
    target = HubTarget(REPO, api=api, sleep=clock.sleep, clock=clock, deadline=60.0)
    with pytest.raises(PushError, match=r"main moved.*would run past the task's time limit"):
        target.publish([item], "msg", render_root())
    assert clock.now <= 60.0 and len(api.calls_to("create_commit")) < push.MAX_CONFLICTS


def test_connection_errors_are_retried(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps, create_commit=[httpx2.ConnectError("proxy reset"),
                                                       httpx2.ReadTimeout("slow proxy")])
    target.publish([item], "msg", render_root())
    assert len(api.calls_to("create_commit")) == 3 and len(api.commits) == 2
    assert len(sleeps) == 2


def test_a_repush_leaves_exactly_the_new_files(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps)
    (item.folder / "model-00002-of-00002.safetensors").write_bytes(b"old shard")
    target.publish([item], "first", render_root())
    (item.folder / "model-00002-of-00002.safetensors").unlink()
    api.put(REPO, {f"{CELL}-density0.3/README.md": b"a sibling cell", "other/README.md": b"x"})
    target.publish([item], "second", render_root())
    assert sorted(api.repos[REPO]) == sorted(
        [f"{CELL}/{n}" for n in (RECORD_FILE, "README.md", "model.safetensors")]
        + [f"{CELL}-density0.3/README.md", "other/README.md", ".gitattributes", "README.md"])


def test_gives_up_after_max_tries(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps, create_commit=[503] * MAX_TRIES)
    with pytest.raises(PushError, match=rf"{REPO}: could not commit: HTTP 503"):
        target.publish([item], "msg", render_root())
    assert len(api.calls_to("create_commit")) == MAX_TRIES
    assert len(api.commits) == 1 and len(sleeps) == MAX_TRIES - 1


def test_a_gateway_page_instead_of_json_is_retried(tmp_path, item, sleeps):
    """create_commit first posts README.md to /api/validate-yaml and reads the answer as JSON before
    its status (hf_api.py `_validate_yaml`): a proxy's or load balancer's HTML 502 page raises
    json.JSONDecodeError there, not HfHubHTTPError."""
    page = json.JSONDecodeError("Expecting value", "<html>502 Bad Gateway</html>", 0)
    target, api = hub(tmp_path, sleeps, create_commit=[page])
    target.publish([item], "msg", render_root())
    assert len(api.calls_to("create_commit")) == 2 and len(api.commits) == 2 and len(sleeps) == 1


def test_card_metadata_the_hub_refuses_stops_with_a_push_error(tmp_path, item, sleeps):
    """The Hub's validate-yaml refusal reaches us as ValueError (hf_api.py `_validate_yaml`)."""
    refusal = ValueError('Invalid metadata in README.md.\n- "license" must be one of [apache-2.0, '
                         'mit, ...]')
    target, api = hub(tmp_path, sleeps, create_commit=[refusal])
    with pytest.raises(PushError, match=r"could not commit: Invalid metadata in README.md\. "
                                        r'- "license" must be one of'):
        target.publish([item], "msg", render_root())
    assert len(api.calls_to("create_commit")) == 1 and sleeps == []


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried(tmp_path, item, sleeps, status):
    target, api = hub(tmp_path, sleeps, create_commit=[status])
    with pytest.raises(PushError, match=rf"HTTP {status}"):
        target.publish([item], "msg", render_root())
    assert len(api.calls_to("create_commit")) == 1 and len(api.commits) == 1 and sleeps == []


def test_unauthorised_create_repo_stops_before_any_upload(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps, create_repo=[401])
    with pytest.raises(PushError, match=r"could not create the repo: HTTP 401"):
        target.publish([item], "msg", render_root())
    assert api.calls_to("preupload_lfs_files") == [] and sleeps == []


def test_backoff_is_capped_exponential_with_full_jitter(tmp_path, item, sleeps, monkeypatch):
    """Each delay is drawn from uniform(0, min(cap, base * 2**attempt)): record the draws."""
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return high

    tries = 9  # enough failures to reach the cap
    monkeypatch.setattr(push, "MAX_TRIES", tries)
    monkeypatch.setattr(push.random, "uniform", uniform)
    target, api = hub(tmp_path, sleeps, create_commit=[503] * (tries - 1))
    target.publish([item], "msg", render_root())
    expected = [bound(attempt) for attempt in range(1, tries)]
    assert draws == [(0, b) for b in expected]
    assert sleeps == expected
    assert expected[:3] == [4.0, 8.0, 16.0] and expected[-1] == BACKOFF_CAP_S
    assert len(api.commits) == 2


def test_real_jitter_stays_within_bounds(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps, create_commit=[503] * (MAX_TRIES - 1))
    target.publish([item], "msg", render_root())
    assert len(sleeps) == MAX_TRIES - 1
    assert all(0 <= d <= bound(i) for i, d in enumerate(sleeps, 1))


# ------------------------------------------------------------------------------------------------
# Concurrent commits and the root card


def test_a_commit_that_loses_a_race_reads_again_and_keeps_both_cells(tmp_path, sleeps):
    target, api = hub(tmp_path, sleeps)
    first = publish_folder(tmp_path / "a", "1b-std/eng-nob__linear")
    second = publish_folder(tmp_path / "b", "4b-std/eng-nob__ties")
    # Another task commits its cell between our read of main and our commit.
    api.before["create_commit"] = lambda: (api.before.pop("create_commit"),
                                           HubTarget(REPO, api=api).publish([first], "them", render_root()))
    target.publish([second], "us", render_root())
    assert [c.message for c in api.commits] == ["initial commit", "them", "us"]
    assert [c["parent_commit"] is not None for c in api.calls_to("create_commit")] == [True] * 3
    card = api.repos[REPO]["README.md"].decode()
    assert cells_in(card) == ["| 1b | std | linear |", "| 4b | std | ties |"]
    assert len(sleeps) == 1


@pytest.mark.parametrize("hashed", [False, True], ids=["hashed-here", "hashed-when-verified"])
def test_a_commit_whose_answer_was_lost_is_not_committed_again(tmp_path, sleeps, hashed):
    """The Hub took the commit, the connection dropped before its answer: the retry meets a
    moved main, reads it, finds there exactly what it meant to commit (the weights by their LFS
    pointer, the rest by content, and the card) and returns that commit."""
    item = publish_folder(tmp_path)
    if hashed:
        weights = item.folder / "model.safetensors"
        item.record["output"]["files"] = {"model.safetensors": {
            "size": 64, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}}
    target, api = hub(tmp_path, sleeps, create_commit=[ANSWER_LOST])
    url = target.publish([item], "us", render_root())
    assert [c.message for c in api.commits] == ["initial commit", "us"]
    assert url == api.commits[-1].commit_url
    assert len(api.calls_to("create_commit")) == 2  # the lost one, and the retry refused with 412


def test_a_push_finding_other_content_at_its_paths_commits_its_own(tmp_path, sleeps):
    """Main holding the cell's paths is not enough: another push of the cell with other
    weights landed meanwhile, and ours goes over it."""
    ours = publish_folder(tmp_path / "ours", weights=b"\1" * 64)
    theirs = publish_folder(tmp_path / "theirs", weights=b"\2" * 64)
    target, api = hub(tmp_path, sleeps)
    api.before["create_commit"] = lambda: (api.before.pop("create_commit"),
                                           HubTarget(REPO, api=api).publish([theirs], "them", render_root()))
    target.publish([ours], "us", render_root())
    assert [c.message for c in api.commits] == ["initial commit", "them", "us"]
    assert api.repos[REPO][f"{CELL}/model.safetensors"] == b"\1" * 64


@pytest.mark.parametrize("n", [2, 6])
def test_concurrent_pushes_of_n_cells_end_with_all_n_in_the_card(tmp_path, n):
    api = FakeHubApi(download_dir=tmp_path / "downloads")
    api.create_repo(REPO)
    ids = [f"{size}-{variant}/eng-nob__{method}" for size in ("1b", "4b")
           for variant in ("std", "open") for method in ("linear", "ties")][:n]
    items = [publish_folder(tmp_path / str(i), cell_id) for i, cell_id in enumerate(ids)]
    # Every thread reads main before any commits: all but one commit must conflict at least once.
    barrier, waited = threading.Barrier(n), threading.local()

    def hold_until_all_have_read() -> None:
        if not getattr(waited, "done", False):
            waited.done = True
            barrier.wait(timeout=30)

    api.before["create_commit"] = hold_until_all_have_read
    errors: list[BaseException] = []

    def publish(item: Publication) -> None:
        try:
            HubTarget(REPO, api=api, sleep=lambda s: None).publish([item], item.cell_id, render_root())
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=publish, args=(item,)) for item in items]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    conflicts = len(api.calls_to("create_commit")) - n
    assert conflicts >= n - 1
    card = api.repos[REPO]["README.md"].decode()
    assert len(cells_in(card)) == len({i.split("/")[0] for i in ids})
    assert f"Total: {n} merged checkpoint" in card
    assert all(f"{i}/{RECORD_FILE}" in api.repos[REPO] for i in ids)


def test_a_conflict_downloads_only_the_records_committed_meanwhile(tmp_path, item, sleeps):
    """Each try lists the repo once with blob ids and downloads only what changed since the last
    read: 100 tasks re-reading 100 records per conflict would spend the account's requests (about
    1,000 per 5 minutes). The card is still rendered from exactly the records at the commit."""
    published = {f"1b-v{i}/eng-nob__ties": record(f"1b-v{i}/eng-nob__ties") for i in range(10)}
    target, api = hub(tmp_path, sleeps)
    api.seed(REPO, {**{f"{cell}/{RECORD_FILE}": json.dumps(rec).encode()
                       for cell, rec in published.items()}, "README.md": b"card"})
    # Other tasks commit between our read and our commit twice: a new cell, then a cell again.
    added, changed = "1b-v10/eng-nob__ties", {**published["1b-v3/eng-nob__ties"], "device": "cuda"}
    theirs = [{f"{added}/{RECORD_FILE}": json.dumps(record(added)).encode(),
               "README.md": b"card with v10"},
              {f"1b-v3/eng-nob__ties/{RECORD_FILE}": json.dumps(changed).encode(),
               "README.md": b"card with v3 on cuda"}]
    api.before["create_commit"] = lambda: theirs and api.put(REPO, theirs.pop(0))
    rendered: list[dict] = []

    def render(records: dict, previous: str | None) -> str:
        rendered.append(records)
        return render_root()(records, previous)

    target.publish([item], "us", render)
    downloads = [call["filename"] for call in api.calls_to("hf_hub_download")]
    assert downloads == sorted(f"{cell}/{RECORD_FILE}" for cell in published) + ["README.md"] + [
        f"{added}/{RECORD_FILE}", "README.md",  # the cell another task added
        f"1b-v3/eng-nob__ties/{RECORD_FILE}", "README.md"]  # the cell another task pushed again
    # three tries, each reading the head and listing the repo once
    assert len(sleeps) == 2 and len(api.calls_to("create_commit")) == 3
    assert len(api.calls_to("repo_info")) == len(api.calls_to("list_repo_tree")) == 3
    assert rendered[-1] == {**published, added: record(added), "1b-v3/eng-nob__ties": changed,
                            CELL: item.record}


def test_the_notes_section_survives_every_commit(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps)
    target.publish([item], "first", render_root())
    card = api.repos[REPO]["README.md"].decode()
    edited = card.replace(card[card.index(MANUAL_START):card.index(MANUAL_END)],
                          MANUAL_START + "\nNorBelebele: 69.9%\n")
    api.put(REPO, {"README.md": edited.encode()})
    other = publish_folder(tmp_path / "o", "1b-std/eng-nob__ties")
    target.publish([other], "second", render_root())
    card = api.repos[REPO]["README.md"].decode()
    assert "NorBelebele: 69.9%" in card and "Total: 2 merged checkpoints." in card
    assert target.root_card() == card


# ------------------------------------------------------------------------------------------------
# Reading what is published (the pipeline skips a push when recipe hash and inputs match)


def test_hub_published_record(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps)
    assert target.published_record(CELL) is None  # no repo
    api.create_repo(REPO)
    assert target.published_record(CELL) is None  # repo, no file
    target.publish([item], "msg", render_root())
    assert target.published_record(CELL) == item.record
    assert target.published_records() == {CELL: item.record}
    assert target.published_record("1b-std/eng-nob__ties") is None
    api.put(REPO, {f"{CELL}/{RECORD_FILE}": b"not json"})
    assert target.published_record(CELL) is None


def test_the_published_record_is_never_read_from_a_stale_cache(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps)
    target.publish([item], "msg", render_root())
    assert target.published_record(CELL)["recipe_hash"] == RECIPE_HASH
    api.hf_hub_download(REPO, f"{CELL}/{RECORD_FILE}")  # main's copy is cached now
    api.put(REPO, {f"{CELL}/{RECORD_FILE}": json.dumps(record(recipe_hash="new")).encode()})
    # The Hub's file server drops the connection once: the stale copy must not be believed.
    api.failures["hf_hub_download"] = [httpx2.ConnectError("reset")]
    assert target.published_record(CELL)["recipe_hash"] == "new"
    assert len(sleeps) == 1
    assert all(call["revision"] == api.head(REPO) for call in api.calls_to("hf_hub_download")[-2:])


def test_hub_published_record_retries_and_gives_up(tmp_path, item, sleeps):
    target, api = hub(tmp_path, sleeps, repo_info=[429])
    target.publish([item], "msg", render_root())
    assert len(sleeps) == 1
    api.failures["repo_info"] = [401]
    with pytest.raises(PushError, match=r"could not read the head commit: HTTP 401"):
        target.published_record(CELL)


@pytest.mark.parametrize("can_link", [True, False])
def test_dir_target_links_weights_copies_the_rest_and_syncs_every_file(tmp_path, item, monkeypatch,
                                                                       can_link):
    synced = []
    monkeypatch.setattr(push.fsutil, "fsync_path", lambda path: synced.append(Path(path).name))
    if not can_link:  # another filesystem than the work folder's
        def refuse(*args, **kwargs):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        monkeypatch.setattr(push.fsutil.os, "link", refuse)
    where = Path(DirTarget(tmp_path / "published").publish([item], "x", render_root("dir:/x")))
    names = sorted(p.name for p in item.folder.iterdir())
    assert all((where / n).read_bytes() == (item.folder / n).read_bytes() for n in names)
    assert [n for n in names if os.path.samefile(where / n, item.folder / n)] == (
        ["model.safetensors"] if can_link else [])
    assert set(names) <= set(synced)  # each on disk before the folder was renamed into place


def test_dir_target_publishes_reads_back_and_keeps_a_root_card(tmp_path, item):
    root = tmp_path / "published"
    target = DirTarget(root)
    assert target.published_record(CELL) is None and target.published_records() == {}
    where = target.publish([item], "ignored", render_root(f"dir:{root}"))
    assert Path(where) == root / CELL
    assert sorted(p.name for p in Path(where).iterdir()) == sorted(p.name for p in item.folder.iterdir())
    assert target.published_record(CELL) == item.record
    card = (root / "README.md").read_text()
    assert cells_in(card) == ["| 4b | std | ties |"] and "base_model:\n- org/base\n" in card
    (root / "README.md").write_text(card.replace(MANUAL_START, MANUAL_START + "\nmy notes"))
    # A second publish replaces the folder whole (no stale files, no staging folder left).
    (item.folder / "model.safetensors").unlink()
    (item.folder / RECORD_FILE).write_text(json.dumps(record(recipe_hash="new")))
    other = publish_folder(tmp_path / "o", "1b-std/eng-nob__ties")
    target.publish([Publication(CELL, item.folder, record(recipe_hash="new")), other], "x",
                   render_root(f"dir:{root}"))
    assert not (Path(where) / "model.safetensors").exists()
    assert target.published_record(CELL)["recipe_hash"] == "new"
    assert not [p for p in Path(where).parent.iterdir() if p.name.endswith(".partial")]
    card = (root / "README.md").read_text()
    assert "my notes" in card and cells_in(card) == ["| 1b | std | ties |", "| 4b | std | ties |"]


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
    assert len(api.commits) == 2 and len(api.calls_to("create_commit")) == 1  # after the initial
    commit = api.commits[-1]
    assert result["stages"]["push"]["target"] == commit.commit_url
    assert all(name.startswith(f"{cell.id}/") for name in commit.files if name != "README.md")
    names = {name.removeprefix(f"{cell.id}/") for name in commit.files}
    assert {"README.md", RECORD_FILE, "config.json", "model.safetensors", "mergekit_config.yml",
            "tokenizer.json", "tokenizer_config.json"} <= names
    assert json.loads(commit.files[f"{cell.id}/{RECORD_FILE}"])["recipe_hash"] == cell.recipe_hash
    assert "| tiny1b | std | ties |" in commit.files["README.md"].decode()
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
    assert len(api.commits) == 2 and len(api.calls_to("create_commit")) == 1

    # A published record from other inputs (say, an older adapter) is replaced: one more commit.
    record_name = f"{cell.id}/{RECORD_FILE}"
    stale = json.loads(api.repos[REPO][record_name])
    stale["inputs"]["adapters"]["nob"]["sha256"] = "0" * 64
    api.put(REPO, {record_name: json.dumps(stale).encode()})
    third = run_cell(cell, matrix.work_dir, device="cpu", hub_api=api)
    assert third["stages"]["push"]["status"] == "done" and len(api.commits) == 4
    assert json.loads(api.repos[REPO][record_name])["inputs"] == public_inputs(
        result["stages"]["bake"]["inputs"])


def test_a_dir_target_that_cannot_be_written_says_so(tmp_path, item):
    (tmp_path / "published").write_text("a file, not a folder")
    with pytest.raises(PushError, match=r"published: could not publish: "):
        DirTarget(tmp_path / "published").publish([item], "x", render_root("dir:/x"))


def target_of(kind: str, tmp_path: Path, sleeps: list[float]) -> tuple[Any, str, FakeHubApi | None]:
    """A Hub target (with its fake) or a `dir:` target, and the push target it stands for."""
    if kind == "hub":
        target, api = hub(tmp_path, sleeps)
        return target, f"hub:{REPO}", api
    folder = tmp_path / "published"
    return DirTarget(folder), f"dir:{folder}", None


def card_folder(tmp_path: Path, text: str) -> Path:
    """What `push --cards` publishes for CELL: a folder holding only its README.md."""
    card = tmp_path / "card" / CELL
    card.mkdir(parents=True)
    (card / "README.md").write_text(text)
    return card


@pytest.mark.parametrize("kind", ["hub", "dir"])
def test_a_card_refresh_replaces_the_readme_and_leaves_the_other_files(tmp_path, item, sleeps,
                                                                       kind):
    """`push --cards`: a Publication with replace=False puts its files over the published
    folder; nothing of the cell is deleted."""
    target, where, api = target_of(kind, tmp_path, sleeps)
    folder = tmp_path / "published"

    def published() -> dict[str, bytes]:
        if kind == "hub":
            return {name: data for name, data in api.repos[REPO].items() if name.startswith(CELL)}
        return {f"{CELL}/{p.name}": p.read_bytes() for p in (folder / CELL).iterdir()}

    target.publish([item], "cell", render_root(where))
    before = published()
    card = card_folder(tmp_path, "---\nmodel-index: []\n---\n")
    target.publish([Publication(CELL, card, item.record, replace=False)], "card", render_root(where))
    assert published() == {**before, f"{CELL}/README.md": b"---\nmodel-index: []\n---\n"}


@pytest.mark.parametrize("kind", ["hub", "dir"])
def test_a_card_rendered_from_a_record_since_replaced_is_refused(tmp_path, item, sleeps, kind):
    """A card refresh (replace=False) carries the record it was rendered from: when the cell was
    published again meanwhile (a task, or a teammate's push), the stale card must not go over it."""
    target, where, _ = target_of(kind, tmp_path, sleeps)
    target.publish([item], "cell", render_root(where))
    card = card_folder(tmp_path, "stale")
    stale = record(recipe_hash="cd" * 32)
    with pytest.raises(PushError, match="changed since the card was rendered"):
        target.publish([Publication(CELL, card, stale, replace=False)], "card", render_root(where))
    assert target.published_record(CELL) == item.record


def test_a_dir_target_keeps_the_setgid_bit_of_a_group_folder(tmp_path, item):
    """A shared folder with the setgid bit gives new files its group; the published cell's
    folder must keep the bit, or files written there later (a card refresh) get the writer's
    own group."""
    root = tmp_path / "published"
    root.mkdir()
    os.chmod(root, 0o2775)
    target = DirTarget(root)
    target.publish([item], "cell", render_root(f"dir:{root}"))
    assert os.stat(root / CELL).st_mode & stat.S_ISGID


def test_republishing_to_a_dir_target_never_leaves_a_half_deleted_cell(tmp_path, monkeypatch):
    """The old folder is moved aside before the new one goes in: removing it in place can fail
    half-way (on NFS, a reader's open shard stays behind as .nfsXXXX and rmdir says ENOTEMPTY),
    which left a cell folder with neither weights nor bakery.json."""
    root = tmp_path / "published"
    target = DirTarget(root)
    old = publish_folder(tmp_path / "old")
    target.publish([old], "first", render_root(f"dir:{root}"))
    new_record = record(recipe_hash="cd" * 32)
    new = publish_folder(tmp_path / "new", weights=b"\1" * 64)
    (new.folder / RECORD_FILE).write_text(json.dumps(new_record))
    real_rmdir, published = os.rmdir, str(root / CELL)

    def rmdir_as_on_nfs(path, *args, **kwargs):
        if str(path) == published:
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        return real_rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir_as_on_nfs)
    target.publish([Publication(CELL, new.folder, new_record)], "second", render_root(f"dir:{root}"))
    monkeypatch.setattr(os, "rmdir", real_rmdir)
    assert target.published_record(CELL) == new_record
    assert (root / CELL / "model.safetensors").read_bytes() == b"\1" * 64


def test_a_private_target_never_publishes_into_an_existing_public_repo(tmp_path, item, sleeps):
    api = FakeHubApi(download_dir=tmp_path / "downloads")
    api.seed(REPO, {})
    target = HubTarget(REPO, private=True, api=api, sleep=sleeps.append)
    with pytest.raises(PushError, match=f"{REPO} exists and is public, but push.private = true"):
        target.publish([item], "cell", render_root())
    assert api.transfers == [] and len(api.commits) == 1
    fresh = HubTarget("owner/fresh", private=True, api=api, sleep=sleeps.append)
    fresh.publish([item], "cell", render_root())
    assert api.calls_to("create_repo")[-1]["private"] is True
    assert fresh.published_record(CELL) == item.record


def test_a_dir_target_removes_what_a_killed_publish_left(tmp_path, item):
    root = tmp_path / "published"
    leftover = root / CELL.split("/")[0] / f".{CELL.split('/')[1]}.x1.partial"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"half a copy")
    DirTarget(root).publish([item], "cell", render_root(f"dir:{root}"))
    assert not leftover.exists()
    assert DirTarget(root).published_record(CELL) == item.record
