"""tutorial.ipynb runs top to bottom (CPU, small budgets) in a Jupyter kernel of this very Python,
shows what it promises, and calls the project's functions instead of copying them."""
import ast
import json
import os
import sys

import nbformat
import pytest
from nbclient import NotebookClient

import data
import eval as evaluation
import rewards
import unigrpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "tutorial.ipynb")


def _code(nb):
    return [c.source for c in nb.cells if c.cell_type == "code"]


def test_committed_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, (f"cells {dirty} of tutorial.ipynb hold outputs; clear them before committing "
                       "(Jupyter: Edit > Clear Outputs of All Cells) to keep diffs readable")


def test_notebook_defines_no_copy_of_a_project_function():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    defined = {n.name for src in _code(nb) for n in ast.walk(ast.parse(src)) if isinstance(n, ast.FunctionDef)}
    copies = sorted(name for name in defined for m in (data, rewards, unigrpo, evaluation) if hasattr(m, name))
    assert not copies, f"the notebook redefines {copies}; call the project's own function instead"


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    parent = tmp_path_factory.mktemp("tutorial_dir")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # a last cell that reports which Python the kernel is: "python3" must resolve to this interpreter
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    old = os.environ.get("TUTORIAL_DIR")
    os.environ["TUTORIAL_DIR"] = str(parent)  # the kernel inherits the environment
    try:
        # any cell that raises fails the test (CellExecutionError names the cell and the traceback)
        NotebookClient(nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": ROOT}}).execute()
    finally:
        if old is None:
            os.environ.pop("TUTORIAL_DIR")
        else:
            os.environ["TUTORIAL_DIR"] = old
    return nb, parent / "tutorial"


def test_notebook_runs_in_this_python(executed):
    nb, _ = executed
    printed = "".join(o.text for o in nb.cells[-1].outputs if o.output_type == "stream").strip()
    assert os.path.realpath(printed) == os.path.realpath(sys.executable), (printed, sys.executable)


def test_notebook_trains_both_stages_and_shows_pictures(executed):
    nb, out = executed
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    warm = [r for r in rows if r["stage"] == "warmup"]
    grpo = [r for r in rows if r["stage"] == "grpo" and "eval/reward" not in r]
    held_out = [r["iter"] for r in rows if r["stage"] == "grpo" and "eval/reward" in r]
    state = unigrpo.load_state(str(out / "grpo"))
    assert state is not None and state["iter"] == len(grpo) > 1, "GRPO logs every step of its run"
    assert held_out[0] == 0 and held_out[-1] == state["iter"], "and evaluates before and after"
    assert warm[-1]["loss"] < warm[0]["loss"], "the warm-up lowers the NLL"
    for r in grpo:
        assert all(k in r for k in ("reward", "rewards/format/mean", "rewards/text/mean", "rewards/visual/mean", "kl"))
    boards = os.listdir(out / "storyboards")
    assert any(b.startswith("warmup_") and b.endswith(".png") for b in boards)
    assert any(b.startswith("grpo_") and b.endswith(".png") for b in boards)
    pictures = sum("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert pictures >= 10, f"only {pictures} pictures shown"  # world, VQ, storyboards, plots
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    for shown in ("parse(describe(s)) == s: True", "parse_image(render(s)) == s: True", "A_proc", "| oracle_step |"):
        assert shown in text, shown
