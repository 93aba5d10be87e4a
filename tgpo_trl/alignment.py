"""
How a teacher's positions and ids map to the student's: a shared vocabulary, or another tokenizer.

With a shared vocabulary the teacher scores the student's own ids and nothing moves. With another tokenizer the teacher
reads the conversation rendered with its own chat template and the student's completion as the assistant's text, in
its own tokens, and the two tokenizations are aligned on the completion's UTF-8 bytes (docs/method.md, "Teachers with
another tokenizer"):

- student token spans come from the sampled ids (each id's bytes), never from re-encoding the decoded text; teacher
  spans from the teacher's encoding of that text;
- a student position gets a teacher target only at a *sync point*: the byte where its token starts also starts a
  teacher token, so both models condition on exactly the same text there;
- a teacher id maps to the student id with the same bytes, else to the longest student token its bytes start with;
  end-of-turn tokens map by role (the teacher's end of turn is the student's EOS); top-k entries that land on the same
  student id add up;
- `log p_T(y_t)`: for a group of student and teacher tokens covering the same bytes, the teacher's log-probability of
  the group is the sum over its teacher tokens (chain rule), spread evenly over the group's student tokens.
"""

import functools
import json
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .lm_head import TeacherScores


# Where a student position gets a teacher target: only at sync points (the rule), or also inside a teacher token
TARGET_RULES = ("sync", "continuation")
# The finite stand-in for "no probability" in merged top-k slots: exp() of it is exactly 0 in fp32, and unlike -inf
# it never turns `0 * log 0` into NaN
NO_MASS = -1e4


@functools.lru_cache(maxsize=1)
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's `bytes_to_unicode`: the character a byte-level BPE writes for each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[chr(byte)] = byte
        else:
            mapping[chr(256 + extra)] = byte
            extra += 1
    return mapping


def _decoder_types(decoder: dict | None) -> list[str]:
    if decoder is None:
        return []
    if decoder["type"] == "Sequence":
        return [kind for inner in decoder["decoders"] for kind in _decoder_types(inner)]
    return [decoder["type"]]


def _name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def special_symbol(content: str) -> bytes:
    """A special token (chat marker, padding, ...) in the aligned byte streams: its text between two 0xFF bytes, which
    no UTF-8 text contains. The same special token on both sides aligns; a special token and text never do."""
    return b"\xff" + content.encode("utf-8") + b"\xff"


