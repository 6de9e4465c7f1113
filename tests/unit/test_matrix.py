"""Tests of bakery_slurm.matrix (load, expand, select), the method registry and recipe rendering.

The repo's matrix.toml must describe the published job exactly; smaller matrices are written into
tmp_path from conftest's MINIMAL_MATRIX. Error messages and exit codes are tested through the CLI
in tests/cli/test_plan.py.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from bakery_slurm import methods
from bakery_slurm.errors import ConfigError
from bakery_slurm.evaluation import expand_eval
from bakery_slurm.matrix import expand, is_safe_subpath, load_matrix, select
from bakery_slurm.recipe import render_recipe, validate_recipe
from support import assert_matches_golden

REPO = Path(__file__).resolve().parents[2]
REPO_MATRIX = REPO / "matrix.toml"
GOLDEN = Path(__file__).resolve().parent / "golden"

SEED_METHODS = {
    "1b": ["linear", "task_arithmetic", "ties"],
    "4b": ["linear", "task_arithmetic", "ties"],
    "12b": ["ties"],
}
SEED_IDS = [f"{size}-{variant}/eng-nob__{method}"
            for size, size_methods in SEED_METHODS.items()
            for variant in ("std", "open")
            for method in size_methods]
SEED_PARAMETERS = {
    "linear": {"weight": {"eng": 0.5, "nob": 0.5}},
    "task_arithmetic": {"weight": {"eng": 0.5, "nob": 0.5}},
    "ties": {"density": {"eng": 0.5, "nob": 0.5}, "weight": {"eng": 0.5, "nob": 0.5}},
}
BAKED = {"eng": "/work/baked/eng", "nob": "/work/baked/nob"}
BASE_PATH = "/work/base"


def _with_methods(minimal: str, methods_toml: str) -> str:
    """MINIMAL_MATRIX with its [methods.ties] table replaced by `methods_toml`."""
    old = "[methods.ties]\ndensity = 0.5\nweight = 0.5\n"
    assert old in minimal
    return minimal.replace(old, methods_toml)


@pytest.fixture(scope="module")
def seed_cells():
    return expand(load_matrix(REPO_MATRIX))


# ---------------------------------------------------------------------------------------------
# The repo's matrix.toml is the published job


def test_repo_matrix_expands_to_the_14_seed_cells_in_order(seed_cells):
    assert len(SEED_IDS) == 14
    assert [c.id for c in seed_cells] == SEED_IDS


def test_repo_matrix_cells_carry_size_variant_method(seed_cells):
    for cell in seed_cells:
        size, rest = cell.id.split("-", 1)
        variant, method = rest.split("/eng-nob__")
        assert (cell.size, cell.variant, cell.method) == (size, variant, method)
        assert cell.dtype == "bfloat16"


def test_repo_matrix_bases(seed_cells):
    for cell in seed_cells:
        suffix = "-open" if cell.variant == "open" else ""
        assert cell.base.repo == (f"NbAiLab/nb-gpt-gemma3-{cell.size}-instruct-epoch-3-"
                                  f"aurora-sft-2603{suffix}-posttrain")
        assert cell.base.path is None
        assert cell.base.subfolder is None


def test_repo_matrix_adapters(seed_cells):
    folders = set()
    for cell in seed_cells:
        assert [name for name, _ in cell.adapters] == ["eng", "nob"]
        for name, source in cell.adapters:
            assert source.repo == "NbAiLab/nb-gpt-gemma3-bakery-adapters-2603"
            assert source.path is None
            assert source.subfolder and is_safe_subpath(source.subfolder)
            folders.add((cell.size, cell.variant, name, source.subfolder))
    # One adapter folder per (size, variant, adapter): 6 (size, variant) pairs x 2 adapters,
    # and no two of them share a subfolder.
    assert len(folders) == 12
    assert len({f[3] for f in folders}) == 12


def test_repo_matrix_push_target(seed_cells):
    for cell in seed_cells:
        assert str(cell.push) == "hub:NbAiLab/nb-gpt-gemma3-bakery-merges-2603"
        assert cell.as_dict()["push"] == f"hub:NbAiLab/nb-gpt-gemma3-bakery-merges-2603/{cell.id}"


def test_repo_matrix_parameters_are_the_seed_recipes(seed_cells):
    for cell in seed_cells:
        assert cell.parameters == SEED_PARAMETERS[cell.method], cell.id


def test_repo_matrix_per_size_resources(seed_cells):
    by_size = {cell.size: cell.resources for cell in seed_cells}
    assert {size: r.time for size, r in by_size.items()} == {
        "1b": "00:30:00", "4b": "01:00:00", "12b": "02:00:00"}
    assert by_size["12b"].time_min == 120
    assert by_size["12b"].mem == "220G"
    assert by_size["4b"].mem == "110G"  # not overridden: inherited from [resources]
    # Keys a size does not override are inherited.
    assert {r.partition for r in by_size.values()} == {"accel"}
    assert {r.gpus_per_node for r in by_size.values()} == {1}


def test_select_by_glob(seed_cells):
    assert [c.id for c in select(seed_cells, "12b-*")] == [
        "12b-std/eng-nob__ties", "12b-open/eng-nob__ties"]
    assert len(select(seed_cells, "*__ties")) == 6
    assert select(seed_cells, None) == seed_cells
    assert select(seed_cells, "27b-*") == []


# ---------------------------------------------------------------------------------------------
# Expansion features


def test_minimal_matrix_is_one_cell(write_matrix, minimal_matrix):
    (cell,) = expand(load_matrix(write_matrix(minimal_matrix)))
    assert cell.id == "tiny-std/eng-nob__ties"


def test_sweep_expands_into_distinct_cells(write_matrix, minimal_matrix):
    text = _with_methods(minimal_matrix, "[methods.ties]\ndensity = [0.3, 0.5, 0.7]\nweight = 0.5\n")
    cells = expand(load_matrix(write_matrix(text)))
    assert [c.id for c in cells] == [
        "tiny-std/eng-nob__ties-density0.3",
        "tiny-std/eng-nob__ties-density0.5",
        "tiny-std/eng-nob__ties-density0.7",
    ]
    assert [c.parameters["density"] for c in cells] == [
        {"eng": 0.3, "nob": 0.3}, {"eng": 0.5, "nob": 0.5}, {"eng": 0.7, "nob": 0.7}]
    assert all(c.parameters["weight"] == {"eng": 0.5, "nob": 0.5} for c in cells)
    assert len({c.recipe_hash for c in cells}) == 3


def test_two_swept_parameters_give_the_product(write_matrix, minimal_matrix):
    text = _with_methods(minimal_matrix,
                         "[methods.ties]\ndensity = [0.3, 0.7]\nweight = [0.5, 1.0]\n")
    cells = expand(load_matrix(write_matrix(text)))
    assert [c.id for c in cells] == [
        "tiny-std/eng-nob__ties-density0.3-weight0.5",
        "tiny-std/eng-nob__ties-density0.3-weight1",
        "tiny-std/eng-nob__ties-density0.7-weight0.5",
        "tiny-std/eng-nob__ties-density0.7-weight1",
    ]
    assert [(c.parameters["density"]["eng"], c.parameters["weight"]["nob"]) for c in cells] == [
        (0.3, 0.5), (0.3, 1.0), (0.7, 0.5), (0.7, 1.0)]


def test_per_adapter_weight_table(write_matrix, minimal_matrix):
    text = _with_methods(minimal_matrix, "[methods.linear]\nweight = {eng = 0.3, nob = 0.7}\n")
    (cell,) = expand(load_matrix(write_matrix(text)))
    assert cell.id == "tiny-std/eng-nob__linear"
    assert cell.parameters == {"weight": {"eng": 0.3, "nob": 0.7}}
    recipe = yaml.safe_load(render_recipe(cell, BASE_PATH, BAKED))
    assert [(m["model"], m["parameters"]["weight"]) for m in recipe["models"]] == [
        ("/work/baked/eng", 0.3), ("/work/baked/nob", 0.7)]


def test_exclude_rules_with_globs(write_matrix, minimal_matrix):
    text = 'exclude = [{size = "sm*", method = "lin*"}, {id = "tiny-open/*"}]\n' + _with_methods(
        minimal_matrix, "[methods.linear]\nweight = 0.5\n\n[methods.ties]\ndensity = 0.5\nweight = 0.5\n"
    ) + "\n[variants.open]\n\n[sizes.small]\n"
    ids = [c.id for c in expand(load_matrix(write_matrix(text)))]
    assert ids == [
        "tiny-std/eng-nob__linear", "tiny-std/eng-nob__ties",
        "small-std/eng-nob__ties",
        "small-open/eng-nob__ties",
    ]


def test_an_exclude_rule_may_remove_only_baselines_and_a_size_keep_only_its_baselines(
        write_matrix, minimal_matrix):
    """Neither is a typo: a rule that removes no cell but a baseline removes something, and a
    size whose cells the rules remove all still evaluates its baselines."""
    text = ('exclude = [{id = "tiny-*/base"}, {size = "big", method = "ties"}]\n' + minimal_matrix
            + '[sizes.big]\n[eval]\ntasks = ["a"]\nbaselines = [{ name = "base" }]\n')
    matrix = load_matrix(write_matrix(text))
    assert [t.id for t in expand_eval(matrix)] == ["tiny-std/eng-nob__ties", "big-std/base"]


def test_per_size_variants_and_methods_restriction(write_matrix, minimal_matrix):
    text = _with_methods(
        minimal_matrix, "[methods.linear]\nweight = 0.5\n\n[methods.ties]\ndensity = 0.5\nweight = 0.5\n"
    ) + '\n[variants.open]\n\n[sizes.27b]\nvariants = ["std"]\nmethods = ["ties"]\n'
    ids = [c.id for c in expand(load_matrix(write_matrix(text)))]
    assert ids == [
        "tiny-std/eng-nob__linear", "tiny-std/eng-nob__ties",
        "tiny-open/eng-nob__linear", "tiny-open/eng-nob__ties",
        "27b-std/eng-nob__ties",
    ]


def test_size_and_variant_vars_fill_templates(write_matrix, minimal_matrix):
    text = minimal_matrix.replace('path = "models/base-{size}"',
                                  'path = "models/{family}-{size}{suffix}"')
    text = text.replace("[variants.std]\n", '[variants.std]\nvars = { suffix = "" }\n\n'
                        '[variants.open]\nvars = { suffix = "-open" }\n')
    text = text.replace("[sizes.tiny]\n", '[sizes.tiny]\nvars = { family = "gemma3" }\n')
    matrix = load_matrix(write_matrix(text))
    assert [c.base.path for c in expand(matrix)] == [
        str(matrix.root / "models/gemma3-tiny"), str(matrix.root / "models/gemma3-tiny-open")]


def test_local_paths_resolve_relative_to_the_matrix_file(tmp_path, write_matrix, minimal_matrix,
                                                         monkeypatch):
    text = minimal_matrix.replace('path = "models/base-{size}"', 'path = "../group-models/base-{size}"')
    path = write_matrix(text, "project/matrix.toml")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (cell,) = expand(load_matrix(path))
    root = path.parent.resolve()
    assert cell.base.path == str(root.parent / "group-models" / "base-tiny")
    assert [(name, src.path) for name, src in cell.adapters] == [
        ("eng", str(root / "models" / "adapter-tiny-std-eng")),
        ("nob", str(root / "models" / "adapter-tiny-std-nob")),
    ]
    assert all(src.repo is None for _, src in cell.adapters)


def test_dir_push_target_resolves_relative_to_the_matrix_file(tmp_path, write_matrix,
                                                              minimal_matrix, monkeypatch):
    path = write_matrix(minimal_matrix, "project/matrix.toml")
    monkeypatch.chdir(tmp_path)
    (cell,) = expand(load_matrix(path))
    published = path.parent.resolve() / "published"
    assert (cell.push.kind, cell.push.location) == ("dir", str(published))
    assert cell.as_dict()["push"] == f"dir:{published}/tiny-std/eng-nob__ties"


def test_hub_sources_keep_subfolder_and_revision(write_matrix, minimal_matrix):
    text = minimal_matrix.replace(
        'path = "models/adapter-{size}-{variant}-{adapter}"',
        'repo = "org/adapters"\nsubfolder = "{size}/{variant}/{adapter}"\nrevision = "v1.{size}"')
    (cell,) = expand(load_matrix(write_matrix(text)))
    assert [src.describe() for _, src in cell.adapters] == [
        "hub:org/adapters/tiny/std/eng@v1.tiny", "hub:org/adapters/tiny/std/nob@v1.tiny"]


# ---------------------------------------------------------------------------------------------
# recipe_hash


def test_recipe_hash_is_stable_across_loads_and_locations(tmp_path, seed_cells):
    again = expand(load_matrix(REPO_MATRIX))
    assert [c.recipe_hash for c in again] == [c.recipe_hash for c in seed_cells]
    copy = tmp_path / "elsewhere" / "matrix.toml"
    copy.parent.mkdir()
    shutil.copy(REPO_MATRIX, copy)
    assert [c.recipe_hash for c in expand(load_matrix(copy))] == [
        c.recipe_hash for c in seed_cells]
    assert all(re.fullmatch(r"[0-9a-f]{64}", c.recipe_hash) for c in seed_cells)


def test_recipe_hash_changes_with_a_parameter(write_matrix, minimal_matrix):
    (before,) = expand(load_matrix(write_matrix(minimal_matrix, "a/matrix.toml")))
    changed = minimal_matrix.replace("density = 0.5", "density = 0.6")
    (after,) = expand(load_matrix(write_matrix(changed, "b/matrix.toml")))
    assert before.id == after.id
    assert before.recipe_hash != after.recipe_hash


def test_recipe_hash_ignores_the_push_target(write_matrix, minimal_matrix):
    (before,) = expand(load_matrix(write_matrix(minimal_matrix)))
    moved = minimal_matrix.replace('target = "dir:published"', 'target = "hub:org/merges"')
    (after,) = expand(load_matrix(write_matrix(moved)))
    assert before.push != after.push
    assert before.recipe_hash == after.recipe_hash


def test_distinct_seed_cells_have_distinct_hashes(seed_cells):
    assert len({c.recipe_hash for c in seed_cells}) == 14


# ---------------------------------------------------------------------------------------------
# The method registry


def test_registry_lists_the_three_methods():
    assert methods.registered_methods() == ["linear", "task_arithmetic", "ties"]


def test_registry_refuses_a_duplicate_name():
    with pytest.raises(ValueError, match="'ties' is already registered"):
        methods.register(methods.MethodSpec("ties", needs_base=True))
    assert methods.get("ties").params["density"] is methods.DENSITY


def test_registry_lookup_names_valid_methods():
    with pytest.raises(KeyError, match=r"unknown merge method 'tie' \(valid: linear, "
                                       r"task_arithmetic, ties\)"):
        methods.get("tie")


def test_registry_agrees_with_mergekit():
    """Our parameter scopes, base requirement and required parameters are mergekit's."""
    from mergekit.merge_methods import BasePolicy, ParameterScope
    from mergekit.merge_methods import get as mergekit_get

    for name in methods.registered_methods():
        ours = methods.get(name)
        theirs = {p.name: p for p in mergekit_get(name).spec.parameters}
        assert ours.needs_base == (mergekit_get(name).spec.contract.base == BasePolicy.REQUIRED)
        for param in ours.params.values():
            assert param.name in theirs, (name, param.name)
            assert param.per_model == (theirs[param.name].scope != ParameterScope.SHARED)
        required = {p.name for p in theirs.values() if p.required}
        assert required == {p.name for p in ours.params.values() if p.required}, name


