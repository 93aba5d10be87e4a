"""`tgpo train` (tgpo_trl/scripts/train.py, behind the `tgpo` command and the `scripts/train.py` wrapper): `--help`, the
demo end to end at the reduced size, a user's local dataset with LoRA, the push to the Hub, the one-line errors for bad
input, raised before any model is loaded (and, under `tgpo`, before accelerate starts a process), and how `tgpo` hands
accelerate's launch options to `accelerate launch`."""

import json
import os
import subprocess
import sys
from pathlib import Path


os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from datasets import Dataset, DatasetDict  # noqa: E402

import tgpo_trl.cli
from tgpo_trl import CHECKPOINTING_FIELD  # noqa: E402
from tgpo_trl.demo import run as demo_run  # noqa: E402
from tgpo_trl.demo.build import build_demo_models  # noqa: E402
from tgpo_trl.scripts import PROG_VARIABLE
from tgpo_trl.scripts import train as train_script


ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train.py"  # the wrapper a checkout runs
TGPO = [sys.executable, "-m", "tgpo_trl.cli"]  # the `tgpo` console command, without an installed entry point
# Subprocesses: one thread each (two cores are shared), offline, the same demo cache as this process
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
SMALL_RUN = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--num_generations", "4",
             "--max_completion_length", "8", "--use_cpu", "true", "--bf16", "false", f"--{CHECKPOINTING_FIELD}",
             "false", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def script():
    return train_script


@pytest.fixture(scope="module")
def quick_models():
    """The reduced demo build, from the default cache ($TGPO_DEMO_CACHE): built once, reused by every run below."""
    return build_demo_models(size="quick", progress=False)


