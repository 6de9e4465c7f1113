"""The root model card: a pure function of the published records and the matrix's order."""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import yaml

from bakery_slurm.rootcard import (
    DEFAULT_NOTES,
    MANUAL_END,
    MANUAL_START,
    CardContext,
    card_metadata,
    front_matter,
    manual_section,
    reference,
    render_root_card,
)
from bakery_slurm.sources import hub_patterns
from bakery_slurm.stages.push import base_card
from support import assert_matches_golden

GOLDEN = Path(__file__).parent / "golden"
REPO = "NbAiLab/nb-gpt-gemma3-bakery-merges-2603"
CONTEXT = CardContext("nb-gpt-gemma3-bakery-merges-2603", sizes=("1b", "4b", "12b"),
                      variants=("std", "open"), methods=("linear", "task_arithmetic", "ties"))


def record(size: str, variant: str, method: str, label: str | None = None, **extra) -> dict:
    """The record of one cell of the seed's matrix, with made-up commits."""
    suffix = "" if variant == "std" else "-open"
    base = {"repo": f"NbAiLab/nb-gpt-gemma3-{size}-instruct-epoch-3-aurora-sft-2603{suffix}-posttrain",
            "subfolder": None, "revision": None, "commit": f"{size}{variant}".ljust(40, "0")}
    adapters = {name: {"repo": "NbAiLab/nb-gpt-gemma3-bakery-adapters-2603",
                       "subfolder": f"{size}-{variant}/{name}", "revision": None,
                       "commit": "a" * 40} for name in ("eng", "nob")}
    params = {"weight": {"eng": 0.5, "nob": 0.5}}
    if method == "ties":
        params["density"] = {"eng": 0.5, "nob": 0.5}
    return {"cell": f"{size}-{variant}/eng-nob__{label or method}", "size": size,
            "variant": variant, "method": method, "adapters": ["eng", "nob"], "dtype": "bfloat16",
            "recipe_hash": "0" * 64, "inputs": {"base": base, "adapters": adapters},
            "parameters": params, "base_card": {"license": "gemma", "language": ["no", "nn", "en"]},
            "output": {"content_sha256": "1" * 64, "files": {}}, "device": "cuda",
            "fallback_reason": None, "versions": {"bakery-slurm": "0.1.0", "mergekit": "0.1.5"},
            **extra}


def seed_records() -> dict[str, dict]:
    """The 14 cells of the seed repo, in a scrambled order (as the Hub lists them)."""
    cells = [record(size, variant, method) for size in ("12b", "1b", "4b")
             for variant in ("open", "std")
             for method in (("ties",) if size == "12b" else ("ties", "linear", "task_arithmetic"))]
    cells[0]["device"], cells[0]["fallback_reason"] = "cpu", "CUDA failed at start: device busy"
    return {r["cell"]: r for r in cells}


def test_the_seed_matrix_renders_like_the_seed_card():
    card = render_root_card(seed_records(), CONTEXT, REPO)
    assert_matches_golden(card, GOLDEN / "root_card_seed.md", "root card of the seed matrix")


def test_table_follows_the_matrix_order_and_counts_the_cells():
    card = render_root_card(seed_records(), CONTEXT, REPO)
    rows = [line for line in card.splitlines() if line.startswith("| 1") or line.startswith("| 4")]
    assert rows == ["| 1b | std | linear, task_arithmetic, ties |",
                    "| 1b | open | linear, task_arithmetic, ties |",
                    "| 4b | std | linear, task_arithmetic, ties |",
                    "| 4b | open | linear, task_arithmetic, ties |",
                    "| 12b | std | ties |", "| 12b | open | ties |"]
    assert "Total: 14 merged checkpoints." in card
    assert "Layout: `<size>-<variant>/eng-nob__<method>`" in card
    assert 'subfolder="12b-open/eng-nob__ties"' in card  # the load snippet names a real cell


def test_metadata_lists_every_base_and_the_bases_license_and_languages():
    meta = front_matter(render_root_card(seed_records(), CONTEXT, REPO))
    assert len(meta["base_model"]) == 6 and all(b.startswith("NbAiLab/") for b in meta["base_model"])
    assert meta["base_model_relation"] == "merge" and meta["license"] == "gemma"
    assert meta["language"] == ["no", "nn", "en"]
    assert {"merge", "mergekit", "lora"} <= set(meta["tags"])


def test_bases_with_different_licenses_declare_none():
    records = seed_records()
    records["1b-std/eng-nob__ties"]["base_card"]["license"] = "apache-2.0"
    assert "license" not in front_matter(render_root_card(records, CONTEXT, REPO))


