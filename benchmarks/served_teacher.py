"""
A served teacher on the step's critical path or off it: TGPO's step time on CPU against GRPO's and the in-process
teacher's, as the generation batch is trained in more slices.

GRPO generates one batch of rollouts and trains it in `steps_per_generation` slices, one after another. A served
teacher's scores are collected per slice: the batch's requests go out slice by slice as soon as the completions exist,
and each slice waits only for its own, so the later slices are answered while the earlier ones train. Before, the whole
batch's scores were waited for when the batch was generated (`TGPOTrainer._collect_by_slice = False` measures that
path, with everything else the same).

The served teacher runs in its own process, serving the same weights the in-process trainer holds: real vLLM (`vllm
serve`, its CPU build from scripts/vllm_env.sh, `--enforce-eager`, one torch thread) and the test suite's stand-in
(`tests/vllm_standin.py`, vLLM's `/v1/completions` format, one torch thread). At a fixed generation batch (`batch`
rollouts), for each number of slices (`slices`; `gradient_accumulation_steps` = `steps_per_generation` = slices, one
optimizer step per batch), the trainers are GRPO without a teacher, TGPO with the teacher in process, and TGPO served,
before and after. All take the same fixed rollouts (no sampling, as the speed benchmark) and are alternated step by step
in one run, so machine load hits them alike. The trainer uses `--threads` torch threads.

Per step of a served trainer: `request` (`teacher/request_time`) = seconds from sending the batch's first requests
until the last answer was in; `wait` (`teacher/wait_time`) = how long the trainer was blocked on them. The share of the
teacher's time hidden = `1 - (served step - GRPO step) / request`.

    python benchmarks/served_teacher.py                      # about 12 minutes on 2 cores (vLLM's start included)
    python benchmarks/served_teacher.py --servers standin    # without real vLLM
    python benchmarks/served_teacher.py --quick --servers standin   # a smoke run (the tests)
"""

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402  (sets the offline environment before torch loads)
    REPO,
    Setup,
    StepRecorder,
    add_settings_arguments,
    build_trainer,
    cpu_environment,
    log,
    report_parser,
    run_steps,
    settings_from_args,
    start_cpu_run,
    summary,
    time_teacher_forward,
    write_report,
)

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402


NAME = "served_teacher"
HIDDEN_TARGET = 0.70  # of the teacher's time, at `MANY_SLICES` slices or more
STEP_TARGET = 1.10  # served step / GRPO step, where the teacher's time is below the later slices' training time
MANY_SLICES = 4


@dataclass(frozen=True)
class Settings:
    batch: int = 32  # the generation batch: rollouts per optimizer step
    num_generations: int = 4
    prompt_length: int = 32
    completion_length: int = 128
    vocab: int = 4096
    student_hidden: int = 128
    student_layers: int = 2
    teacher_hidden: int = 384
    teacher_layers: int = 4
    heads: int = 4
    top_k: int = 8
    slices: str = "1,2,4,8"  # steps_per_generation values, comma-separated
    beta: float = 0.0  # GRPO's default: no reference model
    steps: int = 6  # measured steps per trainer and configuration, after one warm-up step
    threads: int = 1
    seed: int = 0


QUICK = replace(Settings(), batch=8, num_generations=2, completion_length=16, vocab=256, student_hidden=32,
                teacher_hidden=48, slices="1,2", steps=2)


SERVERS = ("vllm", "standin")


def slice_counts(settings: Settings) -> list[int]:
    return [int(part) for part in settings.slices.split(",") if part.strip()]


class TeacherTimes(TrainerCallback):
    """Each optimizer step's `teacher/wait_time` and `teacher/request_time`, read off the trainer's metrics."""

    def __init__(self, trainer):
        self.trainer, self.wait, self.request = trainer, [], []

    def on_step_end(self, args, state, control, **kwargs):
        metrics = self.trainer._metrics["train"]
        self.wait.append(metrics["teacher/wait_time"][-1])
        self.request.append(metrics["teacher/request_time"][-1])