def run_script(*args, cwd=ROOT, timeout=600, command=(sys.executable, str(SCRIPT))):
    return subprocess.run([*command, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout,
                          check=False)


@pytest.mark.parametrize("command", [(sys.executable, str(SCRIPT)), (*TGPO, "train")], ids=["script", "tgpo"])
def test_help_documents_every_option_family(command):
    result = run_script("--help", command=command)
    assert result.returncode == 0, result.stderr
    for flag in ("--teacher_model_name_or_path", "--guidance", "--guidance_coef", "--guidance_decay_steps",  # TGPO
                 "--num_generations", "--use_vllm", "--loss_type",  # GRPO
                 "--use_peft", "--lora_r", "--lora_target_modules",  # ModelConfig
                 "--dataset_name", "--dataset_prompt_column", "--dataset_answer_column", "--system_prompt",
                 "--reward_funcs", "--demo_size", "--config"):
        assert flag in result.stdout, flag
    assert "exact_match, format, accuracy" in " ".join(result.stdout.split())  # the reward registry
    launched = command[-1] == "train"  # under `tgpo`, the usage names it and the help says where launch options go
    assert result.stdout.startswith("usage: tgpo train" if launched else "usage: train.py")
    assert ("--num_processes" in result.stdout and "--accelerate_config" in result.stdout) is launched


def test_tgpo_lists_its_commands(capsys):
    assert tgpo_trl.cli.main([]) == 0  # no command: the list of commands
    listed = capsys.readouterr().out
    assert listed.startswith("usage: tgpo") and "train" in listed and "gap-report" in listed
    with pytest.raises(SystemExit) as exit_info:
        tgpo_trl.cli.main(["evaluate"])
    assert exit_info.value.code == 2 and "invalid choice: 'evaluate'" in capsys.readouterr().err


def test_demo_end_to_end_at_the_reduced_size(quick_models, tmp_path):
    """What `accelerate launch scripts/train.py` does, on the quick build and for 2 steps."""
    output_dir = tmp_path / "demo"
    result = run_script("--demo_size", "quick", "--max_steps", "2", "--output_dir", str(output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "held-out accuracy" in result.stdout and "before training" in result.stdout

    results = json.loads((output_dir / demo_run.RESULTS_FILE).read_text())
    assert results["student"] == demo_run.STUDENT and results["guidance"] == "tgpo" and results["eval_size"] == 64
    for key in ("before", "after"):
        assert 0.0 <= results[key]["accuracy"] <= 1.0 and results[key]["mean_length"] > 0
    assert (output_dir / "model.safetensors").exists() and (output_dir / "tokenizer.json").exists()

    card = (output_dir / "README.md").read_text()
    assert "TGPO" in card and "2605.13230" in card and "@article{tgpo2026" in card  # trainer name, paper, citation
    for tag in ("- trl", "- tgpo", "- tgpo-demo"):
        assert tag in card, tag
    assert demo_run.TASK_NAME in card
    assert "## Demo results" in card and f"{results['after']['accuracy']:.1%}" in card


def test_no_arguments_means_the_full_demo(script):
    script_args, training_args, _ = script.parse_args([])
    assert script_args.demo_size == "full" and script_args.reward_funcs == ["exact_match"]
    assert training_args.output_dir == "outputs/tgpo-demo" and training_args.max_steps == 300
    assert not training_args.bf16
    # Flags override the demo's settings; without a student and a dataset it is still the demo
    script_args, training_args, _ = script.parse_args(["--max_steps", "7", "--guidance", "none"])
    assert (script_args.demo_size, training_args.max_steps, training_args.guidance) == ("full", 7, "none")
    script_args, training_args, _ = script.parse_args(["--demo_size", "quick", "--max_steps", "7"])
    assert (script_args.demo_size, training_args.max_steps) == ("quick", 7)
    assert training_args.guidance_decay_steps == demo_run.demo_defaults("quick")["guidance_decay_steps"]


def test_a_student_or_a_dataset_means_no_demo(script, tmp_path):
    for argv in (["--model_name_or_path", "m"], ["--dataset-name", "d"], ["--help"]):
        assert script.requested_demo(argv) is None, argv
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: m\n")
    assert script.requested_demo(["--config", str(recipe)]) is None
    assert script.requested_demo(["--config", str(recipe), "--demo_size", "quick"]) == "quick"
    assert script.requested_demo(["--output_dir", "x"]) == "full"


@pytest.fixture
def local_dataset(tmp_path):
    """A user's dataset: a `save_to_disk` folder whose columns are not named `prompt` / `answer`."""
    rows = {"question": ["12+34+56", "11+22+33", "40+50+60", "19+28+37"], "final": ["102", "66", "150", "84"]}
    path = tmp_path / "my_dataset"
    DatasetDict({"train": Dataset.from_dict(rows)}).save_to_disk(path)
    return path


def test_local_dataset_with_lora_trains_saves_and_writes_the_card(script, quick_models, local_dataset, tmp_path):
    output_dir = tmp_path / "lora"
    script.cli([
        "--model_name_or_path", str(quick_models.student_large_gap),
        "--teacher_model_name_or_path", str(quick_models.teacher),
        "--dataset_name", str(local_dataset), "--dataset_prompt_column", "question", "--dataset_answer_column", "final",
        "--reward_funcs", "exact_match", "format", "--max_prompt_length", "16",
        "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--lora_target_modules", "q_proj", "v_proj",
        "--output_dir", str(output_dir), *SMALL_RUN,
    ])
    assert (output_dir / "adapter_model.safetensors").exists()
    assert json.loads((output_dir / "adapter_config.json").read_text())["r"] == 4
    card = (output_dir / "README.md").read_text()
    assert "TGPO" in card and "2605.13230" in card and "tgpo" in card
    assert "huggingface.co/datasets" not in card  # a local dataset gets no Hub link


class FakeHub:
    """Stands in for `huggingface_hub.HfApi`: records what TRL's push path creates and uploads."""

    def __init__(self):
        self.repos, self.uploads = [], []

    def create_repo(self, repo_id, **kwargs):
        self.repos.append(repo_id)
        return type("RepoUrl", (), {"repo_id": repo_id})()

    def upload_folder(self, repo_id, folder_path, **kwargs):
        files = {path.name: path.read_text() if path.suffix == ".md" else None for path in Path(folder_path).iterdir()}
        self.uploads.append((repo_id, files))


def test_push_to_hub_goes_through_the_trainer(script, quick_models, local_dataset, tmp_path, monkeypatch):
    import transformers.trainer

    hub = FakeHub()
    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    output_dir = tmp_path / "pushed"
    script.cli([
        "--model_name_or_path", str(quick_models.student_small_gap), "--guidance", "none",
        "--dataset_name", str(local_dataset), "--dataset_prompt_column", "question", "--dataset_answer_column", "final",
        "--reward_funcs", "exact_match", "--push_to_hub", "true", "--hub_model_id", "me/tgpo-test",
        "--output_dir", str(output_dir), *SMALL_RUN,
    ])
    assert hub.repos == ["me/tgpo-test"]
    [(repo_id, files)] = hub.uploads  # one upload, with the model and its card
    assert repo_id == "me/tgpo-test" and "model.safetensors" in files
    assert "TGPO" in files["README.md"] and "2605.13230" in files["README.md"]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Bad input must stop before a model (student or teacher) is loaded."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def error_line(script, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        script.cli(argv)
    message = exit_info.value.code
    assert isinstance(message, str) and "\n" not in message and message.startswith("train.py: error: ")
    return message


def test_bad_input_stops_with_one_line(script, local_dataset, tmp_path, no_model_loading):
    base = ["--model_name_or_path", "student", "--teacher_model_name_or_path", "teacher",
            "--dataset_name", str(local_dataset), "--dataset_prompt_column", "question", "--dataset_answer_column",
            "final", "--use_cpu", "true", "--output_dir", str(tmp_path / "out")]

    message = error_line(script, [*base, "--dataset_answer_column", "solution"])
    assert "no column 'solution'" in message and "question, final" in message

    message = error_line(script, [*base, "--reward_funcs", "exact_match", "accurracy"])
    assert "'accurracy'" in message and "exact_match, format, accuracy" in message
    assert "my_rewards.nothing" in error_line(script, [*base, "--reward_funcs", "my_rewards.nothing"])

    assert "missing.yaml" in error_line(script, ["--config", str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("guidance: [tgpo\n")
    assert "broken.yaml" in error_line(script, ["--config", str(broken)])
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text("use_cpu: true\nguidance_lambda: 0.1\n")
    assert "guidance_lambda" in error_line(script, ["--config", str(renamed)])
    assert "guidance" in error_line(script, [*base, "--guidance_coef", "-1"])

    assert "--model_name_or_path" in error_line(script, base[2:])
    assert "--teacher_model_name_or_path" in error_line(script, ["--model_name_or_path", "student", *base[4:]])
    assert "my_dataset" in error_line(script, [*base, "--dataset_train_split", "validation"])


# ---------------------------------------------------------------------------------------------- `tgpo` and accelerate


@pytest.fixture
def launched(monkeypatch):
    """What `tgpo` hands to `accelerate launch` (the parsed launch arguments), instead of launching."""
    calls = []
    monkeypatch.setattr("accelerate.commands.launch.launch_command", calls.append)
    monkeypatch.setenv(PROG_VARIABLE, "")  # `tgpo` sets it; unset again after the test
    return calls


def test_tgpo_passes_launch_options_to_accelerate_and_fields_to_the_script(launched, tmp_path):
    import trl

    fields = ["--demo_size", "quick", "--max_steps", "3", "--guidance", "none"]
    assert tgpo_trl.cli.main(["train", "--num_processes", "2", *fields[:2], "--main_process_port", "29512",
                              *fields[2:]]) == 0
    [args] = launched
    script = Path(args.training_script)
    assert script.is_file() and script == Path(train_script.__file__)  # the package's script, not the checkout's
    assert args.training_script_args == fields  # in the order given, the launch options taken out
    assert (args.num_processes, args.main_process_port) == (2, 29512)
    assert os.environ[PROG_VARIABLE] == "tgpo train"  # the launched processes' errors name the command

    # --accelerate_config: a file, or a config TRL ships (resolved by TRL, as `trl grpo` resolves it)
    recipe = ROOT / "recipes" / "accelerate" / "ddp_cpu_2proc.yaml"
    tgpo_trl.cli.main(["train", "--accelerate_config", str(recipe), "--demo_size", "quick"])
    tgpo_trl.cli.main(["train", "--accelerate_config", "zero3", "--demo_size", "quick"])
    assert launched[1].config_file == str(recipe) and launched[1].training_script_args == ["--demo_size", "quick"]
    assert Path(launched[2].config_file) == Path(trl.__file__).parent / "accelerate_configs" / "zero3.yaml"

    # no arguments: the demo, with nothing for accelerate
    tgpo_trl.cli.main(["train"])
    assert launched[3].training_script_args == [] and launched[3].num_processes is None


def test_tgpo_stops_bad_input_before_launching(launched, tmp_path, capsys):
    """What can be told from the arguments alone stops `tgpo` before accelerate starts a process: a flag that is neither
    a field nor a launch option, a config key that is no field, a bad choice or type, a missing file."""
    def error(*argv) -> str:
        with pytest.raises(SystemExit) as exit_info:
            tgpo_trl.cli.main(["train", *argv])
        message = exit_info.value.code
        if message == 2:  # argparse's own error: usage, then the error line
            message = capsys.readouterr().err.strip().splitlines()[-1]
        assert isinstance(message, str) and "\n" not in message and message.startswith("tgpo train: error: ")
        return message

    assert "--max_stepz" in error("--demo_size", "quick", "--max_stepz", "5")  # neither a field nor a launch option
    renamed = tmp_path / "renamed.yaml"
    renamed.write_text("use_cpu: true\nguidance_lambda: 0.1\nnum_processes: 2\n")
    message = error("--config", str(renamed))
    assert "guidance_lambda" in message and "num_processes" in message and "command line" in message
    assert "missing.yaml" in error("--config", str(tmp_path / "missing.yaml"))
    assert "--guidance" in error("--guidance", "tgpx") and "invalid choice" in error("--guidance", "tgpx")
    assert "--max_steps" in error("--max_steps", "ten")
    assert "no_such_config" in error("--demo_size", "quick", "--accelerate_config", "no_such_config")
    assert launched == []


def test_an_error_in_the_launched_process_names_the_command(quick_models, local_dataset, tmp_path):
    """The dataset is read, and the fields' values checked, in the launched process: its error names `tgpo train`, in
    one line, with no traceback."""
    result = run_script("--model_name_or_path", str(quick_models.student_small_gap), "--teacher_model_name_or_path",
                        str(quick_models.teacher), "--dataset_name", str(local_dataset), "--dataset_prompt_column",
                        "question", "--dataset_answer_column", "solution", "--use_cpu", "true", "--output_dir", str(tmp_path / "out"), command=(*TGPO, "train"))
    assert result.returncode == 1
    assert "tgpo train: error: " in result.stderr and "no column 'solution'" in result.stderr
    assert "Traceback" not in result.stderr
