"""Learnability guard (issue 18): small models trained on CPU must learn to retrieve a needle.

A plain textbook transformer (tests/reference_transformer.py), MemSparseLM with a dense budget and no memory, and
MemSparseLM with the default budget and a MAC memory layer are trained side by side on the same generated samples of
a short passkey task (byte tokenizer, one letter as the key, 18-109 tokens between it and the answer), with the loss on
the answer tokens only (`SyntheticTaskDataset(loss="answer")`, what `synthetic_loss: answer` trains). Each must reach
`THRESHOLD` exact match decoded greedily by `memsparse.eval.harness.run_cell` (the path of `memsparse-eval`) on
held-out prompts of a length no training prompt has. A MemSparseLM whose attention cannot reach the needle (budget
`fixed:1`: the persistent tokens and the query's own block of 16, no memory) is trained the same way and must stay
near chance, so the guard can fail.

Measured with this recipe (seeds 0-3; one thread on a loaded 2-core machine): reference 1.0, 1.0, 0.975, 1.0;
memsparse_dense 1.0 x 4; memsparse_memory 1.0, 0.975, 0.975, 1.0 at 96 tokens and 1.0, 0.925, 0.975, 1.0 at 128;
memsparse_blocked 0.0, 0.025 (seeds 0, 1; chance 1/24). The loss on all tokens learns far slower: a 2-digit passkey
reached 0.9 teacher-forced accuracy by step 425-575 with the answer-only loss and stayed at chance for 1200 steps with
the loss on all tokens (the same code on a GPU). The models sit at the chance plateau (answer loss ln(24)/3 = 1.06)
for 100-300 steps, then learn within 50-100; 250 steps left one reference seed at 0.0 and 300 steps (constant rate)
one at 0.85, hence 400.

Training stops early once the model passes (`train(..., done=...)`): every `CHECK_EVERY` steps, while the mean
training loss of the last 10 steps is under `CHECK_LOSS`, a teacher-forced exact match over the same held-out prompts
(one batched forward per length; cheap) gates the greedy `run_cell` decoding, and the first check where that
reaches `THRESHOLD` at every length ends the run. A model that never gets there trains all `STEPS` and is judged
by the greedy decoding at the end, as before, so a run passes whenever the full 400 steps would. Measured with it
(CPU): seed 0, the test's, stops at step 130 (reference), 140 (memsparse_dense) and 170 (memsparse_memory: 0.9 and
0.825 at 96 and 128 tokens); memsparse_memory seed 1 at 310, reference seed 2 at 320. The full 400-step runs of
seeds 0-3 (CPU, one thread) ended at the accuracies above.

The three default runs train at the same time (`runs`): two Python threads, each on torch's one intra-op thread
(conftest.py), the longest run first. Every model is built in the main thread from the seeded RNG as before, and
nothing random runs in training or evaluation, so each run is the one it is alone: the same stop steps and
accuracies. On 2 cores the three took 41 s where one run after the other on two intra-op threads took 52 s; with
another test run busy on the machine they took 74 s, while a training step on two intra-op threads was 2.3x
slower than on one (the two threads wait on each other).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from load_script import load_script
from memsparse.eval.harness import PeakMemory, run_cell, sample_seed
from memsparse.eval.tasks.base import Layout, Needle, NeedleTask, Piece, Template
from memsparse.eval.tasks.haystacks import NoiseHaystack
from memsparse.eval.tasks.kinds import Kind
from memsparse.train.module import WarmupCosine, param_groups
from memsparse.train.packing import SyntheticTaskDataset

from memsparse.config import MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM
from memsparse.tokenizer import ByteTokenizer

reference_transformer = load_script(Path(__file__).with_name("reference_transformer.py"))

TOK = ByteTokenizer()
CPU = torch.device("cpu")


class Letters(Kind):
    """One upper-case letter; T and H are left out (the noise haystack has them)."""

    noun = "letters"
    alphabet = "ABCDEFGIJKLMNOPQRSUVWXYZ"
    max_bytes, capacity = 1, len(alphabet)

    def one(self, rng):
        return self.alphabet[int(rng.integers(len(self.alphabet)))]


class ShortPasskey(NeedleTask):
    """" The pass key is X." in the passkey noise ("The grass is green. ..."), then "\\nThe pass key is" -> " X"."""

    name = "short_passkey"
    needle = Template(" The pass key is {value}.")
    question = Template("\nThe pass key is")

    def __init__(self, values: Kind) -> None:
        self.values, self.haystack = values, NoiseHaystack()

    def build(self, rng):
        (value,) = self.values.draw(rng, 1)
        return Layout(prefix=Piece(Template("")), needles=[Needle(self.needle, {"value": value}, anchor=True)],
                      suffix=Piece(self.question), answer=value)


TASK = ShortPasskey(Letters())
CHANCE = 1 / Letters.capacity
# The recipe (all four models): bucketed lengths (one sequence length per step, cycled in a seeded order), AdamW with
# the training module's parameter groups, warmup + cosine, gradient clipping: what recipes/quickstart.yaml sets.
LENGTHS = tuple(range(64, 129, 8))  # sequence length = prompt + answer + eos; prompts of 62, 70, ..., 126 tokens
STEPS, BATCH, LR, WARMUP = 400, 16, 3e-3, 20
# held-out prompts: no training prompt has 96 tokens; each depth draws its own samples (seed EVAL_SEED + index)
EVAL_LENGTH, EVAL_DEPTHS, EVAL_SAMPLES, EVAL_SEED = 96, (0.0, 0.25, 0.5, 0.75, 1.0), 8, 1
THRESHOLD = 0.8
SEED = 0
# early stop: checks every CHECK_EVERY steps while the last 10 training losses average under CHECK_LOSS (the chance
# plateau is 1.06; one reference seed reached 0.975 greedy exact match at a 10-step mean loss of 0.23)
CHECK_EVERY, CHECK_LOSS = 10, 0.5

SMALL = dict(vocab_size=TOK.vocab_size, dim=64, depth=2, heads=4, kv_heads=2, head_dim=16, mlp_hidden=172,
             block_size=16, persistent_tokens=16,
             memory=MemoryConfig(heads=2, head_dim=32, depth=2, expansion=2, chunk_size=32))
MODELS = {
    "reference": lambda: reference_transformer.ReferenceLM(TOK.vocab_size, dim=64, depth=2, heads=4, hidden=172),
    # dense attention over the whole window (every prompt fits it), no memory
    "memsparse_dense": lambda: MemSparseLM(ModelConfig(**SMALL, segment=64, window=128, budget="dense",
                                                       memory_layers=[])),
    # the default budget; segments of 32 and a window of 64, so segments leave the window and are written into the
    # MAC memory of layer 1 (read by the later segments of prompts over 96 tokens)
    "memsparse_memory": lambda: MemSparseLM(ModelConfig(**SMALL, segment=32, window=64, variant="mac",
                                                        memory_layers=[1])),
    # cannot look back: the persistent tokens and the query's own block of 16 only, no memory
    "memsparse_blocked": lambda: MemSparseLM(ModelConfig(**SMALL, segment=64, window=128, budget="fixed:1",
                                                         memory_layers=[])),
}


class TrainingBatches:
    """STEPS batches (input_ids, labels) `(BATCH, L)`, L from LENGTHS; labels only on the answer and its eos. Each
    is made on first use and kept (the runs stop early, so most of the later ones are never needed)."""

    def __init__(self, seed: int = SEED) -> None:
        order = np.random.default_rng(seed).permutation(np.resize(np.arange(len(LENGTHS)), STEPS))
        self.sets = {L: SyntheticTaskDataset(TASK, STEPS * BATCH, [L], L, TOK, seed, source=1, loss="answer")
                     for L in LENGTHS}
        used = dict.fromkeys(LENGTHS, 0)
        self.spans = []  # (length, first item) of each step, in order
        for k in order:
            self.spans.append((LENGTHS[k], used[LENGTHS[k]]))
            used[LENGTHS[k]] += BATCH
        self.made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.lock = threading.Lock()  # the concurrent runs share the batches

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        with self.lock:
            if step not in self.made:
                L, first = self.spans[step]
                items = [self.sets[L][first + i] for i in range(BATCH)]
                self.made[step] = (torch.stack([it["input_ids"] for it in items]),
                                   torch.stack([it["labels"] for it in items]))
        return self.made[step]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


def training_batches(seed: int = SEED) -> TrainingBatches:
    return TrainingBatches(seed)


def train(model: torch.nn.Module, batches, done=None) -> tuple[torch.nn.Module, int]:
    """The shared recipe: AdamW (betas 0.9/0.95, weight decay 0.1), warmup + cosine to LR/10, clipping at 1.
    With `done(model)` (called on the model in eval mode, see CHECK_EVERY / CHECK_LOSS), training stops at the first
    check where it is true. Returns the model in eval mode and the number of steps trained."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=LR, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(WARMUP, len(batches), 0.1))
    model.train()
    losses = []
    for step, (ids, labels) in enumerate(batches, 1):
        loss = model(ids, labels=labels, return_logits=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if done is not None and step % CHECK_EVERY == 0 and step < len(batches) \
                and sum(losses[-10:]) / 10 < CHECK_LOSS:
            if done(model.eval()):
                return model, step
            model.train()
    return model.eval(), len(batches)


def greedy_accuracy(model, length: int = EVAL_LENGTH) -> float:
    """Mean exact match over EVAL_DEPTHS x EVAL_SAMPLES held-out prompts, decoded by `run_cell` (memsparse-eval)."""
    with torch.inference_mode():
        rows = [run_cell(model, TOK, TASK, length, d, EVAL_SAMPLES, EVAL_SEED + i, CPU, PeakMemory(CPU),
                         teacher_forced=False) for i, d in enumerate(EVAL_DEPTHS)]
    return sum(r["accuracy"] for r in rows) / len(rows)


_HELD_OUT: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
_HELD_OUT_LOCK = threading.Lock()


def held_out(length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """greedy_accuracy's prompts at `length` with their answers appended, and the answers (made once)."""
    with _HELD_OUT_LOCK:
        if length not in _HELD_OUT:
            samples = [TASK.generate(length, d, sample_seed(EVAL_SEED + i, j), TOK)
                       for i, d in enumerate(EVAL_DEPTHS) for j in range(EVAL_SAMPLES)]
            _HELD_OUT[length] = (torch.tensor([s.prompt_ids + s.answer_ids for s in samples]),
                                 torch.tensor([s.answer_ids for s in samples]))
        return _HELD_OUT[length]


def teacher_forced_accuracy(model, length: int = EVAL_LENGTH) -> float:
    """The fraction of greedy_accuracy's prompts whose answer tokens are all the argmax after prompt + answer[:j]
    (one batched forward): the cheap gate before the greedy decoding."""
    ids, answers = held_out(length)
    with torch.inference_mode():
        logits = model(ids[:, :-1], return_logits=True).logits[:, length - 1:]
    return (logits.argmax(-1) == answers).all(-1).float().mean().item()


def learned(lengths, accuracies: dict):
    """A `train(done=...)` check: the teacher-forced gate, then the greedy exact match, >= THRESHOLD at every length
    (the greedy accuracies are recorded in `accuracies`)."""
    def done(model) -> bool:
        if any(teacher_forced_accuracy(model, n) < THRESHOLD for n in lengths):
            return False
        for n in lengths:
            accuracies[n] = greedy_accuracy(model, n)
            if accuracies[n] < THRESHOLD:
                return False
        return True
    return done


def fresh(name: str, seed: int = SEED) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[name]()


def trained(name: str, batches, lengths=(EVAL_LENGTH,), seed: int = SEED,
            model: torch.nn.Module | None = None) -> tuple[torch.nn.Module, int, dict]:
    """The model (`fresh(name, seed)` unless given) trained until it passes at `lengths` (or for all STEPS):
    (model, steps, greedy accuracy by length)."""
    model = fresh(name, seed) if model is None else model
    accuracies = {}
    model, steps = train(model, batches, done=learned(lengths, accuracies))
    if steps == len(batches):  # never passed a check: judged at the end
        accuracies = {n: greedy_accuracy(model, n) for n in lengths}
    return model, steps, accuracies


@pytest.fixture(scope="module")
def batches():
    return training_batches()


DEFAULT_RUNS = ["memsparse_memory", "memsparse_dense", "reference"]  # the longest first


def eval_lengths(name: str) -> tuple[int, ...]:
    # memsparse_memory also at 128 tokens: a needle in the first 64 is then outside the window of the answer's segment
    return (EVAL_LENGTH, 128) if name == "memsparse_memory" else (EVAL_LENGTH,)


@pytest.fixture(scope="module")
def runs(request, batches):
    """{name: future of `trained(name, ...)`} for the default runs this session selected, training concurrently
    (see the module docstring); the models are built here, one after the other, before any training starts."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_small_models_learn_to_retrieve"}
    names = [n for n in DEFAULT_RUNS if n in selected]
    for n in sorted({length for name in names for length in eval_lengths(name)}):
        held_out(n)  # the shared caches filled before the threads start
    models = {n: fresh(n) for n in names}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # conftest.py's setting, made sure of here
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="learnability")
    try:
        yield {n: pool.submit(trained, n, batches, eval_lengths(n), model=models[n]) for n in names}
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["reference", "memsparse_dense", "memsparse_memory"])
def test_small_models_learn_to_retrieve(name, runs):
    _, steps, accuracies = runs[name].result()
    for length, acc in accuracies.items():
        assert acc >= THRESHOLD, f"{name}: greedy exact match {acc:.3f} < {THRESHOLD} at {length} tokens after " \
                                 f"{steps} steps (chance {CHANCE:.3f})"


@pytest.mark.slow  # shown once (0.0 and 0.025 on seeds 0, 1); 30 s, kept out of the default run
def test_guard_fails_when_attention_cannot_reach_the_needle(batches):
    _, steps, accuracies = trained("memsparse_blocked", batches)  # the same early stop: it must never trigger
    acc = accuracies[EVAL_LENGTH]
    assert acc < 0.25 < THRESHOLD, f"a model that cannot see the needle scored {acc:.3f} after {steps} steps " \
                                   f"(chance {CHANCE:.3f})"
