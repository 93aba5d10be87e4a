"""The package as a user installs it: a wheel built from this checkout, installed into a fresh virtual environment that
reuses the installed dependencies (offline, no index), and the `tgpo` command run from a folder with no checkout:
`tgpo train --help`, `tgpo gap-report --help` and the quick demo to a saved model with its card."""

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tgpo_trl.demo.build import build_demo_models

ROOT = Path(__file__).resolve().parents[1]
# What a source tree of the project is without its build outputs, caches and runs
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "outputs", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".ruff_cache", ".whl", ".gl")


def run(command, cwd, env, timeout=600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout, check=False)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the venv's bin folder, a folder with no checkout, the environment to run in)."""
    work = tmp_path_factory.mktemp("package")
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TRL_EXPERIMENTAL_SILENCE="1", PIP_NO_INDEX="1",
               PIP_DISABLE_PIP_VERSION_CHECK="1")
    # A copy of the source, so that no stale build/ of the checkout ends up in the wheel
    source = work / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", work / "dist",
         source], work, env)
    [wheel] = (work / "dist").glob("tgpo_trl-*.whl")
    # The venv sees the installed dependencies (and pip) through the system site-packages; its own tgpo_trl shadows
    # any other install of the project there
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", work / "venv"], work, env)
    bin_dir = work / "venv" / "bin"
    run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", wheel], work, env)
    user_dir = work / "user"  # no checkout here: nothing of the repository is on the path
    user_dir.mkdir()
    return bin_dir, user_dir, env, wheel


def test_the_wheel_holds_the_entry_points_and_the_package_data(installed):
    *_, wheel = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt"))
    for name in ("tgpo_trl/cli.py", "tgpo_trl/scripts/train.py", "tgpo_trl/scripts/gap_report.py",
                 "tgpo_trl/gap_report.py", "tgpo_trl/templates/model_card.md", "tgpo_trl/demo/run.py"):
        assert name in names, name
    assert "tgpo = tgpo_trl.cli:main" in entry_points


def test_the_installed_package_is_the_one_imported(installed):
    bin_dir, user_dir, env, _ = installed
    result = run([bin_dir / "python", "-c", "import tgpo_trl.cli, tgpo_trl.scripts.train as t; print(t.__file__)"],
                 user_dir, env)
    assert Path(result.stdout.strip()).is_relative_to(bin_dir.parent), result.stdout


@pytest.mark.parametrize("command, flags", [
    ("train", ["--teacher_model_name_or_path", "--guidance", "--cross_tokenizer_targets", "--lora_r", "--demo_size",
               "--num_processes", "--accelerate_config"]),
    ("gap-report", ["--gap_num_prompts", "--gap_prefix_fractions", "--gap_demo_student", "--teacher_model_name_or_path"]),
])
def test_help_from_the_installed_command(installed, command, flags):
    bin_dir, user_dir, env, _ = installed
    result = run([bin_dir / "tgpo", command, "--help"], user_dir, env)
    assert result.stdout.startswith(f"usage: tgpo {command}")
    for flag in flags:
        assert flag in result.stdout, flag


def test_the_quick_demo_from_the_installed_command(installed):
    """`tgpo train --demo_size quick`, through accelerate, to a saved model, its card (naming the teacher) and the demo's
    results. The demo's models come from the user's cache, built once (the suite's other demo tests share it)."""
    bin_dir, user_dir, env, _ = installed
    models = build_demo_models(size="quick", progress=False)
    out = user_dir / "demo"
    result = run([bin_dir / "tgpo", "train", "--demo_size", "quick", "--max_steps", "2", "--output_dir", out],
                 user_dir, env)
    assert "held-out accuracy" in result.stdout
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert (out / "demo_results.json").exists()
    card = (out / "README.md").read_text()
    assert "TGPO" in card and "2605.13230" in card and str(models.teacher) in card