# ---------------------------------------------------------------------------------------------
# Recipes


def _check_against_mergekit(cell, text):
    """validate_recipe (MergeConfiguration), then the method's own contract, which
    MergeConfiguration does not check: base presence and every required input parameter."""
    from mergekit.merge_methods import BasePolicy
    from mergekit.merge_methods import get as mergekit_get

    config = validate_recipe(cell.id, text)
    spec = mergekit_get(cell.method).spec
    assert config.merge_method == cell.method
    assert (config.base_model is not None) == (spec.contract.base == BasePolicy.REQUIRED)
    known = {p.name for p in spec.parameters}
    required = {p.name for p in spec.input_parameters if p.required}
    assert [str(m.model.model.path) for m in config.models] == [BAKED["eng"], BAKED["nob"]]
    for model in config.models:
        assert required <= set(model.parameters or {})
        assert set(model.parameters or {}) <= known
    assert set(config.parameters or {}) <= known
    return config


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_rendered_recipe_is_valid_for_mergekit(seed_cells, method):
    cell = next(c for c in seed_cells if c.id == f"4b-std/eng-nob__{method}")
    text = render_recipe(cell, BASE_PATH, BAKED)
    config = _check_against_mergekit(cell, text)
    recipe = yaml.safe_load(text)
    assert recipe["dtype"] == "bfloat16"
    if method == "linear":
        assert "base_model" not in recipe
    else:
        assert recipe["base_model"] == BASE_PATH
        assert str(config.base_model.model.path) == BASE_PATH
    for model in recipe["models"]:
        assert model["parameters"]["weight"] == 0.5
        if method == "ties":
            assert model["parameters"]["density"] == 0.5
        else:
            assert "density" not in model["parameters"]


