"""
TGPO across processes, launched for real: `accelerate launch` with the 2-process CPU variants of recipes/accelerate/
(DeepSpeed ZeRO-3 over gloo, and plain data parallelism), checked against one process. Each launch runs several
scenarios of tests/distributed/run_tgpo.py, which writes what every rank saw to JSON; the tests read those files and
the models the runs saved. The ZeRO-3 launch also trains and resumes with a teacher of another tokenizer
(cross-tokenizer scoring).
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import vlm_models
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from vllm_standin import StandInServer

from tgpo_trl.demo.build import cross_tokenizer_corpus
from tgpo_trl.demo.models import tiny_llama, tiny_qwen2
from tgpo_trl.demo.tokenizer import build_byte_level_tokenizer, build_char_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "distributed" / "run_tgpo.py"
RECIPES = ROOT / "recipes" / "accelerate"
# Logged values that must agree between 1 and 2 processes (timings aside)
COMPARED = ("loss", "grad_norm", "guidance/loss", "guidance/coef", "gap/reverse_kl", "gap/mismatch_ratio", "entropy")


def free_port() -> int:
    # Other test sessions may run on this machine: never rely on torchrun's default port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_worker(models: Path, out: Path, scenarios: list[str], recipe: str | None = None,
               env: dict | None = None) -> dict[str, list[dict]]:
    """Run the worker in one process, or under `accelerate launch --config_file recipe`: the reports, per scenario and
    rank. `env` adds environment variables."""
    command = [str(WORKER), "--models", str(models), "--out", str(out), "--scenarios", ",".join(scenarios)]
    if recipe is None:
        command = [sys.executable, *command]
    else:
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / recipe)]
        command = [*launch, "--main_process_port", str(free_port()), *command]
    # The environment (HF_HUB_OFFLINE=1 from conftest among it) is inherited by the launcher and every rank. The
    # launcher leads a process group of its own, so that ranks stuck past the timeout (a collective one rank never
    # joins) are killed with it, not left running beside the rest of the suite.
    process = subprocess.Popen(
        command, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"{' '.join(command)} did not finish in 420 s:\n{stdout[-3000:]}\n{stderr[-6000:]}")
    assert process.returncode == 0, f"{' '.join(command)} failed:\n{stdout[-3000:]}\n{stderr[-6000:]}"
    return {
        name: [json.loads(path.read_text()) for path in sorted((out / name).glob("rank*.json"))] for name in scenarios
    }


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """
    A tiny student and a larger teacher with a padded embedding, saved with the tokenizer, loaded by path;
    `teacher_shifted/`, that teacher with its output rows shifted by one id (a second teacher for routing); and
    `teacher_bpe/`, a Llama teacher with a byte-level BPE of its own that merges digits and separators (as
    tests/test_cross_tokenizer.py builds it), saved with that tokenizer.
    """
    directory = tmp_path_factory.mktemp("models")
    tokenizer = build_char_tokenizer()
    student = tiny_qwen2(tokenizer, hidden_size=32, num_layers=2, seed=0)
    teacher = tiny_qwen2(tokenizer, hidden_size=48, num_layers=2, seed=1, vocab_size=len(tokenizer) + 7)
    shifted = tiny_qwen2(tokenizer, hidden_size=48, num_layers=2, seed=1, vocab_size=len(tokenizer) + 7)
    with torch.no_grad():  # `teacher` with its output rows shifted by one id: it disagrees with it at every token
        shifted.lm_head.weight.copy_(torch.roll(teacher.lm_head.weight, shifts=-1, dims=0))
    for name, model in (("student", student), ("teacher", teacher), ("teacher_shifted", shifted)):
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
    bpe = build_byte_level_tokenizer(cross_tokenizer_corpus(), vocab_size=400)
    tiny_llama(bpe, hidden_size=48, num_layers=2, seed=1).save_pretrained(directory / "teacher_bpe")
    bpe.save_pretrained(directory / "teacher_bpe")
    for name in ("vlm_student", "vlm_twin"):  # the same seed: the twin is the student's copy
        vlm_models.save("llava_next", directory / name, seed=0)
    return directory


def served_run(models: Path, out: Path, scenarios: list[str], recipe: str | None = None):
    """`run_worker` with the teacher's stand-in server up (for `served_step`); the reports, and the server's requests."""
    with StandInServer(models / "teacher") as server:
        reports = run_worker(models, out, scenarios, recipe, env={"TGPO_TEST_TEACHER_SERVER": server.url})
    return reports, server.requests


@pytest.fixture(scope="module")
def single(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    reports, requests = served_run(models, out, ["step", "served_step", "routed_step"])
    return out, reports, requests


@pytest.fixture(scope="module")
def zero3(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    # cross_resume and vlm_twin last: they run after the other scenarios have written their reports
    return out, run_worker(models, out, ["step", "resume", "lora", "routed_step", "cross_resume", "vlm_twin"],
                           recipe="zero3_cpu_2proc.yaml")


@pytest.fixture(scope="module")
def ddp(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    reports, requests = served_run(models, out, ["step", "resume", "served_step", "routed_step"],
                                   recipe="ddp_cpu_2proc.yaml")
    return out, reports, requests


def training_rows(log_history: list[dict]) -> list[dict]:
    return [row for row in log_history if "loss" in row]


def assert_half_on_each_rank(summaries: list[dict]):
    """ZeRO-3: every parameter partitioned, each of the 2 ranks owning half of the elements (+1 padding at most)."""
    for summary in summaries:
        assert summary["num_partitioned"] == summary["num_params"] > 0
        assert summary["total"] / 2 <= summary["partition"] <= summary["total"] / 2 + summary["num_params"]
    assert sum(summary["partition"] for summary in summaries) >= summaries[0]["total"]


def assert_same_step(reports: list[dict], reference: dict, out: Path, reference_out: Path, models: Path,
                     scenario: str = "step"):
    """The logged step and the saved weights of a multi-process run equal those of one process."""
    assert [report["world_size"] for report in reports] == [2, 2]
    (expected,) = training_rows(reference["log_history"])
    for report in reports:  # every rank logs the same, global, values
        (row,) = training_rows(report["log_history"])
        for key in COMPARED:
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert expected["guidance/loss"] > 0 and expected["guidance/coef"] == 0.5

    # SGD without clipping: the weight change is -lr * gradient, so equal weights are equal gradient steps
    initial = load_file(models / "student" / "model.safetensors")
    one = load_file(reference_out / scenario / "final" / "model.safetensors")
    two = load_file(out / scenario / "final" / "model.safetensors")
    assert one.keys() == two.keys() == initial.keys()
    moved = max((one[name] - initial[name]).abs().max().item() for name in initial)
    assert moved > 1e-3
    for name in initial:
        torch.testing.assert_close(two[name] - initial[name], one[name] - initial[name], atol=1e-6, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- DeepSpeed ZeRO-3


def test_zero3_partitions_teacher_and_student(zero3):
    _, reports = zero3
    step = reports["step"]
    assert all(report["teacher_is_deepspeed_engine"] and report["student_is_deepspeed_engine"] for report in step)
    assert_half_on_each_rank([report["teacher"] for report in step])
    for report in step:
        # Prepared, the teacher holds no full parameter; after scoring, at most those ZeRO-3 keeps whole by design
        # (below `stage3_param_persistence_threshold`, 1e5 elements: for a 30B teacher its norms, here all of them)
        assert report["teacher"]["resident"] == 0
        assert report["teacher_after_step"]["resident"] <= report["teacher_after_step"]["persistent"]
    assert_half_on_each_rank([report["student"] for report in step])


def test_zero3_step_equals_one_process(zero3, single, models):
    out, reports = zero3
    single_out, single_reports, _ = single
    assert_same_step(reports["step"], single_reports["step"][0], out, single_out, models)


def test_zero3_final_model_is_a_hugging_face_checkpoint(zero3, single):
    out, _ = zero3
    single_out, _, _ = single
    # Gathered on save (`zero3_save_16bit_model`): the whole model, not ZeRO partitions, loadable without DeepSpeed
    final = out / "step" / "final"
    assert not list(final.glob("global_step*")) and not (final / "pytorch_model.bin").exists()
    model = AutoModelForCausalLM.from_pretrained(final)
    reference = AutoModelForCausalLM.from_pretrained(single_out / "step" / "final")
    for (name, param), (_, expected) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert param.shape == expected.shape and param.numel() > 0, name
        torch.testing.assert_close(param, expected, atol=1e-6, rtol=1e-4)


def test_zero3_checkpoint_resumes_the_guidance_schedule(zero3, models):
    out, reports = zero3
    # lambda_k = 0.5 * (1 - (k - 1) / 4): 0.5, 0.375 before the checkpoint; a fresh start would log 0.5 again
    for report in reports["resume"]:
        assert [row["guidance/coef"] for row in training_rows(report["first_log_history"])] == [0.5, 0.375]
        resumed = training_rows(report["resumed_log_history"])
        assert [row["step"] for row in resumed] == [1, 2, 3]  # steps 1-2 restored from the checkpoint, 3 trained
        assert report["resumed_steps_run"] == [3]
        assert resumed[-1]["guidance/coef"] == 0.25
        assert resumed[-1]["guidance/loss"] > 0
    assert_half_on_each_rank([report["teacher"] for report in reports["resume"]])
    checkpoint = out / "resume" / "checkpoint-2"
    # DeepSpeed's own checkpoint: each rank's partition of the parameters and of the optimizer state
    partitions = {tuple(re.search(r"zero_pp_rank_(\d+)_mp_rank_00_(\w+)_states", path.name).groups())
                  for path in (checkpoint / "global_step2").iterdir()}
    assert partitions == {(rank, kind) for rank in "01" for kind in ("model", "optim")}
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    # A bfloat16 run saves the gathered 16-bit weights, whole
    final = load_file(out / "resume" / "final" / "model.safetensors")
    initial = load_file(models / "student" / "model.safetensors")
    assert {name: weight.shape for name, weight in final.items()} == {name: w.shape for name, w in initial.items()}
    assert {weight.dtype for weight in final.values()} == {torch.bfloat16}


def test_zero3_lora_student_saves_its_adapter(zero3, models):
    out, reports = zero3
    for report in reports["lora"]:  # with the top-k guidance ("tgpo_topk") this time
        assert report["trainable"] and all(".lora_" in name for name in report["trainable"])
        (row,) = training_rows(report["log_history"])
        assert row["guidance/loss"] > 0
    assert_half_on_each_rank([report["teacher_loaded"] for report in reports["lora"]])  # by `zero.Init`, at load
    assert_half_on_each_rank([report["teacher"] for report in reports["lora"]])
    final = out / "lora" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "model.safetensors").exists()
    adapter = load_file(final / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    for name, weight in adapter.items():
        assert weight.shape in ((4, 32), (32, 4)), name  # gathered, not the empty ZeRO-3 placeholders
    # lora_B starts at zero: the step moved it
    assert max(weight.abs().max().item() for name, weight in adapter.items() if "lora_B" in name) > 0
    student = AutoModelForCausalLM.from_pretrained(models / "student")
    PeftModel.from_pretrained(student, final)


def test_zero3_teacher_of_another_tokenizer_trains_and_resumes(zero3, models):
    out, reports = zero3
    cross = reports["cross_resume"]
    assert [report["world_size"] for report in cross] == [2, 2]
    for report in cross:  # detected on every rank from the tokenizer beside the teacher's weights, before and on resume
        assert report["first_cross_tokenizer"] and report["resumed_cross_tokenizer"]
        assert report["teacher_is_deepspeed_engine"]
    assert_half_on_each_rank([report["teacher"] for report in cross])  # the teacher of another family, sharded too

    for report in cross:
        first = training_rows(report["first_log_history"])
        resumed = training_rows(report["resumed_log_history"])
        assert [row["guidance/coef"] for row in first] == [0.5, 0.375]
        assert [row["step"] for row in resumed] == [1, 2, 3] and report["resumed_steps_run"] == [3]
        for row in first + resumed:
            # a BPE that merges digits and separators: only some student positions get a teacher target
            assert 0 < row["gap/aligned_ratio"] < 1, row["step"]
            assert math.isfinite(row["guidance/loss"]) and row["guidance/loss"] != 0, row["step"]
        step3 = resumed[-1]
        assert step3["guidance/coef"] == 0.25  # the linear schedule continued from the checkpoint, not restarted
        for key in ("loss", "grad_norm", "guidance/loss", "gap/reverse_kl", "gap/mismatch_ratio", "gap/aligned_ratio",
                    "entropy"):
            assert math.isfinite(step3[key]), key
    # Global means: every rank logs the same values
    rows = [training_rows(report["resumed_log_history"]) for report in cross]
    for key in ("guidance/loss", "gap/aligned_ratio", "guidance/coef"):
        assert [row[key] for row in rows[0]] == pytest.approx([row[key] for row in rows[1]], rel=1e-6), key

    assert json.loads((out / "cross_resume" / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2
    final = AutoModelForCausalLM.from_pretrained(out / "cross_resume" / "final")
    initial = load_file(models / "student" / "model.safetensors")
    assert {name: tuple(param.shape) for name, param in final.state_dict().items()} == {
        name: tuple(weight.shape) for name, weight in initial.items()
    }
    assert all(torch.isfinite(param).all() for param in final.parameters())


def test_zero3_teacher_sees_the_images_the_student_sees(zero3):
    """A vision-language student and its twin as the teacher, both partitioned: the teacher's scores come from GRPO's
    chunked forward with the student's image inputs, so the reverse KL of the first step is 0 on every rank."""
    _, reports = zero3
    twin = reports["vlm_twin"]
    assert [report["world_size"] for report in twin] == [2, 2]
    assert all(report["teacher_is_deepspeed_engine"] for report in twin)
    assert_half_on_each_rank([report["teacher"] for report in twin])
    for report in twin:
        (row,) = training_rows(report["log_history"])
        assert abs(row["gap/reverse_kl"]) < 1e-5 and row["gap/aligned_ratio"] == 1.0
        assert math.isfinite(row["guidance/loss"]) and row["guidance/loss"] > 0


