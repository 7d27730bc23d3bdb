"""The exercise kit: solution regions, ``exercises new`` / ``check``, the planted bugs, the CLI's errors.

The planted bugs are string edits of a workspace file's text (the solution's text), so every test that fails an
exercise proves that ``check`` reads the workspace, not the installed ``minideeplab.textbook``.
"""
import ast
import json
import shutil
import sys

import numpy as np
import pytest

from minideeplab import textbook
from minideeplab.cli import main
from minideeplab.exercises import EXERCISES, check_workspace, format_report, new_workspace
from minideeplab.exercises.catalog import BY_NAME, regions_by_function, textbook_dir
from minideeplab.exercises.grading import grade
from minideeplab.exercises.loader import MANIFEST, load
from minideeplab.exercises.regions import (
    absolute_imports,
    drop_markers,
    find_regions,
    student_code,
    student_markdown,
)
from minideeplab.exercises.workspace import student_textbook

NAMES = [e.name for e in EXERCISES]


# -- the regions --------------------------------------------------------------------------------------------------
CODE = """def f(x):
    y = 2 * x
    ### BEGIN SOLUTION
    ### HINT: add one
    z = y + 1
    return z
    ### END SOLUTION
"""


def test_regions_are_found_with_their_hint_and_indentation():
    (region,) = find_regions(CODE)
    assert (region.begin, region.end, region.indent, region.hint) == (3, 7, "    ", "add one")