@dataclass
class TokenBytes:
    """
    The bytes each id of a tokenizer stands for in the aligned streams: its UTF-8 text, or for a special token its
    `special_symbol`. `texts[i]` is what id `i` writes into the text a tokenizer reads (a special token's content).
    `lengths` are the pieces' lengths as an int64 array.
    """

    pieces: list[bytes | None]
    texts: list[str | None]
    lengths: np.ndarray
    special: np.ndarray
    scheme: str

    @classmethod
    def of(cls, tokenizer: PreTrainedTokenizerBase, role: str, rows: int = 0) -> "TokenBytes":
        """Read the bytes off a fast tokenizer's vocabulary; a tokenizer whose tokens do not map to bytes fails here,
        naming the tokenizer (`role`: "student" or "teacher") and why. `rows`: the model's output rows, when it has
        more than its tokenizer has ids; a padding row stands for no bytes (a sampler can emit it; it writes nothing)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise ValueError(
                f"The {role}'s tokenizer ({_name(tokenizer)}, {type(tokenizer).__name__}) is not a fast tokenizer: "
                "cross-tokenizer scoring reads each token's bytes off a `tokenizers` backend. Load it with "
                "`AutoTokenizer.from_pretrained(..., use_fast=True)`."
            )
        decoder = backend.decoder  # read alone: serialising the whole tokenizer costs ~0.5 s at 200k ids
        kinds = _decoder_types(json.loads(decoder.__getstate__()) if decoder is not None else None)
        if "ByteLevel" in kinds:
            scheme = "byte_level"
        elif "ByteFallback" in kinds or "Metaspace" in kinds or "Replace" in kinds:
            scheme = "sentencepiece"
        elif set(kinds) <= {"Fuse", "Strip"}:
            scheme = "plain"
        else:
            raise ValueError(
                f"The {role}'s tokenizer ({_name(tokenizer)}) has a decoder ({', '.join(kinds)}) whose tokens do not map "
                "to bytes on their own (supported: byte-level BPE, SentencePiece with `▁` and byte fallback, character "
                "or word vocabularies that are concatenated)."
            )
        vocab = backend.get_vocab(with_added_tokens=True)
        size = max(max(vocab.values()) + 1, rows)
        special_ids = set(tokenizer.all_special_ids)
        for index, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if added.special:
                special_ids.add(index)
        pieces: list[bytes | None] = [None] * size
        texts: list[str | None] = [None] * size
        byte_map = _byte_level_decoder()
        for token, index in vocab.items():
            if index in special_ids:
                pieces[index], texts[index] = special_symbol(token), token
                continue
            if scheme == "byte_level":
                try:
                    pieces[index] = bytes(byte_map[ch] for ch in token)
                except KeyError:  # an added token written as plain text
                    pieces[index] = token.encode("utf-8")
            elif scheme == "sentencepiece":
                if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                    pieces[index] = bytes([int(token[3:5], 16)])
                else:
                    pieces[index] = token.replace("▁", " ").encode("utf-8")
            else:
                pieces[index] = token.encode("utf-8")
        lengths = np.array([0 if piece is None else len(piece) for piece in pieces], dtype=np.int64)
        special = np.zeros(size, dtype=bool)
        special[[index for index in special_ids if index < size]] = True
        return cls(pieces, texts, lengths, special, scheme)

    def join(self, ids) -> bytes:
        """The aligned byte stream of `ids`."""
        return b"".join(self.pieces[i] or b"" for i in ids)

    def text(self, ids) -> str:
        """The text `ids` write, special tokens as their content, as a tokenizer reads it back (bytes that are not
        valid UTF-8 become U+FFFD, and the alignment stops there)."""
        parts, pending = [], b""
        for i in ids:
            if self.texts[i] is not None:
                parts.append(pending.decode("utf-8", errors="replace") + self.texts[i])
                pending = b""
            else:
                pending += self.pieces[i] or b""
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, int | None]:
    """`(chat_end, eos)`: the special token the chat template writes after an assistant message (`<|im_end|>`,
    `<|eot_id|>`, ...; None without a template or such a token) and EOS (None if the tokenizer has none)."""
    chat_end = None
    if getattr(tokenizer, "chat_template", None):
        marker = "\x00tgpo-end\x00"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "x"}, {"role": "assistant", "content": marker}], tokenize=False
            )
        except Exception:  # a template that refuses this conversation: EOS alone
            text = ""
        if marker in text:
            after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
            if after and after[0] in set(tokenizer.all_special_ids):
                chat_end = after[0]
    return chat_end, tokenizer.eos_token_id


class VocabularyMap:
    """
    Teacher ids to student ids, built once per pair. A teacher id maps to the student id with the same bytes, else to
    the longest student token its bytes start with; the teacher's end-of-turn ids map to the student's EOS; other
    special tokens map to -1 (no target).
    """

    def __init__(self, teacher: TokenBytes, student: TokenBytes, teacher_end_ids: list[int], student_eos_id: int | None,
                 student_rows: int):
        # pieces include the special tokens' symbols, so a special token maps to the student's one of the same content
        by_bytes: dict[bytes, int] = {}
        for index, piece in enumerate(student.pieces[:student_rows]):  # ids the student can emit
            if piece is not None and piece not in by_bytes:
                by_bytes[piece] = index
        self.by_bytes, self.longest = by_bytes, max((len(piece) for piece in by_bytes), default=0)
        self.student_special = student.special
        table = np.full(len(teacher.pieces), -1, dtype=np.int64)
        exact = 0
        for index, piece in enumerate(teacher.pieces):
            if piece is None:
                continue
            match = by_bytes.get(piece)
            if match is not None:
                exact += 1
            elif not teacher.special[index]:
                match = self.longest_prefix(piece[:-1])
            if match is not None:
                table[index] = match
        if student_eos_id is not None:
            for index in teacher_end_ids:
                if index < len(table):
                    table[index] = student_eos_id
        self.teacher_to_student = torch.from_numpy(table)
        self.exact_ratio = exact / max(1, sum(piece is not None for piece in teacher.pieces))

    def __call__(self, teacher_ids: torch.Tensor) -> torch.Tensor:
        """Student ids of `teacher_ids`; -1 for an id with none, or outside the teacher's ids (a served teacher's
        empty top-k slot is -1)."""
        table = self.teacher_to_student.to(teacher_ids.device)
        inside = (teacher_ids >= 0) & (teacher_ids < len(table))
        return torch.where(inside, table[teacher_ids.clamp(min=0, max=len(table) - 1)], -1)

    def longest_prefix(self, data: bytes) -> int | None:
        """The id of the longest student text token that `data` starts with, or None."""
        for size in range(min(len(data), self.longest), 0, -1):
            match = self.by_bytes.get(data[:size])
            if match is not None and not self.student_special[match]:
                return match
        return None


@dataclass
class TeacherBatch:
    """The teacher's view of a batch of rollouts, in its own ids (left-padded prompts, right-padded completions), and
    how each student completion position maps onto it."""

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    sync_index: torch.Tensor  # (B, T_s): the teacher completion position predicting the same bytes, -1 if none
    group_index: torch.Tensor  # (B, T_s): the student token's group, -1 outside every closed group
    group_size: torch.Tensor  # (B, T_s): the number of student tokens in that group
    teacher_group: torch.Tensor  # (B, T_t): each teacher completion token's group, -1 outside every closed group
    # With continuation targets: the teacher completion token a student token starts inside (-1 if none), the byte
    # offset of the student token in it, and each row's text bytes and student token start bytes
    cover_index: torch.Tensor | None = None
    cover_offset: torch.Tensor | None = None
    texts: list[bytes] | None = None
    starts: list | None = None


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt) -> str:
    """The prompt as the teacher reads it: a conversation re-rendered with the teacher's chat template (ready for the
    assistant's turn), a plain-text prompt as it is."""
    if isinstance(prompt, str):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"The teacher's tokenizer ({_name(tokenizer)}) has no chat template, so a conversational prompt cannot be "
            "rendered the teacher's way: give it one (`tokenizer.chat_template = ...`) or use plain-text prompts."
        )
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)