def start_standin(model_dir: Path):
    """The stand-in in its own process; `(stop, url)`."""
    process = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "vllm_standin.py"), "--model", str(model_dir), "--port", "0",
         "--threads", "1"], stdout=subprocess.PIPE, text=True,
    )
    line = process.stdout.readline().strip()
    if not line.startswith("ready "):
        process.kill()
        raise RuntimeError(f"the stand-in server did not start: {line!r}")

    def stop():
        process.kill()
        process.wait()

    return stop, line.split(" ", 1)[1]


def start_vllm(model_dir: Path):
    """`vllm serve` (tests/real_vllm.py: its environment, one torch thread, `--enforce-eager`); `(stop, url)`."""
    sys.path.insert(0, str(REPO / "tests"))
    import real_vllm

    server = real_vllm.VLLMServer(model_dir).start().wait()
    log(f"vllm serve answered after {server.started_in:.0f} s")
    return server.stop, server.url


def measure(settings: Settings, work_dir: Path, servers: list[str]) -> tuple[dict, dict]:
    setup = Setup(settings)
    teacher = setup.teacher()
    model_dir = work_dir / "teacher"
    teacher.save_pretrained(model_dir)
    setup.tokenizer.save_pretrained(model_dir)
    student_dir = work_dir / "student"  # by path: GRPO builds its reference model (beta > 0) from the student's path
    setup.student().save_pretrained(student_dir)
    setup.tokenizer.save_pretrained(student_dir)
    stops, urls, started = [], {}, {}
    results = {}
    try:
        for name in servers:
            begin = time.perf_counter()
            stop, urls[name] = {"vllm": start_vllm, "standin": start_standin}[name](model_dir)
            stops.append(stop)
            started[name] = time.perf_counter() - begin
        for slices in slice_counts(settings):
            results[str(slices)] = measure_slices(settings, setup, teacher, work_dir, student_dir, model_dir, urls,
                                                  slices)
    finally:
        for stop in stops:
            stop()
    return results, started


def measure_slices(settings, setup, teacher, work_dir, student_dir, model_dir, urls, slices: int) -> dict:
    """One configuration: the generation batch trained in `slices` slices, every trainer alternated step by step."""
    if settings.batch % slices:
        raise ValueError(f"--batch {settings.batch} is not a multiple of {slices} slices")
    shape = {"per_device_train_batch_size": settings.batch // slices, "gradient_accumulation_steps": slices,
             "steps_per_generation": slices, "beta": settings.beta}
    out = work_dir / f"slices{slices}"
    trainers = {"grpo": build_trainer("grpo", setup, str(out / "grpo"), student=str(student_dir), **shape),
                "in_process": build_trainer("tgpo", setup, str(out / "local"), student=str(student_dir),
                                            teacher=teacher, **shape)}
    for name, url in urls.items():
        for collection in ("before", "after"):
            trainer = build_trainer("tgpo", setup, str(out / f"{name}_{collection}"), student=str(student_dir),
                                    teacher_server_url=url, teacher_model_name_or_path=str(model_dir), **shape)
            trainer._collect_by_slice = collection == "after"
            trainers[f"{name}_{collection}"] = trainer
    recorders = {name: StepRecorder() for name in trainers}
    teacher_times = {name: TeacherTimes(trainer) for name, trainer in trainers.items() if name not in ("grpo",
                                                                                                      "in_process")}
    for name, trainer in trainers.items():
        trainer.add_callback(recorders[name])
        if name in teacher_times:
            trainer.add_callback(teacher_times[name])
        run_steps(trainer, recorders[name], 1)  # warm-up
    for times in teacher_times.values():
        times.wait.clear()
        times.request.clear()
    steps = {name: [] for name in trainers}
    for _ in range(settings.steps):  # alternated, one step at a time
        for name, trainer in trainers.items():
            steps[name] += run_steps(trainer, recorders[name], 1)
    forward = time_teacher_forward(trainers["in_process"], setup, settings.steps)
    row = {"slices": slices, "step_s": {name: summary(values) for name, values in steps.items()},
           "teacher_forward_s": summary(forward), "served": {}}
    grpo = row["step_s"]["grpo"]["median"]
    for name, times in teacher_times.items():
        request, wait = summary(times.request), summary(times.wait)
        step = row["step_s"][name]["median"]
        row["served"][name] = {
            "over_grpo": step / grpo,
            "over_in_process": step / row["step_s"]["in_process"]["median"],
            "request_s": request,
            "wait_s": wait,
            "hidden_fraction": 1 - (step - grpo) / request["median"],
            # the training time of the slices after the first, from GRPO's step
            "later_slices_s": grpo * (slices - 1) / slices,
        }
        log(f"{slices} slices, {name}: {step:.3f} s/step (GRPO {grpo:.3f}, in process "
            f"{row['step_s']['in_process']['median']:.3f}); request {request['median']:.3f} s, wait "
            f"{wait['median']:.3f} s, hidden {row['served'][name]['hidden_fraction']:.0%}")
    return row


