"""Long-context retrieval harness: tasks x lengths x depths x samples, streamed with flat memory at any length.

Every cell generates its samples from the task registry (seeded, no downloads), streams each prompt through
`MemSparseLM.generate` from a fresh `init_state(1, total_length=len(prompt))`, decodes the answer greedily and
scores it. Beside the decoded score, each sample gets one teacher-forced pass over its answer tokens from the same
streamed prompt state (the training path: what `forward(prompt + answer)` predicts at the answer positions), so a
model that did not learn (low teacher-forced accuracy) and an eval path that differs from training (high
teacher-forced, low decoded) can be told apart. Per cell it records accuracy, teacher-forced token accuracy and
exact match, wall time, tokens/s, peak memory and, when the model exposes them, the attention kept fraction and
attention FLOPs per token. Budget policy, consolidation and the attention window can be overridden for
a run (no retraining); budget or consolidation can be swept over a list of settings into one combined table.

Input checks (`parse_*`, `resolve_checkpoint`, `check_plan`) are cheap and run before any model work.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from memsparse.kernels import parse_policy

from memsparse.config import ConsolidationConfig
from memsparse.consolidation import consolidation_passes
from memsparse.tokenizer import load_tokenizer

SWEEP_KINDS = ("budget", "consolidation")


class EvalInputError(ValueError):
    """Bad user input (task, length, depth, spec, checkpoint); raised before any model work."""


# ----------------------------------------------------------------------------------------------- parsing
_LENGTH_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*$")
_LENGTH_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_length(text: str | int) -> int:
    """'512' -> 512, '1k' -> 1024, '64K' -> 65536, '1m' -> 1048576, '1.5k' -> 1536 (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _LENGTH_RE.match(str(text))
        if not m:
            raise EvalInputError(f"cannot parse length {text!r}: use an integer or a k/m suffix "
                                 "(1k = 1024, 1m = 1048576)")
        raw = float(m.group(1)) * _LENGTH_UNITS[m.group(2).lower()]
        if raw != int(raw):
            raise EvalInputError(f"length {text!r} is not a whole number of tokens ({raw})")
        value = int(raw)
    if value < 1:
        raise EvalInputError(f"length must be positive, got {text!r}")
    return value


def format_length(n: int) -> str:
    """1024 -> '1K', 1048576 -> '1M', 1500 -> '1500'."""
    for unit, size in (("M", 1024**2), ("K", 1024)):
        if n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _split(text: str | Sequence, sep: str = ",") -> list[str]:
    items = text.split(sep) if isinstance(text, str) else [str(t) for t in text]
    return [t.strip() for t in items if str(t).strip()]


def parse_lengths(text: str | Sequence) -> list[int]:
    """Comma-separated lengths (see `parse_length`), de-duplicated, in ascending order."""
    values = sorted({parse_length(t) for t in _split(text)})
    if not values:
        raise EvalInputError("no lengths given")
    return values


def parse_depths(text: str | Sequence) -> list[float]:
    """Comma-separated depth fractions in [0, 1] (0 = needle at the haystack start), ascending."""
    out = set()
    for t in _split(text):
        try:
            d = float(t)
        except ValueError:
            raise EvalInputError(f"cannot parse depth {t!r}: use fractions in [0, 1] such as 0,0.5,1") from None
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise EvalInputError(f"depth {t!r} is outside [0, 1]")
        out.add(d)
    if not out:
        raise EvalInputError("no depths given")
    return sorted(out)


def parse_tasks(text: str | Sequence) -> list[str]:
    """Comma-separated registered task names ('all' = every registered task), order kept, de-duplicated."""
    from memsparse.eval.tasks import list_tasks

    known = list_tasks()
    names: list[str] = []
    for t in _split(text):
        for n in known if t == "all" else [t]:
            if n not in known:
                raise EvalInputError(f"unknown task {n!r}; known tasks: {', '.join(known)}")
            if n not in names:
                names.append(n)
    if not names:
        raise EvalInputError("no tasks given")
    return names


def parse_budget(spec: str) -> str:
    """Validate a budget policy spec ('dense', 'fixed:16', 'length_scaled:c=12,min_tokens=256', 'top_p:p=0.9,...')."""
    try:
        parse_policy(spec)
    except (ValueError, TypeError) as e:
        raise EvalInputError(f"bad budget policy {spec!r}: {e}") from None
    return str(spec).strip()


_CONS_FIELDS = {"a": float, "n_max": int, "passes": int, "replay": str, "replay_tokens": int}


def parse_consolidation(spec: str) -> dict:
    """'off' | 'fixed:N' | 'N' | 'schedule[:a=1,n_max=8]' (+ replay=segment|surprising, replay_tokens=K)
    -> the `ConsolidationConfig` fields to override (validated)."""
    text = str(spec).strip()
    mode, _, args = text.partition(":")
    mode = mode.strip()
    if re.fullmatch(r"\d+", mode) and not args:
        mode, args = "fixed", mode
    if mode not in ("off", "fixed", "schedule"):
        raise EvalInputError(f"bad consolidation {spec!r}: use off, fixed:N or schedule:a=1,n_max=8")
    out: dict = {"mode": mode}
    for i, item in enumerate(a.strip() for a in args.split(",") if a.strip()):
        key, eq, val = item.partition("=")
        if not eq:
            if mode != "fixed" or i:
                raise EvalInputError(f"bad consolidation {spec!r}: write arguments as key=value")
            key, val = "passes", item
        key = key.strip()
        if key not in _CONS_FIELDS:
            raise EvalInputError(f"bad consolidation {spec!r}: unknown argument {key!r}; known: {list(_CONS_FIELDS)}")
        try:
            out[key] = _CONS_FIELDS[key](val.strip())
        except ValueError:
            kind = _CONS_FIELDS[key].__name__
            raise EvalInputError(f"bad consolidation {spec!r}: {key}={val!r} is not a {kind}") from None
    if mode == "fixed" and "passes" not in out:
        raise EvalInputError(f"bad consolidation {spec!r}: fixed needs a pass count, e.g. fixed:2")
    if mode == "off":
        out.setdefault("passes", 0)
    try:
        dataclasses.replace(ConsolidationConfig(), **out).validate()
    except ValueError as e:
        raise EvalInputError(f"bad consolidation {spec!r}: {e}") from None
    return out


def parse_window(text: str | int, segment: int) -> int:
    """An attention window override in tokens ('16k' -> 16384, as `parse_length`), checked against the model's
    `segment`: a positive multiple of it (so at least one segment)."""
    try:
        window = parse_length(text)
    except EvalInputError as e:
        raise EvalInputError(f"window: {e}") from None
    if window < segment or window % segment:
        shown = str(text).strip() if str(text).strip() == str(window) else f"{str(text).strip()} ({window} tokens)"
        raise EvalInputError(f"window {shown} is not a multiple of the model's segment ({segment} tokens): use a "
                             f"positive multiple of {segment}")
    return window


def parse_sweep(text: str) -> tuple[str, list[str]]:
    """'budget=SPEC1;SPEC2' or 'consolidation=off;fixed:1' -> (kind, validated specs)."""
    kind, eq, rest = str(text).partition("=")
    kind = kind.strip()
    if not eq or kind not in SWEEP_KINDS:
        raise EvalInputError(f"bad sweep {text!r}: use budget=SPEC1;SPEC2 or consolidation=off;fixed:1;fixed:2")
    specs = _split(rest, ";")
    if not specs:
        raise EvalInputError(f"sweep {text!r} lists no settings")
    for s in specs:
        (parse_budget if kind == "budget" else parse_consolidation)(s)
    if len(set(specs)) != len(specs):
        raise EvalInputError(f"sweep {text!r} repeats a setting")
    return kind, specs


# ----------------------------------------------------------------------------------------------- checkpoint
@dataclass
class Checkpoint:
    """A resolved checkpoint directory, its parsed config.json and its tokenizer source."""

    path: Path
    config: dict
    tokenizer_source: str
    exported_from: Path | None = None  # the training `.ckpt` this directory was exported from, if any


def _has_tokenizer(d: Path) -> bool:
    return (d / "memsparse_tokenizer.json").exists() or (d / "tokenizer.json").exists()


def export_training_checkpoint(path: str | Path, directory: str | Path) -> Path:
    """Export a `memsparse-train` checkpoint file (`.ckpt`) into `directory` (model + tokenizer)."""
    try:
        from memsparse.train.module import export_checkpoint  # lazy: eval does not depend on train
    except ImportError as e:
        raise EvalInputError(f"checkpoint {path} is a training checkpoint file, and memsparse.train cannot be imported "
                             f"here ({e}): export it with `memsparse-export {path} DIR` and pass --checkpoint DIR") \
            from None
    try:
        return export_checkpoint(path, directory)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"cannot export training checkpoint {path}: {e}") from None