@pytest.mark.parametrize("density", [0.00005, 0.00001, 1.5e-05])
def test_small_parameters_render_as_yaml_numbers(write_matrix, minimal_matrix, density):
    """YAML 1.1 (PyYAML, which mergekit reads recipes with) takes `5e-05` for a string."""
    path = write_matrix(minimal_matrix.replace("density = 0.5", f"density = {density}"))
    (cell,) = expand(load_matrix(path))
    config = validate_recipe(cell.id, render_recipe(cell, "/base", {"eng": "/eng", "nob": "/nob"}))
    densities = [model.parameters["density"] for model in config.models]
    assert densities == [density, density] and all(type(d) is float for d in densities)


def test_merge_wide_parameter_renders_at_the_top(write_matrix, minimal_matrix):
    text = minimal_matrix.replace("weight = 0.5", "weight = 0.5\nnormalize = false")
    (cell,) = expand(load_matrix(write_matrix(text)))
    recipe_text = render_recipe(cell, BASE_PATH, BAKED)
    recipe = yaml.safe_load(recipe_text)
    assert recipe["parameters"] == {"normalize": False}
    assert all("normalize" not in m["parameters"] for m in recipe["models"])
    _check_against_mergekit(cell, recipe_text)


def test_validate_recipe_rejects_a_broken_recipe():
    with pytest.raises(ConfigError, match="x/y: mergekit rejects the rendered recipe"):
        validate_recipe("x/y", "merge_method: ties\nmodels: 3\n")


