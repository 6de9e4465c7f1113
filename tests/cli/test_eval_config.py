"""Bad [eval] tables through `bakery-slurm plan`: exit 2, `Error: <file>: <key>: <message> (got
<value>)` on stderr, nothing on stdout, nothing written."""

from __future__ import annotations

import pytest

from conftest import MINIMAL_MATRIX
from test_plan import listing, run_plan

BAD_EVAL = [
    pytest.param('[eval]\ntasks = []\n', "eval.tasks: List should have at least 1 item after "
                 "validation, not 0 (got [])", id="no-tasks"),
    pytest.param('[eval]\ntasks = ["a"]\nlimt = 3\n', "eval.limt: unknown key (got 3)",
                 id="unknown-key"),
    pytest.param('[eval]\ntasks = ["a", "a"]\n', "eval.tasks: duplicate task names (got ['a', 'a'])",
                 id="duplicate-task"),
    pytest.param('[eval]\ntasks = ["a"]\nnum_fewshot = { b = 5 }\n',
                 "eval.num_fewshot.b: not in eval.tasks (a) (got 'b')", id="fewshot-unknown-task"),
    pytest.param('[eval]\ntasks = ["a"]\nnum_fewshot = -1\n',
                 "eval.num_fewshot: num_fewshot must be 0 or more (got -1)", id="fewshot-negative"),
    pytest.param('[eval]\ntasks = ["a"]\nlimit = 1.5\n',
                 "eval.limit: limit must be a number of documents (1 or more) or a fraction "
                 "between 0 and 1 (got 1.5)", id="limit-fraction-above-1"),
    pytest.param('[eval]\ntasks = ["a"]\nbatch_size = "big"\n',
                 "eval.batch_size: batch_size must be a number (1 or more), 'auto' or 'auto:N' "
                 "(got 'big')", id="batch-size"),
    pytest.param('[eval]\ntasks = ["a"]\nonly = { b = ["*"] }\n',
                 "eval.only.b: not in eval.tasks (a) (got 'b')", id="only-unknown-task"),
    pytest.param('[eval]\ntasks = ["a"]\nonly = { a = [] }\n',
                 "eval.only.a: an empty list runs the task nowhere; leave it out of eval.tasks "
                 "instead (got [])", id="only-empty"),
    pytest.param('[eval]\ntasks = ["a"]\nonly = { a = ["tiny-std/*__ties", "tiny-std/*__tise"] }\n',
                 "eval.only.a: matches no cell or baseline of the matrix (got 'tiny-std/*__tise')",
                 id="only-glob-matches-nothing"),
    pytest.param('[eval]\ntasks = ["a"]\nonly = { a = ["*/base"] }\nbaselines = [{ name = "bsae" }]\n',
                 "eval.only.a: matches no cell or baseline of the matrix (got '*/base')",
                 id="only-glob-misses-the-baseline"),
    pytest.param('[eval]\ntasks = ["a"]\ninclude_path = "no-such-folder"\n',
                 "eval.include_path: not a folder", id="include-path-missing"),
    pytest.param('[eval]\ntasks = ["a"]\nbaselines = [{ name = "../x" }]\n',
                 "eval.baselines.0.name: names must be safe path segments", id="baseline-name"),
    pytest.param('[eval]\ntasks = ["a"]\nbaselines = [{ name = "b" }, { name = "b" }]\n',
                 "eval.baselines.1.name: duplicate baseline name (got 'b')",
                 id="baseline-duplicate"),
    pytest.param('[eval]\ntasks = ["a"]\nbaselines = [{ name = "b", adapters = ["deu"] }]\n',
                 "eval.baselines.0.adapters: not one of the matrix's adapters (eng, nob) "
                 "(got 'deu')", id="baseline-unknown-adapter"),
    pytest.param('[eval]\ntasks = ["a"]\nbaselines = [{ name = "b", adapters = ["eng", "nob"] }]\n',
                 "eval.baselines.0.adapters: List should have at most 1 item", id="baseline-two-adapters"),
    pytest.param('[eval]\ntasks = ["a"]\nbaselines = [{ name = "b", sizes = ["4b"] }]\n',
                 "eval.baselines.0.sizes: not one of the matrix's sizes (tiny) (got '4b')",
                 id="baseline-unknown-size"),
    pytest.param('[eval]\ntasks = ["a"]\nresources = { time = "1h" }\n',
                 "eval.resources.time: time must be HH:MM:SS or D-HH:MM:SS (got '1h')",
                 id="eval-resources"),
]


@pytest.mark.parametrize("table, message", BAD_EVAL)
def test_bad_eval_table_exits_2_naming_file_key_and_value(tmp_path, write_matrix, table, message):
    path = write_matrix(MINIMAL_MATRIX + table)
    before = listing(tmp_path)
    result = run_plan(path)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert f"Error: {path.resolve()}: {message}" in result.stderr, result.stderr
    assert listing(tmp_path) == before
