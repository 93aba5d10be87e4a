"""
A served teacher against the in-process one: TGPO's step time on CPU, and how much of the teacher's time the overlap
hides.

The served teacher runs in its own process, serving the same weights the in-process trainer holds: real vLLM (`vllm
serve`, its CPU build from scripts/vllm_env.sh, `--enforce-eager`, one torch thread) and the test suite's stand-in
(`tests/vllm_standin.py`, vLLM's `/v1/completions` format, one torch thread). All trainers take the same fixed rollouts
(no sampling, as the speed benchmark) and are alternated step by step in one run, so machine load hits them alike.
Each configuration is measured twice: with GRPO's defaults (`beta=0`: between the completions and the loss GRPO runs
only the reward functions, so there is little for the requests to hide behind) and with `beta=0.04` (a reference-model
forward, as many recipes use). The trainer uses `--threads` torch threads.

For a served teacher, per step: `request` = seconds from sending the batch's requests until the last answer was in,
`wait` = how long the trainer waited for them when it collected the scores; `hidden = 1 - wait / request`. For the
in-process teacher, `teacher forward` is its scoring forward over the same batch timed alone.

    python benchmarks/served_teacher.py                      # about 5 minutes on 2 cores (vLLM's start included)
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

import tgpo_trl.served as served  # noqa: E402


NAME = "served_teacher"
BETAS = (0.0, 0.04)


@dataclass(frozen=True)
class Settings:
    batch: int = 16
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
    steps: int = 8  # measured steps per trainer and configuration, after one warm-up step
    threads: int = 1
    seed: int = 0


QUICK = replace(Settings(), batch=4, num_generations=2, completion_length=16, vocab=256, student_hidden=32,
                teacher_hidden=48, steps=2)


SERVERS = ("vllm", "standin")


class _Timings:
    """Each collected batch's `(request, wait)` seconds, read off `PendingScores` after `result()`, under the name of
    the trainer stepping (`current`)."""

    def __init__(self):
        self.rows, self.current = {}, None
        self._result = served.PendingScores.result
        timings = self

        def result(pending):
            scores = timings._result(pending)
            timings.rows.setdefault(timings.current, []).append((pending.request_time, pending.wait_time))
            return scores

        served.PendingScores.result = result


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
    timings = _Timings()
    results = {}
    try:
        for name in servers:
            begin = time.perf_counter()
            stop, urls[name] = {"vllm": start_vllm, "standin": start_standin}[name](model_dir)
            stops.append(stop)
            started[name] = time.perf_counter() - begin
        for beta in BETAS:
            trainers = {"in_process": build_trainer("tgpo", setup, str(work_dir / f"local{beta}"),
                                                    student=str(student_dir), teacher=teacher, beta=beta)}
            for name, url in urls.items():
                trainers[name] = build_trainer("tgpo", setup, str(work_dir / f"{name}{beta}"), student=str(student_dir),
                                               beta=beta, teacher_server_url=url,
                                               teacher_model_name_or_path=str(model_dir))
            recorders = {name: StepRecorder() for name in trainers}
            for name, trainer in trainers.items():
                trainer.add_callback(recorders[name])
            for name, trainer in trainers.items():
                timings.current = name
                run_steps(trainer, recorders[name], 1)  # warm-up
            timings.rows.clear()
            times = {name: [] for name in trainers}
            for _ in range(settings.steps):  # alternated, one step at a time
                for name, trainer in trainers.items():
                    timings.current = name
                    times[name] += run_steps(trainer, recorders[name], 1)
            forward = time_teacher_forward(trainers["in_process"], setup, settings.steps)
            row = {"beta": beta, "step_s": {name: summary(values) for name, values in times.items()},
                   "teacher_forward_s": summary(forward), "served": {}}
            for name in urls:
                request = [timing[0] for timing in timings.rows[name]]
                wait = [timing[1] for timing in timings.rows[name]]
                row["served"][name] = {
                    "over_in_process": summary([a / b for a, b in zip(times[name], times["in_process"],
                                                                      strict=True)])["median"],
                    "request_s": summary(request),
                    "wait_s": summary(wait),
                    "hidden_fraction": summary([1 - w / r if r > 0 else 0.0 for r, w in zip(request, wait,
                                                                                            strict=True)]),
                }
                log(f"beta={beta:g} {name}: {summary(times[name])['median']:.3f} s/step (in process "
                    f"{summary(times['in_process'])['median']:.3f}); request {summary(request)['median']:.3f} s, "
                    f"wait {summary(wait)['median']:.3f} s")
            results[f"beta={beta:g}"] = row
    finally:
        for stop in stops:
            stop()
    return results, started


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
        "# A served teacher against the in-process teacher (CPU)",
        "",
        "Generated by `python benchmarks/served_teacher.py` (raw numbers in `served_teacher.json`). The served teacher "
        "runs in its own process, serving the in-process teacher's weights: "
        + "; and ".join(described[name] for name in servers) + ". All trainers take the same fixed rollouts and are "
        "alternated step by step in one run.",
        "",
        f"Measured {env['date']} on {env['platform']}, {env['cpu_count']} cores, trainer torch threads "
        f"{env['torch_threads']}, load average at start {env['load_average']}. Student hidden {s['student_hidden']} x "
        f"{s['student_layers']} layers, teacher hidden {s['teacher_hidden']} x {s['teacher_layers']} layers, vocabulary "
        f"{s['vocab']}, batch {s['batch']} x ({s['prompt_length']} + {s['completion_length']}) tokens, guidance `tgpo`; "
        f"{s['steps']} measured steps per trainer and configuration (medians). Servers up after: "
        + ", ".join(f"{SERVER_NAMES[name]} {result['server_start_s'][name]:.0f} s" for name in servers) + ".",
        "",
        "| configuration | teacher | step (s) | served / in-process | in-process teacher forward (s) "
        "| served request (s) | trainer waited (s) | hidden by the overlap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in result["results"].items():
        lines.append(f"| {name} | in process | {row['step_s']['in_process']['median']:.3f} | 1.00 | "
                     f"{row['teacher_forward_s']['median']:.3f} | | | |")
        for server in servers:
            cell = row["served"][server]
            lines.append(
                f"| {name} | {SERVER_NAMES[server]} | {row['step_s'][server]['median']:.3f} | "
                f"{cell['over_in_process']:.2f} | | {cell['request_s']['median']:.3f} | "
                f"{cell['wait_s']['median']:.3f} | {cell['hidden_fraction']['median']:.0%} |"
            )
    first = next(iter(result["results"].values()))
    lines += [""] + [
        f"At `{next(iter(result['results']))}`, {SERVER_NAMES[server]} answered a batch in "
        f"{first['served'][server]['request_s']['median']:.3f} s, against {first['teacher_forward_s']['median']:.3f} s "
        "for the in-process teacher's forward over it"
        + (" (real vLLM's CPU kernels run the teacher's matrix products through oneDNN on prepacked weights, faster "
           "than the trainer's PyTorch forward, HTTP and JSON included)." if server == "vllm" else
           " (the stand-in is a plain Hugging Face forward plus the JSON).")
        for server in servers
    ]
    lines += [
        "",
        "`served request` runs from sending the batch's requests (as soon as the completions exist) until the last "
        "answer was in; `trainer waited` is the part of it the trainer spent blocked when it collected the scores; "
        "`hidden` = 1 - waited / request, per step. With `beta=0`, GRPO computes only the rewards between the "
        "completions and the loss, so little of the request can hide; a reference-model forward (`beta=0.04`) gives "
        "it more to hide behind.",
        "",
        "What this does and does not say: on 2 CPU cores the servers and the trainer share the machine, so a served "
        "teacher here only moves the teacher's forward to another core, and HTTP, JSON and the per-token parsing of "
        "`prompt_logprobs` are overhead on top of it; where real vLLM's step is shorter than the in-process one, its "
        "faster CPU kernels pay for that overhead (a property of its CPU build, not of serving). On a GPU cluster the served teacher runs on its own GPUs (vLLM), and the "
        "saving that matters is training memory: the teacher's weights and activations leave every training process "
        "(docs/distributed.md).",
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
    env = start_cpu_run(settings, cpu_environment)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work_dir:
        results, started = measure(settings, Path(work_dir), servers)
    result = {"quick": args.quick, "settings": asdict(settings), "environment": env, "servers": servers,
              "server_start_s": started, "results": results, "wall_time_s": time.perf_counter() - start}
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