# ---------------------------------------------------------------------------------------------- data parallel


def test_ddp_step_equals_one_process(ddp, single, models):
    out, reports, _ = ddp
    single_out, single_reports, _ = single
    assert_same_step(reports["step"], single_reports["step"][0], out, single_out, models)
    for report in reports["step"]:  # a full teacher on each process
        assert report["teacher"]["num_partitioned"] == 0
        assert report["teacher"]["partition"] == report["teacher"]["resident"] == report["teacher"]["total"]


def test_ddp_checkpoint_resumes_the_guidance_schedule(ddp):
    out, reports, _ = ddp
    for report in reports["resume"]:
        resumed = training_rows(report["resumed_log_history"])
        assert [row["guidance/coef"] for row in resumed] == [0.5, 0.375, 0.25]
        assert report["resumed_steps_run"] == [3]  # only step 3 trained: 1-2 came from the checkpoint
    assert AutoModelForCausalLM.from_pretrained(out / "resume" / "final").num_parameters() > 0


def test_ddp_served_teacher_step_equals_one_process(ddp, single, models):
    """A served teacher across processes: each rank sends the requests of its own rows (4 of the 8), and the step, its
    metrics and the saved weights equal one process's with the same served teacher."""
    out, reports, requests = ddp
    single_out, single_reports, single_requests = single
    assert_same_step(reports["served_step"], single_reports["served_step"][0], out, single_out, models,
                     scenario="served_step")
    assert not any(report["teacher_in_process"] for report in reports["served_step"] + single_reports["served_step"])

    def scored_rows(sent):  # the scoring requests (a probe sends one prompt of `PROBE_IDS + 1` ids)
        return sorted(len(request["prompt"]) for request in sent if len(request["prompt"][0]) < 60)

    assert scored_rows(single_requests) == [8]
    assert scored_rows(requests) == [4, 4]


