"""codelm as an installed package: `pip install -e .` and `pip install .` give the console scripts,
which run from any directory and find the files codelm ships (data/, configs/)."""

import site
import subprocess
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _venv_with_these_dependencies(path: Path) -> Path:
    """A fresh venv that reaches this interpreter's packages (torch, ...) through a .pth file, so
    that the install under test fetches nothing but its build backend."""
    venv.create(path, with_pip=True)
    python = path / "bin" / "python"
    own = subprocess.run([python, "-c", "import site; print(site.getsitepackages()[0])"],
                         check=True, capture_output=True, text=True).stdout.strip()
    Path(own, "deps.pth").write_text(site.getsitepackages()[0] + "\n")
    return python


@pytest.mark.slow
@pytest.mark.parametrize("editable", [True, False])
def test_the_console_scripts_run_from_another_directory(tmp_path, editable):
    """Installed (editable or not), every console script answers --help and codelm-train trains
    from another directory, finding the shipped data and spaces, as a user's pip install runs
    them."""
    python = _venv_with_these_dependencies(tmp_path / "venv")
    install = [python, "-m", "pip", "install", "-q", "--no-deps", *(["-e"] if editable else []),
               str(ROOT)]
    subprocess.run(install, check=True, capture_output=True, timeout=600)
    bin_dir = python.parent
    for script in ("codelm-train", "codelm-eval", "codelm-tune", "codelm-data", "codelm-scrape",
                   "codelm-recipe", "codelm-sandbox", "codelm-export-gguf"):
        run = subprocess.run([bin_dir / script, "--help"], capture_output=True, text=True,
                             cwd=tmp_path, timeout=300)
        assert run.returncode == 0 and "usage:" in run.stdout, (script, run.stderr)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    train = subprocess.run(
        [bin_dir / "codelm-train", "--preset", "tiny", "--max-steps", "2", "--data",
         str(ROOT / "data" / "overfit"), "--block-size", "32", "--batch-size", "2",
         "--eval-every", "2", "--no-progress", "--name", "pk"], capture_output=True, text=True,
        cwd=elsewhere, timeout=600)
    assert train.returncode == 0, train.stderr[-2000:]
    assert (elsewhere / "runs" / "pk" / "config.json").is_file()
    shipped = subprocess.run([python, "-c", "from codelm.evaluation.tasks import passk; "
                              "from codelm import search_space; import trainingmanager as t; "
                              "print(passk.PROBLEMS_FILE.is_file(), search_space.SPACES_DIR."
                              "is_dir(), t.OVERFIT_CORPUS.is_dir(), t.__file__)"],
                             capture_output=True, text=True, cwd=elsewhere, check=True)
    *found, module = shipped.stdout.split()
    assert found == ["True", "True", "True"]
    recipe = subprocess.run([python, "-c", "from codelm import recipes; "
                             "print(recipes.recipe_path('refactotron').is_file())"],
                            capture_output=True, text=True, cwd=elsewhere, check=True)
    assert recipe.stdout.split() == ["True"]
    assert (Path(module).parent == ROOT) is editable  # else the installed copy's