def resolve_checkpoint(path: str | Path, tokenizer: str | None = None,
                       export_dir: str | Path | None = None) -> Checkpoint:
    """Check the checkpoint files exist and read config.json (no weights); find the tokenizer: `tokenizer` if
    given, else the checkpoint dir, else its `tokenizer/` subdir, else 'byte'.

    A file (a `memsparse-train` `.ckpt`) is exported first into `export_dir` (default: a temporary directory
    removed at exit)."""
    p = Path(path)
    if p.is_file():
        if export_dir is None:
            import atexit
            import shutil
            import tempfile

            export_dir = tempfile.mkdtemp(prefix="memsparse-export-")
            atexit.register(shutil.rmtree, export_dir, True)
        out = export_training_checkpoint(p, export_dir)
        return dataclasses.replace(resolve_checkpoint(out, tokenizer), exported_from=p)
    if not p.is_dir():
        raise EvalInputError(f"checkpoint {path} does not exist (expected an export directory or a .ckpt file)")
    for name in ("config.json", "model.safetensors"):
        if not (p / name).is_file():
            raise EvalInputError(f"checkpoint {path}: missing {name} (expected a MemSparseLM.save_pretrained dir)")
    try:
        cfg = json.loads((p / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise EvalInputError(f"checkpoint {path}: bad config.json ({e})") from None
    if tokenizer is None:
        tokenizer = str(p) if _has_tokenizer(p) else str(p / "tokenizer") if _has_tokenizer(p / "tokenizer") else "byte"
    return Checkpoint(p, cfg, tokenizer)


def load_checked_tokenizer(ckpt: Checkpoint):
    """The checkpoint's tokenizer, checked against the model's vocabulary."""
    try:
        tok = load_tokenizer(ckpt.tokenizer_source)
    except (OSError, ValueError) as e:
        raise EvalInputError(f"cannot load tokenizer {ckpt.tokenizer_source!r}: {e}") from None
    vocab = ckpt.config.get("vocab_size")
    if isinstance(vocab, int) and tok.vocab_size > vocab:
        raise EvalInputError(f"tokenizer {ckpt.tokenizer_source!r} has {tok.vocab_size} ids but the model's "
                             f"vocab_size is {vocab}: wrong tokenizer for this checkpoint?")
    return tok


def check_plan(tasks: Sequence[str], lengths: Sequence[int], tokenizer) -> None:
    """Every (task, length) must fit the task's prompt overhead; one error lists all that do not."""
    from memsparse.eval.tasks import get_task

    bad = []
    for name in tasks:
        need = get_task(name).min_length(tokenizer)
        bad += [f"{name} needs >= {need} tokens, got {n}" for n in lengths if n < need]
    if bad:
        raise EvalInputError("length below the task's prompt overhead (min_length): " + "; ".join(bad))


def resolve_device(device: str | None) -> torch.device:
    """'cpu' | 'cuda' | 'cuda:N' | None (cuda when available); an error if CUDA is asked for but absent."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise EvalInputError(f"bad device {device!r}: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EvalInputError(f"device {device!r} requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise EvalInputError(f"device {device!r}: only cpu and cuda are supported")
    return dev


# ----------------------------------------------------------------------------------------------- overrides
@contextlib.contextmanager
def overrides(model, budget: str | None = None, consolidation: str | dict | None = None,
              window: int | str | None = None) -> Iterator[None]:
    """Apply a budget policy, consolidation and/or attention window override to `model` for the duration;
    restored on exit. `window` (tokens, '16k' accepted; a multiple of the model's segment) is
    `MemSparseLM.set_window`: streams started inside see it (a bad value raises `EvalInputError` first)."""
    cfg = model.config
    old_budget, old_policies, old_cons = cfg.budget, [b.policy for b in model.blocks], cfg.consolidation
    old_window = cfg.window
    new_window = None if window is None else parse_window(window, cfg.segment)
    try:
        if new_window is not None:
            model.set_window(new_window)
        if budget is not None:
            policy = parse_policy(budget)
            cfg.budget = budget
            for b in model.blocks:
                b.policy = policy
        if consolidation is not None:
            fields = parse_consolidation(consolidation) if isinstance(consolidation, str) else consolidation
            cfg.consolidation = dataclasses.replace(old_cons, **fields).validate()
        yield
    finally:
        cfg.budget, cfg.consolidation = old_budget, old_cons
        if new_window is not None:
            model.set_window(old_window)
        for b, p in zip(model.blocks, old_policies):
            b.policy = p


def describe_consolidation(c: ConsolidationConfig) -> str:
    """The spec string of a consolidation config ('off', 'fixed:2', 'schedule:a=1.0,n_max=8')."""
    if c.mode == "fixed":
        return f"fixed:{c.passes}"
    if c.mode == "schedule":
        return f"schedule:a={c.a},n_max={c.n_max}"
    return "off"


# ----------------------------------------------------------------------------------------------- measuring
class PeakMemory:
    """Peak memory over a region: CUDA `max_memory_allocated` (reset per region) above the allocation at its
    start; on CPU the process's peak RSS (Linux VmHWM, reset through /proc/self/clear_refs) above the RSS at
    its start, else the growth of `getrusage` ru_maxrss (0 unless the region sets a new process peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else self._cpu_kind()
        self._start = 0

    @staticmethod
    def _status_kb(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1])
        except OSError:
            pass
        return None

    @classmethod
    def _cpu_kind(cls) -> str:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if cls._status_kb("VmHWM") is not None:
                return "cpu_peak_rss_growth"
        except OSError:
            pass
        return "cpu_maxrss_growth"

    @staticmethod
    def _maxrss_bytes() -> int:
        r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return r if sys.platform == "darwin" else r * 1024

    def start(self) -> None:
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss_growth":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self._start = (self._status_kb("VmRSS") or 0) * 1024
        else:
            self._start = self._maxrss_bytes()

    def stop(self) -> tuple[int, int]:
        """(peak bytes, growth bytes over the start of the region)."""
        if self.kind == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss_growth":
            peak = (self._status_kb("VmHWM") or 0) * 1024
        else:
            peak = self._maxrss_bytes()
        return peak, max(0, peak - self._start)


class AttentionStats:
    """Attention selection of the streams of one cell, from each stream's running statistics
    (`StreamState.stat_means()`: token-weighted mean kept blocks / kept fraction per query block, over layers)."""

    def __init__(self, model):
        self.model = model
        cfg = model.config
        self.per_query_flops = 4.0 * cfg.block_size * cfg.head_dim * cfg.heads * cfg.depth
        self.reset()

    def reset(self) -> None:
        self.kept: list[float] = []
        self.frac: list[float] = []

    def add(self, state) -> None:
        means = state.stat_means() if hasattr(state, "stat_means") else {}
        if "attn_kept_blocks" in means:
            self.kept.append(float(means["attn_kept_blocks"]))
            self.frac.append(float(means["attn_kept_fraction"]))

    def summary(self) -> dict:
        """Mean kept blocks / kept fraction per query block, and attention FLOPs per token
        (kept_blocks * block_size * 4 * head_dim * heads per query token, summed over layers)."""
        if not self.kept:
            return {"attn_kept_blocks": None, "attn_kept_fraction": None, "attn_flops_per_token": None}
        kept = sum(self.kept) / len(self.kept)
        return {"attn_kept_blocks": kept, "attn_kept_fraction": sum(self.frac) / len(self.frac),
                "attn_flops_per_token": kept * self.per_query_flops}


@dataclass
class Decoded:
    """What `stream_decode` returns: the greedy continuation `new_ids` (B, m), the stream state after it, and, when
    answer ids were given, each row's teacher-forced argmax at its answer positions `tf_preds[b]` (n_b,) and after
    its whole answer `tf_nexts[b]` (what the model says once the answer is complete: `<eos>` for a model that
    stops), with their time `tf_s`. `tf_pred` / `tf_next` are row 0's."""

    new_ids: torch.Tensor
    state: object
    tf_preds: list[list[int]] | None = None
    tf_s: float = 0.0
    tf_nexts: list[int] | None = None

    @property
    def tf_pred(self) -> list[int] | None:
        return None if self.tf_preds is None else self.tf_preds[0]

    @property
    def tf_next(self) -> int | None:
        return None if self.tf_nexts is None else self.tf_nexts[0]


def stream_decode(model, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                  chunk_tokens: int = 8192, streamer=None,
                  teacher_ids: Sequence[int] | Sequence[Sequence[int]] | None = None, on_tokens=None) -> Decoded:
    """Stream the prompts `ids` (B, L) from `init_state(B, total_length=L)` in calls of `chunk_tokens` (a multiple of
    the segment; `streamer`, e.g. a `memsparse.cuda_graph.GraphedStream`, replaces `model.stream` for them), then
    decode greedily: the same segment-by-segment computation as `model.generate(ids)`, with flat memory at any L.

    With `teacher_ids` (the answer's n token ids, or one list per row), a branch from the state at the prompt's last
    segment boundary streams the rest of the prompt and then the answer tokens, teacher-forced: `tf_preds[b][j]` is
    the argmax after prompt + answer[:j], what the training forward over prompt + answer predicts there (equal up to
    float rounding; the declared total length stays L), and `tf_nexts[b]` the argmax after the whole answer. Rows
    with shorter answers are padded after them (the model is causal: nothing a row predicts before its pad reads
    it). It costs under one segment plus n + 1 tokens per sample, and the decoding is unchanged (the branch works on
    a copy of the state's statistics).

    `on_tokens(done, total)`, if given, is called with the prompt tokens streamed so far: 0 first, then after
    each chunk, and `total` when the prompt is in (a progress bar inside a long sample)."""
    stream = model.stream if streamer is None else streamer
    length = ids.shape[1]
    seg = model.config.segment
    chunk = max(seg, chunk_tokens // seg * seg)
    state = model.init_state(ids.shape[0], total_length=length)
    head = (length - 1) // chunk * chunk  # at least one prompt token is left for generate
    if on_tokens is not None:
        on_tokens(0, length)
    for i in range(0, head, chunk):
        _, state = stream(ids[:, i:i + chunk], state, return_logits="none")
        if on_tokens is not None:
            on_tokens(i + chunk, length)
    cut = (length - 1) // seg * seg  # the last segment boundary before the prompt's end: where the branch starts
    if cut > head:  # whole segments: the same spans generate would stream
        _, state = model.stream(ids[:, head:cut], state, return_logits="none")
    tf_preds, tf_nexts, tf_s = None, None, 0.0
    answers = _answers_per_row(teacher_ids, ids.shape[0])
    if answers is not None and max(map(len, answers)):
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        t0 = time.perf_counter()
        branch = dataclasses.replace(state, stats=dict(state.stats)) if dataclasses.is_dataclass(state) else state
        tail = ids[:, cut:]
        if tail.shape[1] > 1:
            _, branch = model.stream(tail[:, :-1], branch, return_logits="none")
        n = max(map(len, answers))
        padded = [a + [a[-1] if a else 0] * (n - len(a)) for a in answers]
        answer = torch.as_tensor(padded, dtype=ids.dtype, device=ids.device)
        feed = torch.cat([tail[:, -1:], answer], 1)
        # (B, n + 1, V): position j < n_b predicts row b's answer[j], position n_b what follows its answer
        logits, _ = model.stream(feed, branch, return_logits="all")
        arg = logits.float().argmax(-1).tolist()
        tf_preds = [row[:len(a)] for row, a in zip(arg, answers)]
        tf_nexts = [row[len(a)] for row, a in zip(arg, answers)]
        del logits, branch
        if ids.is_cuda:
            torch.cuda.synchronize(ids.device)
        tf_s = time.perf_counter() - t0
    new_ids, state = model.generate(ids[:, cut:], max_new_tokens, eos_id=eos_id, state=state)
    if on_tokens is not None:
        on_tokens(length, length)
    return Decoded(new_ids, state, tf_preds, tf_s, tf_nexts)


def _answers_per_row(teacher_ids, rows: int) -> list[list[int]] | None:
    """`teacher_ids` as one list of answer ids per row: one sequence serves every row; a list of sequences must
    have one per row."""
    if teacher_ids is None:
        return None
    items = list(teacher_ids)
    if not items or not isinstance(items[0], Sequence | torch.Tensor):
        return [[int(t) for t in items]] * rows
    if len(items) != rows:
        raise ValueError(f"{len(items)} answers for {rows} prompts")
    return [[int(t) for t in a] for a in items]


def stream_generate(model, ids: torch.Tensor, max_new_tokens: int, eos_id: int | None = None,
                    chunk_tokens: int = 8192, streamer=None):
    """`model.generate(ids, ...)` from `init_state(1, total_length=len)`, streamed as `stream_decode` does (flat
    memory at any length). Returns (new ids (B, m), state)."""
    out = stream_decode(model, ids, max_new_tokens, eos_id, chunk_tokens, streamer)
    return out.new_ids, out.state


def stops_after_answer(next_id: int | None, sample, task, tokenizer, eos_id: int | None) -> float | None:
    """1.0 if `next_id`, the model's argmax after the complete teacher-forced answer, ends it: `<eos>`, or a token
    whose text after the answer keeps its score ("." after "71432"); 0.0 if it continues it ("7" after "71432": the
    decoded answer then runs on and scores 0); None for a list answer or without a next token."""
    if next_id is None or isinstance(sample.answer, list):
        return None
    if eos_id is not None and int(next_id) == int(eos_id):
        return 1.0
    return float(task.score(tokenizer.decode([*sample.answer_ids, int(next_id)]), sample) >= 1.0)


def teacher_forced_scores(tf_pred: Sequence[int], answer_ids: Sequence[int]) -> tuple[int, bool]:
    """(answer tokens whose teacher-forced argmax is right, whether all are)."""
    if len(tf_pred) != len(answer_ids):
        raise ValueError(f"{len(tf_pred)} teacher-forced predictions for {len(answer_ids)} answer tokens")
    correct = sum(int(p) == int(a) for p, a in zip(tf_pred, answer_ids))
    return correct, correct == len(answer_ids)


class NoMemory:
    """A `PeakMemory` stand-in that measures nothing (peak and growth None): for evaluations inside a training
    run, where resetting CUDA's peak statistics would skew the run's own peak-memory metric."""

    kind = "none"

    def start(self) -> None:
        pass

    def stop(self) -> tuple[None, None]:
        return None, None


# ----------------------------------------------------------------------------------------------- running
@dataclass
class EvalPlan:
    """What to run: tasks x lengths x depths x samples, plus optional overrides and one sweep.

    `budget` / `consolidation`: spec strings overriding the model's for the run (None: the checkpoint's).
    `window`: the attention window in tokens for the run (None: the checkpoint's), a multiple of the model's
    segment; every setting of a sweep runs with it, and each cell records it. A window the model was not trained
    with is outside its training distribution: longer windows let the budget policies choose among more key
    blocks (a budget sweep at long lengths), they do not make the model better at using them.
    `batch`: prompts streamed together, up to this many at once: a cell's samples, and when `batch` exceeds
    `samples`, whole cells of the same (task, length) (`run_cells`: their peak memory and attention statistics are
    then those of the cells run together)."""

    tasks: list[str]
    lengths: list[int]
    depths: list[float]
    samples: int = 1
    seed: int = 0
    budget: str | None = None
    consolidation: str | None = None
    sweep_kind: str | None = None
    sweep_specs: list[str] = field(default_factory=list)
    window: int | None = None
    batch: int = 1

    def settings(self) -> list[tuple[str | None, str | None, str | None]]:
        """(sweep value, budget, consolidation) for each setting run."""
        if self.sweep_kind == "budget":
            return [(s, s, self.consolidation) for s in self.sweep_specs]
        if self.sweep_kind == "consolidation":
            return [(s, self.budget, s) for s in self.sweep_specs]
        return [(None, self.budget, self.consolidation)]

    def num_generations(self) -> int:
        return len(self.settings()) * len(self.tasks) * len(self.lengths) * len(self.depths) * self.samples


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample `index`: the same at every length and depth, so cells compare like with like."""
    return seed * 1_000_003 + index


def run_cell(model, tokenizer, task, length: int, depth: float, samples: int, seed: int,
             device: torch.device, memory: PeakMemory, attn: AttentionStats | None = None,
             on_sample=None, chunk_tokens: int = 8192, streamer=None, teacher_forced: bool = True,
             max_new_tokens: int | None = None, on_tokens=None, batch: int = 1) -> dict:
    """Generate, stream, decode and score `samples` prompts of one (task, length, depth) cell; with
    `teacher_forced`, also the teacher-forced accuracy at the answer positions (`stream_decode`) and whether the
    model ends a complete answer (`tf_stop`: its next token after the teacher-forced answer is `<eos>` or keeps the
    answer's score, e.g. "."; None for list answers). Decoding runs for
    `max_new_tokens` (default: the task's `max_answer_tokens`) or to `<eos>`. `on_tokens` goes to `stream_decode`
    for each call. `batch` prompts are streamed together (one call per group; the same results up to float
    rounding: each row's stream is its own; the cell's wall time and peak memory are then those of the groups).
    Returns the cell's row (one dict)."""
    return run_cells(model, tokenizer, task, length, [depth], samples, seed, device, memory, attn, on_sample,
                     chunk_tokens, streamer, teacher_forced, max_new_tokens, on_tokens, batch)[0]


def run_cells(model, tokenizer, task, length: int, depths: Sequence[float], samples: int, seed: int,
              device: torch.device, memory: PeakMemory, attn: AttentionStats | None = None,
              on_sample=None, chunk_tokens: int = 8192, streamer=None, teacher_forced: bool = True,
              max_new_tokens: int | None = None, on_tokens=None, batch: int = 1) -> list[dict]:
    """`run_cell` for several depths of one (task, length) at once: their `len(depths) x samples` prompts are
    streamed `batch` at a time, in order (a group may hold several cells' prompts). One row per depth; each cell's
    wall time is its prompts' share of their groups', and its peak memory and attention statistics are those of
    all the cells run together (exact per cell with one depth)."""
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise EvalInputError(f"batch must be an integer >= 1, got {batch!r}")
    max_new = task.max_answer_tokens(tokenizer) if max_new_tokens is None else int(max_new_tokens)
    eos = getattr(tokenizer, "eos_id", None)
    prompts = [(c, i) for c in range(len(depths)) for i in range(samples)]
    cells = [{"details": [], "scores": [], "tf_correct": 0, "tf_tokens": 0, "tf_exact": 0, "tf_stops": [],
              "wall": 0.0, "tf_wall": 0.0} for _ in depths]
    if attn is not None:
        attn.reset()
    memory.start()
    for first in range(0, len(prompts), batch):
        group = []
        for c, i in prompts[first:first + batch]:
            s = sample_seed(seed, i)
            sample = task.generate(length, depths[c], s, tokenizer)
            if len(sample.prompt_ids) != length:
                raise RuntimeError(f"{task.name} generated {len(sample.prompt_ids)} tokens for length {length}")
            group.append((c, s, sample))
        ids = torch.tensor([sample.prompt_ids for *_, sample in group], dtype=torch.long, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        res = stream_decode(model, ids, max_new, eos, chunk_tokens, streamer,
                            teacher_ids=[sample.answer_ids for *_, sample in group] if teacher_forced else None,
                            **({"on_tokens": on_tokens} if on_tokens is not None else {}))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        share = (time.perf_counter() - t0) / len(group)
        if attn is not None:
            for _ in group:  # each sample weighs the same, whatever its group's size
                attn.add(res.state)
        outs = res.new_ids.tolist()
        res.state = None
        del ids
        for b, (c, s, sample) in enumerate(group):
            cell = cells[c]
            cell["wall"] += share
            cell["tf_wall"] += res.tf_s / len(group)
            out = outs[b]
            if eos is not None and eos in out:
                out = out[: out.index(eos)]
            pred = tokenizer.decode(out)
            score = float(task.score(pred, sample))
            cell["scores"].append(score)
            detail = {"seed": s, "prediction": pred, "answer": sample.answer, "score": score, "new_tokens": len(out)}
            if "needle_positions" in sample.meta:  # tokens after each needle's last: beyond the window when > window
                detail["needle_distances"] = [length - p - n for p, n in
                                              zip(sample.meta["needle_positions"], sample.meta["needle_lengths"])]
            if res.tf_preds is not None:
                correct, exact = teacher_forced_scores(res.tf_preds[b], sample.answer_ids)
                cell["tf_correct"] += correct
                cell["tf_tokens"] += len(sample.answer_ids)
                cell["tf_exact"] += exact
                detail.update({"tf_prediction": tokenizer.decode(res.tf_preds[b]),
                               "tf_token_acc": correct / len(sample.answer_ids), "tf_exact": float(exact)})
                stop = stops_after_answer(res.tf_nexts[b], sample, task, tokenizer, eos)
                if stop is not None:
                    detail["tf_stop"] = stop
                    cell["tf_stops"].append(stop)
            cell["details"].append(detail)
            if on_sample is not None:
                on_sample()
    peak, growth = memory.stop()
    stats = attn.summary() if attn is not None else \
        {"attn_kept_blocks": None, "attn_kept_fraction": None, "attn_flops_per_token": None}
    rows = []
    for depth, cell in zip(depths, cells):
        tf_on = teacher_forced and cell["tf_tokens"] > 0
        wall, stops = cell["wall"], cell["tf_stops"]
        row = {
            "task": task.name, "length": length, "depth": depth, "n": samples,
            "accuracy": sum(cell["scores"]) / len(cell["scores"]),
            "tf_token_acc": cell["tf_correct"] / cell["tf_tokens"] if tf_on else None,
            "tf_exact": cell["tf_exact"] / samples if tf_on else None,
            "tf_stop": sum(stops) / len(stops) if tf_on and stops else None,
            "wall_s": wall,
            "tf_wall_s": cell["tf_wall"] if tf_on else None,
            "tokens_per_s": samples * length / wall if wall > 0 else None,
            "peak_mem_bytes": peak, "peak_mem_growth_bytes": growth, "mem_measure": memory.kind,
            **stats,
            "samples": cell["details"],
        }
        rows.append(row)
    return rows


def warm_up(model, device: torch.device, streamer=None) -> None:
    """Stream a short random prompt (window + 2 segments) and decode 2 tokens, untimed: compiles the Triton
    kernels, captures the streaming graphs and fills the allocator pools so that the first cell's time and
    memory are not skewed."""
    cfg = model.config
    ids = torch.randint(0, min(256, cfg.vocab_size), (1, cfg.window + 2 * cfg.segment + 1), device=device)
    stream_generate(model, ids, 2, streamer=streamer)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_eval(model, tokenizer, plan: EvalPlan, device: torch.device | str | None, progress: bool = True,
             warmup: bool = True, cuda_graph: bool = False, teacher_forced: bool = True,
             max_new_tokens: int | None = None, inference_mode: bool = True,
             measure_memory: bool = True, token_progress: int | None = None) -> list[dict]:
    """Run every setting x task x length x depth cell of `plan`; one row per cell (the combined table).
    `warmup` runs `warm_up` once per setting first. `cuda_graph` streams prompts through
    `memsparse.cuda_graph.GraphedStream` (CUDA only; same results, ~10x faster prefill). `teacher_forced` and
    `max_new_tokens` go to `run_cell`. Inside a training run: `inference_mode=False` runs under `torch.no_grad`
    instead (no inference tensors reach the training step), `measure_memory=False` leaves CUDA's peak statistics
    alone. With `progress` and `token_progress` = N, a second bar counts the prompt tokens streamed inside each
    sample of N tokens or more (a long sample otherwise shows no progress for minutes on a CPU). Leaves the model in
    eval mode. `device`: a torch.device, a string ("cpu", "cuda:0") or None (CUDA when available). `plan.window`
    (when set) is the attention window of every setting (`overrides`); each row records the window it ran with."""
    from memsparse.cuda_graph import GraphedStream

    device = resolve_device(device)

    if cuda_graph and device.type != "cuda":
        raise EvalInputError(f"cuda_graph needs a CUDA device, got {device}")
    from memsparse.eval.tasks import get_task
    from tqdm.auto import tqdm

    if plan.window is not None:  # a bad window fails before any work
        parse_window(plan.window, model.config.segment)
    model.eval()
    memory = PeakMemory(device) if measure_memory else NoMemory()
    rows: list[dict] = []
    bar = tqdm(total=plan.num_generations(), desc="memsparse-eval", unit="sample", disable=not progress,
               dynamic_ncols=True)
    tok_bar = None
    if progress and token_progress and any(n >= token_progress for n in plan.lengths):
        tok_bar = tqdm(total=max(plan.lengths), desc="  prompt", unit="tok", unit_scale=True, position=1, leave=False,
                       dynamic_ncols=True)

    def on_tokens(done: int, total: int) -> None:
        if done == 0:
            tok_bar.reset(total=total)
        tok_bar.update(done - tok_bar.n)

    try:
        with torch.inference_mode() if inference_mode else torch.no_grad():
            attn = AttentionStats(model)
            for sweep_value, budget, cons in plan.settings():
                with overrides(model, budget=budget, consolidation=cons, window=plan.window):
                    cfg = model.config
                    streamer = GraphedStream(model) if cuda_graph else None  # graphs of this setting only
                    if warmup:
                        bar.set_postfix_str("warm-up", refresh=True)
                        warm_up(model, device, streamer)
                    attn.reset()
                    for name in plan.tasks:
                        task = get_task(name)
                        for length in plan.lengths:
                            passes = consolidation_passes(cfg.consolidation, length, cfg.window, False)
                            # a call streams whole cells: several depths' samples together when batch > samples
                            per_call = max(1, plan.batch // plan.samples)
                            for first in range(0, len(plan.depths), per_call):
                                depths = plan.depths[first:first + per_call]
                                label = f"{name} {format_length(length)} d={','.join(f'{d:g}' for d in depths)}"
                                if sweep_value is not None:
                                    label += f" [{plan.sweep_kind}={sweep_value}]"
                                bar.set_postfix_str(label, refresh=False)
                                long = tok_bar is not None and length >= token_progress
                                cells = run_cells(model, tokenizer, task, length, depths, plan.samples, plan.seed,
                                                  device, memory, attn, on_sample=lambda: bar.update(1),
                                                  streamer=streamer, teacher_forced=teacher_forced,
                                                  max_new_tokens=max_new_tokens,
                                                  on_tokens=on_tokens if long else None, batch=plan.batch)
                                for row in cells:
                                    row.update({"budget": cfg.budget, "window": cfg.window,
                                                "consolidation": describe_consolidation(cfg.consolidation),
                                                "consolidation_passes": passes,
                                                "sweep_kind": plan.sweep_kind, "sweep_value": sweep_value})
                                rows += cells
    finally:
        if tok_bar is not None:
            tok_bar.close()
        bar.close()
    return rows


# ----------------------------------------------------------------------------------------------- outputs
CSV_COLUMNS = [
    "task", "length", "depth", "n", "accuracy", "tf_token_acc", "tf_exact", "tf_stop", "sweep_kind", "sweep_value",
    "budget", "window", "consolidation", "consolidation_passes", "attn_kept_blocks", "attn_kept_fraction",
    "attn_flops_per_token", "wall_s", "tf_wall_s", "tokens_per_s", "peak_mem_bytes", "peak_mem_growth_bytes",
    "mem_measure",
]


def _mean(values: Sequence) -> float | None:
    """Mean of the values that are not None (None if there are none)."""
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def summarize(rows: list[dict]) -> list[dict]:
    """Mean accuracy, teacher-forced token accuracy and exact match (and attention FLOPs per token) per
    (setting, task, length), averaged over depths."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("sweep_value"), r["task"], r["length"]), []).append(r)
    out = []
    for (sv, task, length), rs in groups.items():
        out.append({"sweep_value": sv, "task": task, "length": length,
                    "accuracy": sum(r["accuracy"] for r in rs) / len(rs),
                    "tf_token_acc": _mean([r.get("tf_token_acc") for r in rs]),
                    "tf_exact": _mean([r.get("tf_exact") for r in rs]),
                    "tf_stop": _mean([r.get("tf_stop") for r in rs]),
                    "attn_flops_per_token": _mean([r.get("attn_flops_per_token") for r in rs]),
                    "consolidation_passes": rs[0].get("consolidation_passes"), "budget": rs[0].get("budget"),
                    "window": rs[0].get("window"), "consolidation": rs[0].get("consolidation")})
    return out


def write_results(out_dir: str | Path, rows: list[dict], meta: dict) -> tuple[Path, Path]:
    """results.json (meta, cells with per-sample predictions, summary) and results.csv (one row per cell)."""
    import csv

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jpath, cpath = out_dir / "results.json", out_dir / "results.csv"
    jpath.write_text(json.dumps({"meta": meta, "cells": rows, "summary": summarize(rows)}, indent=2, default=str))
    with cpath.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})
    return jpath, cpath


def environment() -> dict:
    """Versions and host facts for results.json."""
    import platform

    import memsparse

    env = {"memsparse": memsparse.__version__, "torch": torch.__version__, "python": platform.python_version(),
           "platform": platform.platform(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        env["cuda_device"] = torch.cuda.get_device_name()
    return env