# ---------------------------------------------------------------------------------------------- several teachers

ROUTED = tuple(f"{metric}/{name}" for name in ("a", "b") for metric in (
    "guidance/loss", "gap/reverse_kl", "gap/mismatch_ratio", "gap/aligned_ratio", "teacher/token_share"))


@pytest.mark.parametrize("launch", ["ddp", "zero3"])
def test_routed_teachers_across_ranks_equal_one_process(launch, request, single, models):
    """Two teachers routed by row, the ranks holding different mixes of them (rank 1 has no row of `a`): the step, its
    per-teacher metrics and the saved weights equal one process's; under ZeRO-3 both teachers are partitioned."""
    out, reports = request.getfixturevalue(launch)[:2]
    single_out, single_reports, _ = single
    assert_same_step(reports["routed_step"], single_reports["routed_step"][0], out, single_out, models,
                     scenario="routed_step")
    (expected,) = training_rows(single_reports["routed_step"][0]["log_history"])
    assert expected["teacher/token_share/a"] == pytest.approx(19 / 41)  # rows 0-2 of the fixed batch: 8 + 3 + 8 tokens
    for report in reports["routed_step"]:
        (row,) = training_rows(report["log_history"])
        for key in ROUTED:
            assert row[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
        if launch == "zero3":
            assert report["teachers_are_deepspeed_engines"]
            assert_half_on_each_rank([other["teachers"][name] for other in reports["routed_step"]
                                      for name in ("a",)])
            assert_half_on_each_rank([other["teachers"][name] for other in reports["routed_step"]
                                      for name in ("b",)])