def checks(result: dict) -> list[dict]:
    """The issue's goals, per server, on the `after` trainers: at `MANY_SLICES` slices or more, at least
    `HIDDEN_TARGET` of the teacher's time hidden; and the served step within `STEP_TARGET` x GRPO's wherever the
    teacher's time is below the training time of the slices after the first."""
    found = []
    for slices, row in result["results"].items():
        for server in result["servers"]:
            cell = row["served"][f"{server}_after"]
            if int(slices) >= MANY_SLICES:
                found.append({"name": f"hidden, {slices} slices, {SERVER_NAMES[server]}",
                              "measured": cell["hidden_fraction"], "target": f">= {HIDDEN_TARGET:.2f}",
                              "passed": cell["hidden_fraction"] >= HIDDEN_TARGET})
            if cell["request_s"]["median"] < cell["later_slices_s"]:
                found.append({"name": f"served / GRPO step, {slices} slices, {SERVER_NAMES[server]}",
                              "measured": cell["over_grpo"], "target": f"<= {STEP_TARGET:.2f}",
                              "passed": cell["over_grpo"] <= STEP_TARGET})
    return found


SERVER_NAMES = {"vllm": "real vLLM", "standin": "stand-in"}


def markdown(result: dict) -> str:
    s, env = result["settings"], result["environment"]
    servers = result["servers"]
    versions = result.get("vllm_version")
    described = {
        "vllm": f"real vLLM (`vllm serve`, its CPU build{f' {versions}' if versions else ''}, float32, "
                "`--enforce-eager`, one torch thread)",
        "standin": "the test suite's stand-in (`tests/vllm_standin.py`, vLLM's format from a Hugging Face forward, one "
                   "torch thread)",
    }
    lines = [
        "# A served teacher off the step's critical path (CPU)",
        "",
        "Generated by `python benchmarks/served_teacher.py` (raw numbers in `served_teacher.json`). The served teacher "
        "runs in its own process, serving the in-process teacher's weights: "
        + "; and ".join(described[name] for name in servers) + ". All trainers take the same fixed rollouts and are "
        "alternated step by step in one run.",
        "",
        f"Measured {env['date']} on {env['platform']}, {env['cpu_count']} cores, trainer torch threads "
        f"{env['torch_threads']}, load average at start {env['load_average']}. Student hidden {s['student_hidden']} x "
        f"{s['student_layers']} layers, teacher hidden {s['teacher_hidden']} x {s['teacher_layers']} layers, vocabulary "
        f"{s['vocab']}; a generation batch of {s['batch']} rollouts x ({s['prompt_length']} + {s['completion_length']}) "
        f"tokens per optimizer step, trained in 1 to {max(int(k) for k in result['results'])} slices "
        f"(`steps_per_generation` = `gradient_accumulation_steps`); guidance `tgpo`, beta {s['beta']:g}; "
        f"{s['steps']} measured steps per trainer and configuration (medians). Servers up after: "
        + ", ".join(f"{SERVER_NAMES[name]} {result['server_start_s'][name]:.0f} s" for name in servers) + ".",
        "",
        "`before`: the whole batch's scores waited for when the batch is generated (the collection before per-slice "
        "scores); `after`: each slice waits only for its own. `request`: seconds from sending the batch's first "
        "requests until the last answer (`teacher/request_time`); `waited`: seconds the trainer was blocked on them "
        "(`teacher/wait_time`); `hidden` = 1 - (served step - GRPO step) / request, the issue's measure; `not waited` = "
        "1 - waited / request, the share of the request the trainer did not spend blocked. The two differ by the "
        "client's own work in the trainer's process (HTTP, JSON decoding, the parsing of `prompt_logprobs`), which "
        "shares the trainer's core and interpreter lock whether or not it is waited for.",
        "",
        "| slices | trainer | step (s) | / GRPO | / in process | request (s) | waited (s) | hidden | not waited |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for slices, row in result["results"].items():
        steps = row["step_s"]
        lines.append(f"| {slices} | GRPO, no teacher | {steps['grpo']['median']:.3f} | 1.00 | | | | | |")
        lines.append(f"| {slices} | TGPO, teacher in process (forward {row['teacher_forward_s']['median']:.3f} s) | "
                     f"{steps['in_process']['median']:.3f} | "
                     f"{steps['in_process']['median'] / steps['grpo']['median']:.2f} | 1.00 | | | | |")
        for server in servers:
            for collection in ("before", "after"):
                cell = row["served"][f"{server}_{collection}"]
                lines.append(
                    f"| {slices} | TGPO, {SERVER_NAMES[server]}, {collection} | "
                    f"{steps[f'{server}_{collection}']['median']:.3f} | {cell['over_grpo']:.2f} | "
                    f"{cell['over_in_process']:.2f} | {cell['request_s']['median']:.3f} | "
                    f"{cell['wait_s']['median']:.3f} | {cell['hidden_fraction']:.0%} | "
                    f"{1 - cell['wait_s']['median'] / cell['request_s']['median']:.0%} |"
                )
    found = result.get("checks", [])
    if found:
        lines += ["", "| check (the `after` trainers) | measured | target | result |", "|---|---|---|---|"]
        lines += [f"| {check['name']} | {check['measured']:.2f} | {check['target']} | "
                  f"{'pass' if check['passed'] else 'FAIL'} |" for check in found]
    lines += [
        "",
        "The step-time check applies where the teacher's time per batch (`request`) is below the training time of "
        "the slices after the first (GRPO's step x (slices - 1) / slices): only there can the later slices' requests "
        "hide completely.",
        "",
        "What this does and does not say: on 2 CPU cores the servers and the trainer share the machine, so a served "
        "teacher here only moves the teacher's forward to the other core, and HTTP, JSON and the per-token parsing of "
        "`prompt_logprobs` are overhead on top of it. On a GPU cluster the served teacher runs on its own GPUs (vLLM): "
        "docs/distributed.md works the same arithmetic through at the paper's shapes.",
        "",
    ]
    return "\n".join(lines)


def main():
    parser = report_parser(__doc__, NAME, "a tiny smoke run (the tests)")
    parser.add_argument("--servers", default=",".join(SERVERS),
                        help="which servers serve the teacher, comma-separated: vllm (real vLLM's CPU build), standin "
                             f"(default {','.join(SERVERS)})")
    add_settings_arguments(parser, Settings(), QUICK)
    args = parser.parse_args()
    out_dir = Path(args.out_dir)
    if args.render:
        result = json.loads(Path(args.render).read_text())
        log(write_report(out_dir, NAME, result, markdown(result)))
        return
    servers = [name.strip() for name in args.servers.split(",") if name.strip()]
    if not servers or set(servers) - set(SERVERS):
        parser.error(f"--servers takes {', '.join(SERVERS)}, comma-separated; got {args.servers!r}")
    settings = settings_from_args(parser, args, QUICK if args.quick else Settings())
    try:
        counts = slice_counts(settings)
    except ValueError:
        parser.error(f"--slices takes whole numbers, comma-separated; got {settings.slices!r}")
    if not counts or any(count < 1 or settings.batch % count for count in counts):
        parser.error(f"--slices must divide --batch {settings.batch}; got {settings.slices!r}")
    env = start_cpu_run(settings, cpu_environment)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        results, started = measure(settings, Path(work_dir), servers)
    result = {"quick": args.quick, "settings": asdict(settings), "environment": env, "servers": servers,
              "server_start_s": started, "results": results, "wall_time_s": time.perf_counter() - start}
    result["checks"] = checks(result)
    if "vllm" in servers:
        result["vllm_version"] = _vllm_version()
    log(write_report(out_dir, NAME, result, markdown(result)))


def _vllm_version() -> str:
    import real_vllm

    return subprocess.run([real_vllm.python(), "-c", "import importlib.metadata as m; print(m.version('vllm'))"],
                          capture_output=True, text=True, check=True).stdout.strip()


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
