"""Pilot for the cross_tokenizer regime (docs/benchmarks/methods_cross_tokenizer.md): TGPO with targets inside the
teacher's tokens too, the benchmark's settings and seeds. Not the library's rule (which guides sync points only): at a
student position inside teacher token `j`, whose argmax token's bytes `A` agree with the text from `j`'s first byte up
to this position, the target is the longest student token that `A`'s remaining bytes start with.

    python benchmarks/pilots/cross_tokenizer_continuation.py [SEED ...]
"""

import multiprocessing
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks import methods as M  # noqa: E402
from tgpo_trl import alignment as A  # noqa: E402


class ContinuationAlignment(A.CrossTokenizerAlignment):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.by_bytes = {}
        for index, piece in enumerate(self.student.pieces):
            if piece is not None and not self.student.special[index] and piece not in self.by_bytes:
                self.by_bytes[piece] = index
        self.longest = max(map(len, self.by_bytes))
        self.rows = []

    def teacher_batch(self, prompts, completion_ids, completion_mask):
        self.rows, self.student_ids = [], completion_ids.tolist()
        return super().teacher_batch(prompts, completion_ids, completion_mask)

    def _align_row(self, student_ids, stop, teacher_ids, teacher_end):
        row = super()._align_row(student_ids, stop, teacher_ids, teacher_end)
        s_bytes = self.student.join(student_ids[:stop])
        s_lengths = self.student.lengths[student_ids[:stop]]
        s_start = np.concatenate([[0], np.cumsum(s_lengths)[:-1]]) if len(s_lengths) else np.zeros(0, np.int64)
        t_lengths = self.teacher.lengths[row["teacher_ids"]] if row["teacher_ids"] else np.zeros(0, np.int64)
        t_start = np.concatenate([[0], np.cumsum(t_lengths)[:-1]]) if len(t_lengths) else np.zeros(0, np.int64)
        self.rows.append((s_bytes, s_start, t_start, t_lengths, row["sync"]))
        return row

    def to_student(self, scores, batch):
        result = super().to_student(scores, batch)
        argmax_t = scores.argmax.tolist()
        for b, (s_bytes, s_start, t_start, t_lengths, sync) in enumerate(self.rows):
            for t in range(len(s_start)):
                if sync[t] >= 0 or self.student.special[self.student_ids[b][t]]:
                    continue
                j = int(np.searchsorted(t_start, s_start[t], side="right")) - 1
                if j < 0 or t_lengths[j] == 0 or not bool(scores.valid[b, j]):
                    continue
                offset = int(s_start[t] - t_start[j])
                token = self.teacher.pieces[argmax_t[b][j]]
                if token is None or len(token) <= offset or token[:offset] != s_bytes[t_start[j]: t_start[j] + offset]:
                    continue
                rest = token[offset:]
                for size in range(min(len(rest), self.longest), 0, -1):
                    target = self.by_bytes.get(rest[:size])
                    if target is not None:
                        result.argmax[b, t] = target
                        result.aligned[b, t] = True
                        break
        return result


def run(job):
    A.CrossTokenizerAlignment = ContinuationAlignment  # what CrossTokenizer builds, in this worker
    torch.set_num_threads(1)
    return M.run_one(*job)


if __name__ == "__main__":
    seeds = [int(s) for s in sys.argv[1:]] or [0, 1, 2]
    out = M.common.REPO / "outputs" / "pilot-cross"
    out.mkdir(parents=True, exist_ok=True)
    jobs = [("cross_tokenizer", "tgpo", seed, dict(M.FULL), str(out / f"continuation_tgpo_seed{seed}.json"))
            for seed in seeds]
    with multiprocessing.get_context("spawn").Pool(2, maxtasksperchild=1) as pool:
        for done in pool.imap_unordered(run, jobs):
            print(done, flush=True)