def test_rendered_ties_recipe_matches_golden_file(seed_cells):
    """The rendering of the seed's 4b-std ties cell, as submitit's `_sbatch_test_record.txt`."""
    cell = next(c for c in seed_cells if c.id == "4b-std/eng-nob__ties")
    text = render_recipe(cell, BASE_PATH, BAKED)
    record = GOLDEN / "recipe_ties.yaml"
    assert_matches_golden(text, record, "recipe")


def test_merge_engine_defaults_to_bakery_and_stays_out_of_the_recipe_hash(write_matrix,
                                                                          minimal_matrix):
    (default,) = expand(load_matrix(write_matrix(minimal_matrix)))
    assert (default.merge.engine, default.merge.keep_bakes) == ("bakery", False)
    (chosen,) = expand(load_matrix(write_matrix(
        minimal_matrix + '\n[merge]\nengine = "mergekit"\nkeep_bakes = true\n', "other.toml")))
    assert (chosen.merge.engine, chosen.merge.keep_bakes) == ("mergekit", True)
    assert chosen.recipe_hash == default.recipe_hash


@pytest.mark.parametrize("table, named", [('engine = "fast"', "merge.engine"),
                                          ("threads = 4", "merge.threads")])
def test_merge_table_is_validated(write_matrix, minimal_matrix, table, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        load_matrix(write_matrix(minimal_matrix + f"\n[merge]\n{table}\n"))


TIES = "[methods.ties]\ndensity = 0.5\nweight = 0.5\n"


def with_methods(write_matrix, minimal_matrix, methods_toml: str):
    return load_matrix(write_matrix(minimal_matrix.replace(TIES, methods_toml)))


@pytest.mark.parametrize("axis", ["density = [0.1234561, 0.1234564]\nweight = 0.5",
                                  "density = 0.5\nweight = [1234567, 1234568]"])
def test_distinct_sweep_values_get_distinct_cell_ids(write_matrix, minimal_matrix, axis):
    cells = expand(with_methods(write_matrix, minimal_matrix, f"[methods.ties]\n{axis}\n"))
    assert len({c.id for c in cells}) == 2


def test_negative_zero_does_not_change_the_recipe_hash(write_matrix, minimal_matrix):
    (zero,) = expand(with_methods(write_matrix, minimal_matrix,
                             "[methods.ties]\ndensity = 0.5\nweight = {eng = 0.0, nob = 0.5}\n"))
    (negative,) = expand(with_methods(write_matrix, minimal_matrix,
                                 "[methods.ties]\ndensity = 0.5\nweight = {eng = -0.0, nob = 0.5}\n"))
    assert negative.parameters == zero.parameters
    assert negative.recipe_hash == zero.recipe_hash