def _common_prefix(a: bytes, b: bytes) -> int:
    size = min(len(a), len(b))
    if a[:size] == b[:size]:
        return size
    low, high = 0, size  # the first differing byte, by bisection
    while low < high:
        middle = (low + high) // 2
        if a[: middle + 1] == b[: middle + 1]:
            low = middle + 1
        else:
            high = middle
    return low


class CrossTokenizerAlignment:
    """Everything cross-tokenizer scoring needs from a pair of tokenizers, built once: each side's token bytes, the
    vocabulary map and the end-of-turn ids."""

    def __init__(self, student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase,
                 student_rows: int, targets: str = "sync"):
        if targets not in TARGET_RULES:
            raise ValueError(f"`cross_tokenizer_targets` must be one of {list(TARGET_RULES)}, got {targets!r}.")
        self.continuation = targets == "continuation"
        self.teacher_tokenizer = teacher_tokenizer
        self.student = TokenBytes.of(student_tokenizer, "student", student_rows)
        self.teacher = TokenBytes.of(teacher_tokenizer, "teacher")
        self.student_eos = student_tokenizer.eos_token_id
        chat_end, eos = end_of_turn_ids(teacher_tokenizer)
        # the teacher's end of the student's turn: its chat end-of-turn after a conversation, its EOS after plain text
        self.teacher_end = {True: chat_end if chat_end is not None else eos, False: eos if eos is not None else chat_end}
        ends = [index for index in (chat_end, eos) if index is not None]
        self.vocabulary = VocabularyMap(self.teacher, self.student, ends, self.student_eos, student_rows)
        pad = teacher_tokenizer.pad_token_id
        self.teacher_pad = pad if pad is not None else (ends[0] if ends else 0)

    # ------------------------------------------------------------------ the teacher's inputs and the alignment

    def teacher_batch(self, prompts: list, completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> TeacherBatch:
        student_rows = [ids[: int(n)] for ids, n in zip(completion_ids.tolist(), completion_mask.sum(1).tolist(),
                                                         strict=True)]
        texts, cut = [], []
        for ids in student_rows:
            # the completion's text, up to the EOS that ends the student's turn (the teacher writes its own end there)
            stop = len(ids) - 1 if ids and ids[-1] == self.student_eos else len(ids)
            cut.append(stop)
            texts.append(self.student.text(ids[:stop]))
        rendered = [render_prompt(self.teacher_tokenizer, prompt) for prompt in prompts]
        plain = [isinstance(prompt, str) for prompt in prompts]
        encode = self.teacher_tokenizer
        prompt_ids = [encode(text, add_special_tokens=is_plain)["input_ids"]
                      for text, is_plain in zip(rendered, plain, strict=True)]
        teacher_rows = encode(texts, add_special_tokens=False)["input_ids"] if texts else []

        rows = [
            self._align_row(ids, stop, list(t_ids), self.teacher_end[not is_plain])
            for ids, stop, t_ids, is_plain in zip(student_rows, cut, teacher_rows, plain, strict=True)
        ]
        num_student = completion_ids.size(1)
        num_teacher = max([len(row["teacher_ids"]) for row in rows] + [1])
        batch = len(rows)
        device = completion_ids.device

        def full(shape, value):
            return torch.full(shape, value, dtype=torch.long)

        t_completion, t_mask = full((batch, num_teacher), self.teacher_pad), full((batch, num_teacher), 0)
        sync, group, size = full((batch, num_student), -1), full((batch, num_student), -1), full((batch, num_student), 1)
        t_group = full((batch, num_teacher), -1)
        for b, row in enumerate(rows):
            n_t, n_s = len(row["teacher_ids"]), len(row["sync"])
            t_completion[b, :n_t] = torch.tensor(row["teacher_ids"], dtype=torch.long)
            t_mask[b, :n_t] = 1
            sync[b, :n_s] = torch.from_numpy(row["sync"])
            group[b, :n_s] = torch.from_numpy(row["group"])
            size[b, :n_s] = torch.from_numpy(row["size"])
            t_group[b, :n_t] = torch.from_numpy(row["teacher_group"])
        num_prompt = max(len(ids) for ids in prompt_ids)
        t_prompt, p_mask = full((batch, num_prompt), self.teacher_pad), full((batch, num_prompt), 0)
        for b, ids in enumerate(prompt_ids):  # left padding, as GRPO pads prompts
            if ids:
                t_prompt[b, num_prompt - len(ids):] = torch.tensor(ids, dtype=torch.long)
                p_mask[b, num_prompt - len(ids):] = 1
        batch_view = TeacherBatch(*(x.to(device) for x in (t_prompt, p_mask, t_completion, t_mask, sync, group, size,
                                                           t_group)))
        if self.continuation:
            cover, offset = full((batch, num_student), -1), full((batch, num_student), 0)
            for b, row in enumerate(rows):
                n_s = len(row["cover"])
                cover[b, :n_s] = torch.from_numpy(row["cover"])
                offset[b, :n_s] = torch.from_numpy(row["offset"])
            batch_view.cover_index, batch_view.cover_offset = cover.to(device), offset.to(device)
            batch_view.texts = [row["text"] for row in rows]
            batch_view.starts = [row["starts"].tolist() for row in rows]
        return batch_view

    def _align_row(self, student_ids: list[int], stop: int, teacher_ids: list[int], teacher_end: int | None) -> dict:
        """
        Align one completion. The byte streams are the text's bytes, plus one sentinel byte for the end of turn when
        the student wrote EOS right after the text (the teacher gets its own end-of-turn token there). Returns the
        teacher's completion ids and, per student position, its sync point and group; per teacher position its group.
        """
        s_lengths = self.student.lengths[student_ids[:stop]] if stop else np.zeros(0, dtype=np.int64)
        s_bytes = self.student.join(student_ids[:stop])
        t_bytes = self.teacher.join(teacher_ids)
        t_lengths = self.teacher.lengths[teacher_ids] if teacher_ids else np.zeros(0, dtype=np.int64)
        if not s_bytes.startswith(b" ") and t_bytes.startswith(b" ") and t_bytes[1:] == s_bytes[: len(t_bytes) - 1]:
            # SentencePiece's dummy prefix: a space the text does not have, written by the teacher's first token
            t_lengths = t_lengths.copy()
            t_lengths[0] -= 1
            t_bytes = t_bytes[1:]
        # Bytes where both streams agree; text the teacher's normalizer rewrote (or replaced invalid UTF-8) is not
        # aligned beyond the first difference
        agreed = _common_prefix(s_bytes, t_bytes)
        ends_turn = stop < len(student_ids) and student_ids[stop] == self.student_eos and agreed == len(s_bytes)
        ends_turn = ends_turn and agreed == len(t_bytes) and teacher_end is not None
        if ends_turn:
            teacher_ids = [*teacher_ids, teacher_end]
            s_lengths = np.append(s_lengths, 1)
            t_lengths = np.append(t_lengths, 1)
            agreed += 1
        s_start = np.concatenate([[0], np.cumsum(s_lengths)[:-1]]) if len(s_lengths) else np.zeros(0, np.int64)
        t_start = np.concatenate([[0], np.cumsum(t_lengths)[:-1]]) if len(t_lengths) else np.zeros(0, np.int64)
        s_end, t_end = s_start + s_lengths, t_start + t_lengths
        num_student = len(student_ids)
        sync = np.full(num_student, -1, dtype=np.int64)
        # sync points: a student token that starts where a teacher token of positive length starts (a zero-length
        # teacher token, SentencePiece's lone dummy prefix, is skipped for the one after it)
        positive = np.flatnonzero(t_lengths > 0)
        where = np.searchsorted(t_start[positive], s_start)
        hit = where < len(positive)
        hit[hit] = t_start[positive[where[hit]]] == s_start[hit]
        hit &= (s_lengths > 0) & (s_start < agreed)
        sync[: len(s_lengths)][hit] = positive[where[hit]]
        extra = {}
        if self.continuation:
            # a student token that starts inside a teacher token of positive length (not at its first byte)
            cover, offset = np.full(num_student, -1, dtype=np.int64), np.zeros(num_student, dtype=np.int64)
            inner = np.searchsorted(t_start[positive], s_start, side="right") - 1
            text_tokens = ~self.student.special[np.asarray(student_ids[: len(s_lengths)], dtype=np.int64)]
            inside = (inner >= 0) & ~hit & (s_lengths > 0) & (s_start < agreed) & text_tokens
            inside[inside] &= s_start[inside] < t_end[positive[inner[inside]]]
            cover[: len(s_lengths)][inside] = positive[inner[inside]]
            offset[: len(s_lengths)][inside] = s_start[inside] - t_start[positive[inner[inside]]]
            extra = {"cover": cover, "offset": offset, "text": s_bytes, "starts": s_start}
        # groups: spans between consecutive byte positions where both streams have a token boundary, closed within
        # the agreed bytes
        boundaries = np.intersect1d(np.concatenate([s_start, s_end]), np.concatenate([t_start, t_end]))
        boundaries = boundaries[boundaries <= agreed]
        group = np.full(num_student, -1, dtype=np.int64)
        size = np.ones(num_student, dtype=np.int64)
        t_group = np.full(len(teacher_ids), -1, dtype=np.int64)
        if len(boundaries) >= 2:
            s_group = np.searchsorted(boundaries, s_start, side="right") - 1
            # a token of no bytes (a padding row the sampler emitted) has no share in any group's log-probability
            closed = (s_end <= boundaries[-1]) & (s_group >= 0) & (s_lengths > 0)
            counts = np.bincount(s_group[closed], minlength=len(boundaries))
            group[: len(s_lengths)][closed] = s_group[closed]
            size[: len(s_lengths)][closed] = counts[s_group[closed]]
            teacher_group = np.searchsorted(boundaries, t_start, side="right") - 1
            t_closed = (t_end <= boundaries[-1]) & (teacher_group >= 0)
            t_group[t_closed] = teacher_group[t_closed]
        return {"teacher_ids": teacher_ids, "sync": sync, "group": group, "size": size, "teacher_group": t_group,
                **extra}

    # ------------------------------------------------------------------ the teacher's scores in student positions

    def to_student(self, scores: TeacherScores, batch: TeacherBatch) -> TeacherScores:
        """Map `(B, T_t)` teacher scores of the teacher's own completion tokens to the student's `(B, T_s)` positions."""
        at_sync, aligned = batch.sync_index.clamp(min=0), batch.sync_index >= 0
        inside = batch.cover_index >= 0 if batch.cover_index is not None else torch.zeros_like(aligned)
        at_cover = batch.cover_index.clamp(min=0) if batch.cover_index is not None else at_sync

        def targets(teacher_ids):
            """Student target ids `(B, T_s[, K])` and where they exist: the mapped teacher token at a sync point; with
            continuation targets, inside a teacher token, the rest of its bytes when they continue the text."""
            at_sync_ids = _gather(teacher_ids, at_sync)
            ids = self.vocabulary(at_sync_ids)
            # the teacher's distribution there is finite (its argmax is an id), whatever it gives its own next token
            finite = _gather(scores.argmax >= 0, at_sync) & aligned
            ok = (ids >= 0) & (finite if ids.dim() == 2 else finite.unsqueeze(-1))
            if inside.any():
                continued = self._continuations(_gather(teacher_ids, at_cover), batch, inside)
                finite_inside = _gather(scores.argmax >= 0, at_cover) & inside
                ok_inside = (continued >= 0) & (finite_inside if ids.dim() == 2 else finite_inside.unsqueeze(-1))
                ids = torch.where(ok_inside, continued, ids)
                ok = ok | ok_inside
            return torch.where(ok, ids, 0), ok

        argmax, target = targets(scores.argmax)
        # log p_T of each closed group: the sum over its teacher tokens, spread over its student tokens
        t_group = batch.teacher_group
        num_groups = int(max(t_group.max().item(), batch.group_index.max().item())) + 1 if t_group.numel() else 0
        num_groups = max(num_groups, 1)
        members = (t_group >= 0) & batch.completion_mask.bool()
        slot = t_group.clamp(min=0)
        group_logps = scores.logps.new_zeros(t_group.size(0), num_groups)
        group_logps.scatter_add_(1, slot, torch.where(members, scores.logps, 0.0))
        bad_counts = torch.zeros_like(group_logps).scatter_add_(1, slot, (members & ~scores.valid).float())
        s_group = batch.group_index
        in_group = s_group >= 0
        logps = group_logps.gather(1, s_group.clamp(min=0)) / batch.group_size
        valid = in_group & (bad_counts.gather(1, s_group.clamp(min=0)) == 0)
        result = {"logps": torch.where(valid, logps, 0.0), "argmax": argmax, "valid": valid, "aligned": target}
        if scores.sample is not None:
            result["sample"], result["aligned"] = targets(scores.sample)
        if scores.topk_ids is not None:
            ids, ok = targets(scores.topk_ids)
            where = torch.where(aligned.unsqueeze(-1), at_sync.unsqueeze(-1), at_cover.unsqueeze(-1))
            topk_logps = scores.topk_logps.gather(1, where.expand(-1, -1, scores.topk_logps.size(-1)))
            ids, logps_k, slot_valid = merge_topk(torch.where(ok, ids, -1), topk_logps)
            result["topk_ids"], result["topk_logps"] = ids, logps_k
            result["topk_valid"] = slot_valid & target.unsqueeze(-1)
        return TeacherScores(**result)

    def _continuations(self, teacher_ids: torch.Tensor, batch: TeacherBatch, inside: torch.Tensor) -> torch.Tensor:
        """At the student positions `inside` a teacher token: the longest student token that the rest of
        `teacher_ids`' bytes (`(B, T_s)` or `(B, T_s, K)`, the teacher's tokens predicted where that teacher token
        starts) start with, when their first bytes are the text's up to this position; -1 otherwise."""
        out = torch.full_like(teacher_ids, -1)
        values, offsets = teacher_ids.tolist(), batch.cover_offset.tolist()
        for b, t in inside.nonzero().tolist():
            offset, text = offsets[b][t], batch.texts[b]
            start = batch.starts[b][t]
            written = text[start - offset: start]  # the text from the teacher token's first byte to this position
            for k, index in enumerate(values[b][t] if teacher_ids.dim() == 3 else [values[b][t]]):
                piece = self.teacher.pieces[index] if 0 <= index < len(self.teacher.pieces) else None
                if piece is None or self.teacher.special[index] or len(piece) <= offset or piece[:offset] != written:
                    continue
                match = self.vocabulary.longest_prefix(piece[offset:])
                if match is not None:
                    if teacher_ids.dim() == 3:
                        out[b, t, k] = match
                    else:
                        out[b, t] = match
        return out


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`values[b, index[b, t]]` (with any trailing dimension kept)."""
    if values.dim() == 3:
        index = index.unsqueeze(-1).expand(-1, -1, values.size(-1))
    return values.gather(1, index)


def merge_topk(ids: torch.Tensor, logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Top-k teacher entries mapped to student ids `(B, T, K)` (-1: no student id): entries that land on the same student
    id add up (log-sum-exp) into the first of them; the other slots and unmapped ones are left empty (`valid` False,
    log-prob `NO_MASS`, id 0).
    """
    k = ids.size(-1)
    same = (ids.unsqueeze(-1) == ids.unsqueeze(-2)) & (ids >= 0).unsqueeze(-1)  # (..., K, K): slot i and j share an id
    earlier = torch.ones(k, k, dtype=torch.bool, device=ids.device).tril(-1)  # j < i
    first = (ids >= 0) & ~(same & earlier).any(-1)
    merged = torch.logsumexp(torch.where(same, logps.unsqueeze(-2), float("-inf")), dim=-1)
    return torch.where(first, ids, 0), torch.where(first, merged, NO_MASS), first


# ------------------------------------------------------------------ the two ways ids can map


class Mapped:
    """A teacher's scores in flight (`pending.result()`, where the teacher runs), mapped to the student's positions and
    ids once collected."""

    def __init__(self, pending, to_student):
        self.pending, self._to_student = pending, to_student

    def result(self) -> TeacherScores:
        return self._to_student(self.pending.result())


class SharedVocabulary:
    """The teacher shares the student's ids: it scores the student's own prompt and completion, and every position
    where its distribution is finite has a target, whatever probability it gives the sampled token (a non-finite
    position, or a served teacher's whose top-k holds no id the student can emit, has none: its ids arrive as -1)."""

    cross_tokenizer = False

    def start(self, submit, prompts, prompt_ids, prompt_mask, completion_ids, completion_mask) -> Mapped:
        """Send the batch to the teacher (`submit`: where it runs) and return its scores in flight."""
        return Mapped(submit(prompt_ids, prompt_mask, completion_ids, completion_mask), self.to_student)

    @staticmethod
    def to_student(scores: TeacherScores) -> TeacherScores:
        scores.aligned = scores.argmax >= 0
        scores.argmax = scores.argmax.clamp(min=0)
        if scores.sample is not None:
            scores.sample = scores.sample.clamp(min=0)
        if scores.topk_ids is not None:
            scores.topk_ids = scores.topk_ids.clamp(min=0)
        return scores


class CrossTokenizer:
    """The teacher has another tokenizer: it reads the rollouts re-rendered and re-encoded its own way, and its scores
    come back in the student's positions and ids (`CrossTokenizerAlignment`)."""

    cross_tokenizer = True

    def __init__(self, student_tokenizer, teacher_tokenizer, student_rows: int, targets: str = "sync"):
        self.alignment = CrossTokenizerAlignment(student_tokenizer, teacher_tokenizer, student_rows, targets)

    def start(self, submit, prompts, prompt_ids, prompt_mask, completion_ids, completion_mask) -> Mapped:
        if prompts is None:
            raise ValueError("Cross-tokenizer scoring needs the prompts themselves, to render them the teacher's way.")
        batch = self.alignment.teacher_batch(prompts, completion_ids, completion_mask)
        pending = submit(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        return Mapped(pending, lambda scores: self.alignment.to_student(scores, batch))