@pytest.mark.parametrize("text, message", [
    ("### BEGIN SOLUTION\nx = 1\n", "without '### END SOLUTION'"),
    ("x = 1\n### END SOLUTION\n", "without '### BEGIN SOLUTION'"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n", "inside the region"),
    ("### BEGIN SOLUTION\nx = 1\n### HINT: late\n### END SOLUTION\n", "right after"),
])
def test_unbalanced_markers_are_an_error_naming_the_line(text, message):
    with pytest.raises(ValueError, match=message) as e:
        find_regions(text, "f.py")
    assert "f.py:" in str(e.value)


def test_the_two_versions_of_a_region():
    teacher = drop_markers(CODE)
    assert "z = y + 1" in teacher and "###" not in teacher
    student = student_code(CODE, label=lambda r: "exercise demo")
    assert "z = y + 1" not in student and "# Hint: add one" in student and "y = 2 * x" in student
    namespace = {}
    exec(compile(student, "<student>", "exec"), namespace)
    with pytest.raises(NotImplementedError, match="exercise demo: not written yet"):
        namespace["f"](1)
    md = student_markdown("Q?\n### BEGIN SOLUTION\n**Answer.** 42\n### END SOLUTION\n")
    assert "42" not in md and "Your answer" in md


def test_absolute_imports_only_rewrite_the_parent_package():
    text = "from ..nn.module import Module\nfrom .conv import im2col\nfrom .. import backend\n"
    assert absolute_imports(text) == ("from minideeplab.nn.module import Module\nfrom .conv import im2col\n"
                                      "from minideeplab import backend\n")


def test_every_textbook_region_belongs_to_an_exercise_and_every_exercise_has_regions():
    owned = set()
    for path in sorted(textbook_dir().glob("*.py")):
        for function, regions in regions_by_function(path.read_text(), path.name).items():
            owners = [e.name for e in EXERCISES if e.file == path.name and function in e.functions]
            assert len(owners) == 1, f"{path.name}: the region in {function} belongs to {owners}"
            assert all(r.hint for r in regions), f"{path.name}: the region in {function} has no ### HINT"
            owned.add((path.name, function))
    for e in EXERCISES:
        assert all((e.file, f) in owned for f in e.functions), f"{e.name}: a function without a solution region"
    assert len(EXERCISES) == 13 and {"conv_backward", "batchnorm_backward", "dense_block_backward",
                                     "aspp_fork_join", "col2im"} <= set(NAMES)


@pytest.mark.parametrize("path", sorted(textbook_dir().glob("*.py")), ids=lambda p: p.name)
def test_the_student_textbook_compiles_and_holds_no_solution(path):
    text = path.read_text()
    student = student_textbook(text, path.name)
    ast.parse(student)
    lines, regions = text.split("\n"), find_regions(text)
    inside = {i for r in regions for i in range(r.begin - 1, r.end)}
    outside = {line for i, line in enumerate(lines) if i not in inside}
    for i in sorted(inside):
        line = lines[i]
        if line.strip() and not line.strip().startswith("#") and line not in outside:
            assert line not in student.split("\n"), f"{path.name}: solution line left in: {line.strip()}"
    assert student.count("raise NotImplementedError") == len(find_regions(text))


# -- new / check ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def student_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws") / "student"
    new_workspace(root)
    return root


@pytest.fixture(scope="module")
def solution_ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("ws") / "key"
    new_workspace(root, with_solutions=True)
    return root


@pytest.fixture(scope="module")
def solution_results(solution_ws):
    return check_workspace(solution_ws)


def test_the_stubbed_workspace_fails_every_exercise_pointing_at_its_region(student_ws):
    results = check_workspace(student_ws)
    assert [r.name for r in results] == NAMES
    for r in results:
        assert not r.passed
        assert r.hint.startswith(f"not done yet: write the region in {student_ws}/textbook/{BY_NAME[r.name].file}:")
        assert "NotImplementedError" in r.error
        line = int(r.hint.split(".py:")[1].split(".")[0])
        text = (student_ws / "textbook" / BY_NAME[r.name].file).read_text().split("\n")
        assert "raise NotImplementedError" in text[line - 1]


def test_the_solution_passes_every_exercise(solution_results):
    assert [r.name for r in solution_results] == NAMES
    failed = {r.name: r.hint for r in solution_results if not r.passed}
    assert not failed
    for r in solution_results:
        assert r.fd_error is not None and r.fd_error < 1e-5 and r.ref_error < 1e-8 and r.rows
    assert all(r.ref_error < 1e-12 for r in solution_results if r.name in ("relu", "im2col", "col2im"))


def test_the_workspace_files_are_imported_from_the_workspace(solution_ws):
    """The loaded modules are the workspace's files under a fresh name: not the installed textbook, no sys.path
    change, nothing left in sys.modules afterwards."""
    path_before, modules_before = list(sys.path), set(sys.modules)
    ws = load(solution_ws)
    try:
        conv = ws.module("conv")
        assert conv.__file__ == str((solution_ws / "textbook" / "conv.py").resolve())
        assert conv is not textbook.conv and conv.Conv2d is not textbook.Conv2d
        assert conv.__name__.startswith("_minideeplab_workspace_")
        assert ws.module("pool").col2im is conv.col2im        # the copy's files import each other
        assert ws.module("pool").Module is textbook.pool.Module   # the infrastructure is the installed package's
    finally:
        ws.close()
    assert sys.path == path_before and set(sys.modules) == modules_before


def _copy(src, dst, file=None, old=None, new=None):
    shutil.copytree(src, dst)
    if file:
        path = dst / "textbook" / file
        text = path.read_text()
        assert text.count(old) == 1, f"the planted edit must match once in {file}: {old!r}"
        path.write_text(text.replace(old, new))
    return dst


def test_an_edited_workspace_file_fails_and_the_report_names_that_file(solution_ws, tmp_path):
    """The installed solution is untouched; only the workspace's ReLU returns a wrong value: relu fails."""
    ws = _copy(solution_ws, tmp_path / "edited", "activation.py", "return dout * self.mask\n        ### END",
               "return 0.5 * dout * self.mask\n        ### END")
    results = check_workspace(ws)
    assert [r.name for r in results if not r.passed] == ["relu"]
    relu = results[0]
    assert relu.wrong == ["dx"] and "0.5 times the right value" in relu.hint
    report = format_report(results, ws, 1.0)
    assert f"{ws}/textbook/activation.py:" in report and "FAIL" in report


# the planted bugs: (file, the solution's text, the bug, the exercise, words the hint must contain)
BUGS = {
    "dense_block_missing_sum": ("densenet.py", "grad[:, :c] += layer.backward(", "grad[:, :c] = layer.backward(",
                                "dense_block_backward", ["identity path of the concatenation", "SUM", "+="]),
    "batchnorm_mean_term_dropped": ("norm.py", "dvar * 2.0 * self.centered / n + dmean / n",
                                    "dvar * 2.0 * self.centered / n", "batchnorm_backward",
                                    ["batch mean", "sum to 0 over each channel"]),
    "col2im_overwrites": ("conv.py", "] += cols[:, :, i, j]", "] = cols[:, :, i, j]", "col2im",
                          ["kernel area (9)", "add overlapping windows (+=) or overwrite them (=)"]),
    "conv_backward_flipped_kernel": ("conv.py", "w2 = self.weight.data.reshape(F, -1)",
                                     "w2 = self.weight.data[:, :, ::-1, ::-1].reshape(F, -1)", "conv_backward",
                                     ["kernel flipped"]),
    "relu_modifies_dout": ("activation.py", "        return dout * self.mask\n        ### END",
                           "        dout[~self.mask] = 0\n        return dout\n        ### END", "relu",
                           ["modified dout in place"]),
    "sigmoid_derivative_is_s": ("activation.py", "dout * self.out * (1 - self.out)", "dout * self.out", "sigmoid",
                                ["s * (1 - s)"]),
    "conv_weight_grad_overwritten": ("conv.py", "self.weight.grad += (d2", "self.weight.grad = (d2", "conv_backward",
                                     ["overwritten, not accumulated", "+="]),
    "maxpool_padding_not_cropped": ("pool.py", "        return dxpad[:, :, ph:ph + H, pw:pw + W]\n",
                                    "        return dxpad\n", "maxpool_backward", ["has shape (2, 2, 9, 8)"]),
    "global_pool_not_divided": ("pool.py", "dout / (self.x_shape[2] * self.x_shape[3])", "dout", "avgpool_backward",
                                ["factor of H*W"]),
    "upsample_forward_matrices": ("resize.py", "return self.A_h.T @ dout @ self.A_w",
                                  "return self.A_h @ dout @ self.A_w.T", "upsample_backward",
                                  ["textbook/resize.py:", "ValueError"]),
    "bce_sign_flipped": ("loss.py", "grad = (1 - self.t) * sigmoid(self.x) - p * self.t * sigmoid(-self.x)",
                         "grad = p * self.t * sigmoid(-self.x) - (1 - self.t) * sigmoid(self.x)", "bce_grad",
                         ["wrong sign"]),
    "bce_mean_not_divided": ("loss.py", 'dout / self.x.size if self.reduction == "mean" else dout', "dout",
                             "bce_grad", ["'mean' fails", "divides"]),
    "dice_denominator_constant": ("loss.py", "(2 * self.t * self.den - self.num) / (self.den ** 2 * n)",
                                  "(2 * self.t) / (self.den * n)", "dice_grad", ["denominator", "constant"]),
    "aspp_one_branch_kept": ("deeplab.py", "dx = dx + branch.backward(part)", "dx = branch.backward(part)",
                             "aspp_fork_join", ["alone", "SUM of the five"]),
    "batchnorm_eval_as_training": ("norm.py", "        if not self.batch_stats:          # eval: mean and var are "
                                   "constants, the layer is affine\n            return dxhat * inv_std\n", "",
                                   "batchnorm_backward", ["eval mode fails"]),
}


REQUIRED = {"dense_block_missing_sum", "batchnorm_mean_term_dropped", "col2im_overwrites",
            "conv_backward_flipped_kernel"}
COMPOSITE = ("dense_block_backward", "aspp_fork_join")      # the slow ones (a second each)


@pytest.mark.parametrize("bug", BUGS)
def test_a_planted_bug_fails_exactly_its_exercise_with_a_hint_that_names_it(bug, solution_ws, tmp_path):
    """The four bugs of the issue and the composite exercises' bugs: every exercise graded. The others: every
    exercise but the two composite ones, which the next test grades with all those bugs planted at once."""
    file, old, new, exercise, words = BUGS[bug]
    ws = _copy(solution_ws, tmp_path / bug, file, old, new)
    full = bug in REQUIRED or exercise in COMPOSITE
    results = check_workspace(ws, None if full else [n for n in NAMES if n not in COMPOSITE])
    failed = [r for r in results if not r.passed]
    assert [r.name for r in failed] == [exercise], format_report(results, ws, 0)
    (r,) = failed
    assert r.wrong and all(w in r.hint for w in words), r.hint
    assert r.where.startswith(f"{ws}/textbook/{file}:")


def test_the_composite_exercises_pass_with_every_other_bug_planted(solution_ws, tmp_path):
    ws = _copy(solution_ws, tmp_path / "all_bugs")
    others = [b for b in BUGS if b not in REQUIRED and BUGS[b][3] not in COMPOSITE]
    for bug in others:
        file, old, new = BUGS[bug][:3]
        path = ws / "textbook" / file
        assert path.read_text().count(old) == 1, bug
        path.write_text(path.read_text().replace(old, new))
    results = check_workspace(ws)
    assert {r.name for r in results if not r.passed} == {BUGS[b][3] for b in others}
    assert all(r.passed for r in results if r.name in COMPOSITE)


def test_a_syntax_error_fails_the_exercises_of_that_file_naming_file_and_line(solution_ws, tmp_path, capsys):
    ws = _copy(solution_ws, tmp_path / "syntax", "loss.py", "        return xp.asarray(xp.mean(1 - self.num / self.den))",
               "        return xp.asarray(xp.mean(1 - self.num / self.den)")
    line = (ws / "textbook" / "loss.py").read_text().split("\n").index(
        "        return xp.asarray(xp.mean(1 - self.num / self.den)") + 1
    assert main(["exercises", "check", str(ws)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = out.split("\n")
    failed = [line_.split()[0] for line_ in lines if " FAIL " in line_]
    assert failed == ["bce_grad", "dice_grad"]
    flat = " ".join(out.split())                   # the hints are wrapped
    assert f"{ws}/textbook/loss.py could not be imported: SyntaxError" in flat
    assert f"textbook/loss.py:{line}:" in flat
    assert "11 of 13 exercises pass" in out


def test_calling_the_packages_layers_from_a_workspace_file_fails(solution_ws, tmp_path):
    """An exercise cannot pass by importing the fast col2im (or the installed solution): the textbook's import
    rule applies to the workspace's files."""
    ws = _copy(solution_ws, tmp_path / "cheat", "conv.py", "    cols = cols.reshape(N, C, kh, kw, Ho, Wo)\n",
               "    from minideeplab.nn.functional import col2im as fast\n"
               "    return fast(cols, x_shape, kernel_size, stride, padding, dilation)\n")
    results = check_workspace(ws, ["col2im", "relu"])
    assert [r.passed for r in results] == [False, True]
    assert "imports minideeplab.nn.functional.col2im" in results[0].hint and "conv.py:" in results[0].hint


def test_an_endless_loop_is_a_failed_exercise(solution_ws, tmp_path):
    ws = _copy(solution_ws, tmp_path / "loop", "activation.py", "        return dout * self.mask\n        ### END",
               "        while True:\n            pass\n        ### END")
    loaded = load(ws)
    try:
        result = grade(loaded, BY_NAME["relu"], timeout=0.5)
    finally:
        loaded.close()
    assert not result.passed and "took longer than 0.5 s" in result.hint and "activation.py:" in result.hint


# -- the command line -----------------------------------------------------------------------------------------------
def test_cli_new_and_check_with_only_and_json(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["exercises", "new", str(ws), "--with-solutions"]) == 0
    report = tmp_path / "report.json"
    assert main(["exercises", "check", str(ws), "--only", "relu,conv_backward", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "2 of 2 exercises pass" in out and "conv_backward" in out and "sigmoid" not in out
    data = json.loads(report.read_text())
    assert data["all_passed"] and [e["name"] for e in data["exercises"]] == ["relu", "conv_backward"]
    assert {"tensor", "fd", "ref"} <= data["exercises"][1]["rows"][0].keys()
    assert main(["exercises", "list"]) == 0
    assert "dense_block_backward" in capsys.readouterr().out


def test_cli_check_of_the_student_workspace_exits_1(student_ws, capsys):
    assert main(["exercises", "check", str(student_ws), "--only", "relu"]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "not done yet" in out and "Exit code 1" in out


@pytest.mark.parametrize("case", ["missing", "not_a_workspace", "unknown_exercise"])
def test_cli_check_errors_are_one_line(case, solution_ws, tmp_path, capsys):
    target = {"missing": tmp_path / "nope", "not_a_workspace": tmp_path, "unknown_exercise": solution_ws}[case]
    extra = ["--only", "conv_backwards"] if case == "unknown_exercise" else []
    assert main(["exercises", "check", str(target), *extra]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.split("\n")) == 1 and err.startswith("minideeplab exercises: error:")
    assert {"missing": "no such folder", "not_a_workspace": "is not an exercises workspace",
            "unknown_exercise": "unknown exercise 'conv_backwards'"}[case] in err


def test_new_refuses_a_non_empty_folder_without_force(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["exercises", "new", str(tmp_path)]) == 1
    assert "is not empty" in capsys.readouterr().err
    assert not (tmp_path / MANIFEST).exists()
    assert main(["exercises", "new", str(tmp_path), "--force"]) == 0
    assert (tmp_path / MANIFEST).exists() and (tmp_path / "notes.txt").read_text() == "mine"


# -- notebooks, README, questions -----------------------------------------------------------------------------------
nbformat = pytest.importorskip("nbformat")


def _notebooks(root):
    return {p.stem[:2]: nbformat.read(p, as_version=4) for p in sorted(root.glob("[0-9][0-9]_*.ipynb"))}


def _text(nb, kind=None):
    return "\n".join(c.source for c in nb.cells if kind is None or c.cell_type == kind)


def test_student_notebooks_are_valid_and_hold_stubs_not_answers(student_ws):
    notebooks = _notebooks(student_ws)
    assert sorted(notebooks) == ["01", "02", "03", "04", "05", "06"]
    for key, nb in notebooks.items():
        nbformat.validate(nb)
        text = _text(nb)
        assert "BEGIN SOLUTION" not in text and "**Answer.**" not in text and "## Questions" in text
        assert text.count("**Your answer:**") >= 3, key
        assert "from minideeplab import textbook" not in text
    assert "raise NotImplementedError" in _text(notebooks["01"], "code")
    assert "plus = L()" not in _text(notebooks["01"]) and "per_channel = dxb.sum" not in _text(notebooks["03"])
    assert "import textbook  # this workspace's textbook/" in _text(notebooks["03"], "code")


def test_instructor_notebooks_hold_the_solutions_and_answers(solution_ws):
    notebooks = _notebooks(solution_ws)
    for key, nb in notebooks.items():
        nbformat.validate(nb)
        text = _text(nb)
        assert "BEGIN SOLUTION" not in text and "HINT" not in text and text.count("**Answer.**") >= 3, key
    assert "plus = L()" in _text(notebooks["01"], "code") and "per_channel = dxb.sum" in _text(notebooks["03"])
    questions = (solution_ws / "QUESTIONS.md").read_text()
    assert questions.count("**Answer.**") >= 18 and "0.199" in questions


def test_the_readmes_say_what_to_do(student_ws, solution_ws):
    readme = (student_ws / "README.md").read_text()
    assert f"minideeplab exercises check {student_ws} --only conv_backward" in readme
    assert all(f"`{name}`" in readme for name in NAMES) and "YOUR CODE HERE" in readme
    assert "instructor's version" in (solution_ws / "README.md").read_text()
    assert "Your answer" in (student_ws / "QUESTIONS.md").read_text()


def test_the_repository_notebooks_are_the_instructors_version():
    from pathlib import Path
    root = Path(__file__).resolve().parents[1] / "notebooks"
    text = "\n".join(_text(nb) for nb in _notebooks(root).values())
    assert "BEGIN SOLUTION" not in text and text.count("**Answer.**") >= 18 and "plus = L()" in text


# -- the answers' numbers, computed with the package ----------------------------------------------------------------
def _answers(root, key):
    nb = _notebooks(root)[key]
    return _text(nb, "markdown").split("## Questions")[1]


def test_the_answers_numbers_are_the_packages(solution_ws):
    from minideeplab.analysis import count_params, receptive_field, valid_weight_histogram
    from minideeplab.losses import BCEWithLogitsLoss
    from minideeplab.models import deeplabv3_densenet121, densenet121
    rng = np.random.default_rng(0)
    a01 = _answers(solution_ws, "01")
    cols = textbook.im2col(np.zeros((2, 3, 224, 224)), 7, 2, 3)
    assert textbook.conv_output_size(224, 7, 2, 3) == 112 and str(cols.shape).replace(" ", "") in a01.replace(" ", "")
    assert f"{cols[0].size / (3 * 224 * 224):.2f}×" in a01
    counts = textbook.col2im(textbook.im2col(np.ones((1, 1, 3, 3)), 3, 1, 1), (1, 1, 3, 3), 3, 1, 1)[0, 0]
    assert str(counts.astype(int).tolist()) in a01
    a02 = _answers(solution_ws, "02")
    rf = [receptive_field(densenet121(output_stride=o, rng=rng), 512).final.rf[0] for o in (32, 16, 8)]
    assert rf == [2071, 2055, 2047] and "2055 − 8 = 2047" in a02 and rf[0] - rf[1] == 16
    assert f"{count_params(deeplabv3_densenet121(output_stride=8, rng=rng)):,}" in a02
    a03 = _answers(solution_ws, "03")
    block = densenet121(rng=rng).features.denseblock1
    assert (block.denselayer6.conv1.in_channels, block.denselayer6.conv1.out_channels, block.out_channels) == \
        (224, 128, 256)
    assert all(f"**{n}**" in a03 for n in (224, 128, 256))
    a04 = _answers(solution_ws, "04")
    h33, h65, h65_36, h16 = (valid_weight_histogram(s, r) for s, r in ((33, 18), (65, 18), (65, 36), (16, 18)))
    assert h33[9] == 0 and h65_36[9] == 0 and h16[1] == 1.0
    for value in (h33[4], h33[2], h33[1], h65[9], h65[6], h65[4], h65_36[4]):
        assert f"{value:.3f}" in a04
    a05 = _answers(solution_ws, "05")
    loss = BCEWithLogitsLoss(reduction="none")
    x = np.array([0.0, 4.0, -4.0]).reshape(1, 1, 1, 3)
    loss(x, np.ones_like(x))
    g = loss.backward(np.ones_like(x)).ravel()
    assert all(f"**−{abs(v):.{d}f}**" in a05 for v, d in zip(g, (1, 3, 3)))


def test_batchnorm_dx_sums_to_zero_per_channel_in_training_only(rng):
    """Notebook 03's exercise and answer: true in training mode, false in eval mode."""
    bn = textbook.BatchNorm2d(3, dtype=np.float64)
    bn.weight.data[...] = rng.uniform(0.5, 1.5, 3)
    x = rng.standard_normal((4, 3, 5, 5)) * 2 + 1
    bn(x)
    dx = bn.backward(rng.standard_normal(x.shape))
    assert np.abs(dx.sum(axis=(0, 2, 3))).max() < 1e-12 * np.abs(dx).sum()
    bn.eval()
    bn(x)
    dx = bn.backward(rng.standard_normal(x.shape))
    assert np.abs(dx.sum(axis=(0, 2, 3))).max() > 1e-3


@pytest.mark.notebooks
def test_a_workspace_notebook_runs_on_the_workspaces_own_textbook(solution_ws, monkeypatch):
    """Jupyter starts the kernel in the workspace: ``import textbook`` is the workspace's copy."""
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("MINIDEEPLAB_SHORT", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(solution_ws / "03_batchnorm_and_dense_blocks.ipynb", as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell("print(textbook.__file__)"))
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(solution_ws)}}).execute()
    printed = nb.cells[-1].outputs[0]["text"].strip()
    assert printed == str((solution_ws / "textbook" / "__init__.py").resolve())