def test_sweep_points_values_and_unknown_sizes():
    records = {r["cell"]: r for r in (
        record("1b", "std", "ties", "ties-density0.3", parameters={"density": {"eng": 0.3, "nob": 0.3}}),
        record("1b", "std", "ties", "ties-density0.7", parameters={"density": {"eng": 0.7, "nob": 0.7}}),
        record("27b", "std", "ties"))}
    card = render_root_card(records, CONTEXT, REPO)
    assert "| 1b | std | ties-density0.3, ties-density0.7 |" in card
    assert card.index("| 1b |") < card.index("| 27b |")  # not in the matrix: sorts last
    assert "| ties | density: eng=0.3 nob=0.3 |" in card and "| ties | density: eng=0.7 nob=0.7 |" in card


def test_the_notes_section_is_carried_over():
    first = render_root_card(seed_records(), CONTEXT, REPO)
    assert manual_section(first) == DEFAULT_NOTES
    edited = first.replace(DEFAULT_NOTES, "| Metric | 4b-std |\n|---|---|\n| MMLU-NB | 54.9% |")
    again = render_root_card(seed_records(), CONTEXT, REPO, previous=edited)
    assert "| MMLU-NB | 54.9% |" in again and DEFAULT_NOTES not in again
    assert again.count(MANUAL_START) == 1 and again.count(MANUAL_END) == 1
    # A card without markers (written by hand before) leaves the placeholder.
    assert manual_section("# my card\n") == DEFAULT_NOTES


def test_inputs_are_named_by_repo_and_commit_or_by_folder_and_hash():
    assert reference({"repo": "o/a", "subfolder": "4b-std/eng", "commit": "c" * 40}) == f"o/a/4b-std/eng@{'c' * 40}"
    assert reference({"local": "text/eng", "sha256": "d" * 64}) == f"local:text/eng@sha256:{'d' * 64}"
    card = render_root_card(seed_records(), CONTEXT, REPO)
    assert f"`NbAiLab/nb-gpt-gemma3-bakery-adapters-2603/4b-open/nob@{'a' * 40}`" in card


def test_cpu_fallbacks_are_named():
    card = render_root_card(seed_records(), CONTEXT, REPO)
    assert "- 13 cells merged on cuda\n- 1 cell merged on cpu" in card
    assert "- CUDA failed at start: device busy: `12b-open/eng-nob__ties`" in card


def test_front_matter_reads_a_base_card_and_keeps_norwegian():
    assert front_matter("---\nlicense: gemma\nlanguage:\n- no\n- en\n---\n# x") == {
        "license": "gemma", "language": ["no", "en"]}
    assert front_matter("# no metadata\n") == {} and front_matter("---\n: [\n---\n") == {}
    # What we write reads back the same with any YAML reader (the Hub's, PyYAML's).
    meta = yaml.safe_load(render_root_card(seed_records(), CONTEXT, REPO).split("---\n")[1])
    assert meta["language"] == ["no", "nn", "en"] and meta["license"] == "gemma"


def test_an_input_shared_by_two_variants_is_credited_to_both():
    # MINIMAL_MATRIX / the demo matrix: `[base] path = "models/base-{size}"`, one base per size,
    # shared by every variant of that size.
    records = {}
    for variant in ("std", "open"):
        r = record("4b", variant, "ties")
        r["inputs"]["base"] = {"repo": "google/gemma-3-4b-pt", "subfolder": None,
                               "revision": None, "commit": "c" * 40}
        records[r["cell"]] = r
    card = render_root_card(records, CONTEXT, REPO)
    base_rows = [line for line in card.splitlines() if line.startswith("| base |")]
    assert base_rows == ["| base | 4b-std, 4b-open | `google/gemma-3-4b-pt@" + "c" * 40 + "` |"]


def test_the_load_snippet_loads_the_cell_it_names_in_that_cells_dtype():
    # A repo holding cells of two campaigns (the matrix's dtype changed in between).
    a = record("1b", "std", "ties")
    b = record("4b", "std", "ties", dtype="float32")
    card = render_root_card({a["cell"]: a, b["cell"]: b}, CONTEXT, REPO)
    assert 'subfolder="4b-std/eng-nob__ties"' in card
    assert 'dtype="float32"' in card


def test_a_base_in_a_subfolder_still_reads_its_repos_card():
    # The Hub reads a repo's metadata only from its root README.md, above a base's subfolder.
    allow, _ = hub_patterns("4b")
    assert any(fnmatch("README.md", pattern) for pattern in allow)


def test_a_base_with_license_other_keeps_the_licenses_name(tmp_path):
    (tmp_path / "README.md").write_text(
        "---\nlicense: other\nlicense_name: nb-gpt-license\n"
        "license_link: https://huggingface.co/NbAiLab/x/blob/main/LICENSE\nlanguage: [no]\n---\n")
    meta = card_metadata([{"inputs": {"base": {"repo": "NbAiLab/x"}},
                           "base_card": base_card(tmp_path)}])
    assert meta["license"] == "other"
    assert meta.get("license_name") == "nb-gpt-license"
