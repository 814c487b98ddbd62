"""Teacher-forced accuracy at the answer positions beside the decoded exact match (memsparse.eval.harness), on CPU:
the training forward's predictions, an oracle model (1.0) and its off-by-one twin (~0), a random model (~0), and
the results.csv / results.json / summary columns."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass, field

import pytest
import torch
from memsparse.eval import cli, harness
from memsparse.eval.tasks import get_task

from memsparse.config import MemoryConfig, ModelConfig
from memsparse.model import MemSparseLM, StreamState
from memsparse.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
QUESTION = "What is the pass key? The pass key is"


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=259, dim=32, depth=2, heads=4, kv_heads=2, head_dim=8, mlp_hidden=64, block_size=8,
                segment=32, window=64, persistent_tokens=8, memory=MemoryConfig(heads=2, head_dim=8, chunk_size=32))
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@dataclass
class HistoryState(StreamState):
    history: list = field(default_factory=list)


class PasskeyOracle(MemSparseLM):
    """Reads the pass key from the tokens streamed so far and, once they end with the question (and a prefix of the
    answer), predicts the answer's next byte, then <eos>. `shift=1` predicts one token too far (an off-by-one)."""

    def __init__(self, shift: int = 0):
        super().__init__(tiny_config())
        self.shift = shift

    def init_state(self, batch_size=1, total_length=None, device=None):
        return HistoryState([], 0, total_length)

    def predict(self, history: list[int]) -> int:
        text = TOK.decode(history)
        key, q = re.search(r"The pass key is (\d+)\.", text), text.rfind(QUESTION)
        if key is None or q < 0:
            return 0
        answer, done = TOK.encode(" " + key.group(1)), TOK.encode(text[q + len(QUESTION):])
        if answer[:len(done)] != done:
            return 0
        k = len(done) + self.shift
        return answer[k] if k < len(answer) else TOK.eos_id

    @torch.no_grad()
    def stream(self, input_ids, state=None, return_logits="all"):
        state = self.init_state() if state is None else state
        history, preds = list(state.history), []
        for t in input_ids[0].tolist():
            history.append(t)
            preds.append(self.predict(history))
        logits = torch.nn.functional.one_hot(torch.tensor(preds), self.config.vocab_size).float()[None]
        new = HistoryState([], state.pos + input_ids.shape[1], state.total_length, state.stats, history=history)
        return {"all": logits, "last": logits[:, -1:], "none": None}[return_logits], new


def _cell(model, length=300, depths=(0.0, 1.0), samples=2, **kw):
    memory = harness.PeakMemory(torch.device("cpu"))
    with torch.no_grad():
        return [harness.run_cell(model, TOK, get_task("passkey"), length, d, samples, 0, torch.device("cpu"), memory,
                                 **kw) for d in depths]


@pytest.mark.parametrize("length,chunk,graphed", [(300, 8192, False), (1000, 256, False), (1000, 256, True)])
def test_teacher_forced_equals_the_training_forward(length, chunk, graphed):
    """The streamed branch predicts what forward(prompt + answer) predicts at the answer positions, and the decoded
    continuation is still model.generate's."""
    from memsparse.cuda_graph import GraphedStream

    torch.manual_seed(0)
    model = MemSparseLM(tiny_config()).eval()
    streamer = GraphedStream(model, graph=False) if graphed else None
    for seed in (1, 2):
        s = get_task("passkey").generate(length, 0.5, seed, TOK)
        ids = torch.tensor([s.prompt_ids])
        res = harness.stream_decode(model, ids, 8, None, chunk, streamer, teacher_ids=s.answer_ids)
        n = len(s.answer_ids)
        with torch.no_grad():
            logits = model(torch.tensor([s.prompt_ids + s.answer_ids])).logits[0]
        assert res.tf_pred == logits[length - 1:length - 1 + n].argmax(-1).tolist()
        assert res.tf_next == int(logits[length - 1 + n].argmax())  # what follows the whole answer
        assert len(set(res.tf_pred)) > 1  # a random model's argmax varies: the comparison means something
        ref, _ = model.generate(ids, 8, state=model.init_state(1, total_length=length))
        assert torch.equal(res.new_ids, ref)
        assert res.tf_s > 0


def test_oracle_scores_one_and_an_off_by_one_scores_zero():
    rows = _cell(PasskeyOracle())
    assert all(r["accuracy"] == 1.0 and r["tf_token_acc"] == 1.0 and r["tf_exact"] == 1.0 for r in rows)
    for r in rows:
        for s in r["samples"]:
            assert s["tf_prediction"] == " " + s["answer"] and s["tf_exact"] == 1.0
    shifted = _cell(PasskeyOracle(shift=1))
    for r in shifted:
        assert r["tf_exact"] == 0.0 and r["tf_token_acc"] <= 0.4 and r["accuracy"] == 0.0


class RunOnOracle(PasskeyOracle):
    """The oracle, except that after the complete answer it says `after` (a token id) instead of <eos>."""

    def __init__(self, after: int):
        super().__init__()
        self.after = after

    def predict(self, history: list[int]) -> int:
        nxt = super().predict(history)
        return self.after if nxt == TOK.eos_id else nxt


def test_tf_stop_tells_a_model_that_runs_on_past_the_answer():
    """tf_stop: the oracle ends every answer (<eos>); a twin that says "7" after the key is right teacher-forced
    but decodes the key and more digits (exact match 0, tf_stop 0); one that says "." keeps the answer (1, 1)."""
    assert all(r["tf_stop"] == 1.0 for r in _cell(PasskeyOracle()))
    digit = _cell(RunOnOracle(TOK.encode("7")[0]), max_new_tokens=10)
    for r in digit:
        assert r["tf_exact"] == 1.0 and r["tf_stop"] == 0.0 and r["accuracy"] == 0.0
        assert all(s["prediction"].startswith(" " + s["answer"] + "7") and s["tf_stop"] == 0.0 for s in r["samples"])
    period = _cell(RunOnOracle(TOK.encode(".")[0]), max_new_tokens=10)
    assert all(r["tf_exact"] == 1.0 and r["tf_stop"] == 1.0 and r["accuracy"] == 1.0 for r in period)
    summary = harness.summarize(digit)
    assert summary[0]["tf_stop"] == 0.0


def test_random_model_is_near_zero():
    torch.manual_seed(0)
    rows = _cell(MemSparseLM(tiny_config()).eval(), samples=3)
    assert all(r["tf_exact"] == 0.0 and r["tf_token_acc"] < 0.2 and r["accuracy"] == 0.0 for r in rows)
    assert all(r["tf_wall_s"] < r["wall_s"] for r in rows)


def test_teacher_forcing_off_leaves_the_columns_empty():
    torch.manual_seed(0)
    rows = _cell(MemSparseLM(tiny_config()).eval(), depths=(0.5,), samples=1, teacher_forced=False)
    assert rows[0]["tf_token_acc"] is None and rows[0]["tf_exact"] is None and rows[0]["tf_wall_s"] is None
    assert rows[0]["tf_stop"] is None
    assert "tf_prediction" not in rows[0]["samples"][0]


def test_cli_writes_teacher_forced_columns(tmp_path, monkeypatch, capsys):
    d = tmp_path / "ckpt"
    MemSparseLM(tiny_config()).save_pretrained(d)
    TOK.save(d)
    monkeypatch.setattr(MemSparseLM, "from_pretrained", classmethod(lambda cls, *a, **k: PasskeyOracle()))
    out = tmp_path / "out"
    assert cli.main(["--checkpoint", str(d), "--out", str(out), "--no-progress", "--no-wandb", "--tasks", "passkey",
                     "--lengths", "300,400", "--depths", "0,1", "--samples", "1"]) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for r in rows:
        assert float(r["accuracy"]) == float(r["tf_token_acc"]) == float(r["tf_exact"]) == 1.0
        assert float(r["tf_wall_s"]) > 0 and float(r["tf_stop"]) == 1.0
    data = json.loads((out / "results.json").read_text())
    assert all(s["tf_exact"] == 1.0 and s["tf_token_acc"] == 1.0 for s in data["summary"])
    printed = capsys.readouterr().out
    assert printed.count("tf_exact 1.000  tf_token_acc 1.000  tf_stop 1.000") == 2
    assert (out / "heatmap_passkey.png").stat().st_size > 1000


def test_teacher_forced_scores():
    assert harness.teacher_forced_scores([1, 2, 3], [1, 2, 3]) == (3, True)
    assert harness.teacher_forced_scores([1, 5, 3], [1, 2, 3]) == (2, False)
    with pytest.raises(ValueError):
        harness.teacher_forced_scores([1, 2], [1, 2, 3])


def test_stops_after_answer_none_for_list_answers_and_without_a_next_token():
    """tf_stop is defined for single answers: a list answer (scored by the fraction found) or a missing next token
    gives None, never a number that would enter the cell's mean."""
    task = get_task("niah_multivalue")
    s = task.generate(task.min_length(TOK), 0.5, 0, TOK)
    assert isinstance(s.answer, list)
    assert harness.stops_after_answer(TOK.encode("x")[0], s, task, TOK, TOK.eos_id) is None
    p = get_task("passkey").generate(300, 0.5, 0, TOK)
    assert harness.stops_after_answer(None, p, get_task("passkey"), TOK, TOK.eos_id) is None
    assert harness.stops_after_answer(TOK.eos_id, p, get_task("passkey"), TOK, TOK.eos_id) == 1.0


@pytest.mark.parametrize("budget", ["length_scaled:c=2,min_tokens=16", "top_p:p=0.7,min=1,max=6"])
def test_samples_streamed_together_score_as_one_at_a_time(budget):
    """run_cell(batch=N) streams N prompts of a cell at once: every sample's decoded and teacher-forced predictions
    are those of its own stream (float64: no rounding ties), with memory writes (prompts past the window) and a
    budget that selects per row."""
    torch.manual_seed(0)
    model = MemSparseLM(tiny_config(budget=budget)).double().eval()
    rows = {b: _cell(model, length=300, depths=(0.0, 1.0), samples=3, batch=b, attn=harness.AttentionStats(model))
            for b in (1, 2, 3)}
    keys = ("prediction", "tf_prediction", "tf_token_acc", "tf_exact", "tf_stop", "score", "new_tokens")
    one = [[{k: s.get(k) for k in keys} for s in r["samples"]] for r in rows[1]]
    assert len({s["prediction"] for cell in one for s in cell}) > 1  # a random model's outputs vary
    for b in (2, 3):
        assert [[{k: s.get(k) for k in keys} for s in r["samples"]] for r in rows[b]] == one
        for r, r1 in zip(rows[b], rows[1]):
            assert r["accuracy"] == r1["accuracy"] and r["tf_token_acc"] == r1["tf_token_acc"]
            assert r["attn_kept_blocks"] == pytest.approx(r1["attn_kept_blocks"], rel=1e-9)


def test_rows_with_answers_of_different_lengths_are_teacher_forced_each_on_its_own():
    torch.manual_seed(1)
    model = MemSparseLM(tiny_config()).double().eval()
    ids = torch.randint(3, 259, (2, 150))
    answers = [[65, 66, 67], [70, 71, 72, 73, 74]]
    res = harness.stream_decode(model, ids, 4, None, 8192, teacher_ids=answers)
    for b, a in enumerate(answers):
        with torch.no_grad():
            logits = model(torch.cat([ids[b], torch.tensor(a)])[None]).logits[0]
        assert res.tf_preds[b] == logits[149:149 + len(a)].argmax(-1).tolist()
        assert res.tf_nexts[b] == int(logits[149 + len(a)].argmax())
        ref, _ = model.generate(ids[b:b + 1], 4, state=model.init_state(1, total_length=150))
        assert torch.equal(res.new_ids[b:b + 1], ref)
    assert res.tf_pred == res.tf_preds[0] and res.tf_next == res.tf_nexts[0]
    with pytest.raises(ValueError, match="3 answers for 2 prompts"):
        harness.stream_decode(model, ids, 1, None, 8192, teacher_ids=answers + [[1]])


def test_a_batch_below_one_is_refused():
    with pytest.raises(harness.EvalInputError, match="batch must be an integer >= 1"):
        _cell(MemSparseLM(tiny_config()).eval(), batch=0)


def test_whole_cells_streamed_together_score_as_one_at_a_time():
    """EvalPlan(batch > samples): several depths' cells in one call; every cell as with batch 1."""
    torch.manual_seed(0)
    model = MemSparseLM(tiny_config()).double().eval()
    keys = ("prediction", "tf_prediction", "tf_exact", "tf_stop", "score")
    got = {}
    for b in (1, 4, 6):  # 4: two cells a call (the last call one), 6: all three
        plan = harness.EvalPlan(["passkey"], [300], [0.0, 0.5, 1.0], samples=2, batch=b)
        rows = harness.run_eval(model, TOK, plan, "cpu", progress=False, warmup=False)
        assert [r["depth"] for r in rows] == [0.0, 0.5, 1.0] and all(r["n"] == 2 and r["wall_s"] > 0 for r in rows)
        got[b] = [[{k: s.get(k) for k in keys} for s in r["samples"]] for r in rows]
    assert got[4] == got[1] and got[6] == got[1]
    assert len({s["prediction"] for cell in got[1] for s in cell}) > 1


@pytest.mark.slow
def test_whole_cells_together_through_the_triton_kernels(monkeypatch):
    """The batched eval through the Triton kernels (interpreter; sparse attention, memory gradients, update
    coefficients): the same answers as one prompt at a time. ~90 s on 2 CPU cores."""
    for kernel in ("SPARSE_ATTENTION", "MEMORY_GRADS", "UPDATE_COEFFICIENTS"):
        monkeypatch.setenv(f"MEMSPARSE_{kernel}_IMPL", "triton")
    torch.manual_seed(0)
    model = MemSparseLM(tiny_config(head_dim=16, block_size=16, persistent_tokens=16,
                                    memory=MemoryConfig(heads=2, head_dim=16, chunk_size=32))).eval()
    keys = ("prediction", "tf_prediction", "tf_exact", "tf_stop", "score")
    got = {}
    for b in (1, 6):
        plan = harness.EvalPlan(["passkey"], [300], [0.0, 0.5, 1.0], samples=2, batch=b)
        rows = harness.run_eval(model, TOK, plan, "cpu", progress=False, warmup=False)
        got[b] = [[{k: s.get(k) for k in keys} for s in r["samples"]] for r in rows]
    assert got[6] == got[1] and len({s["prediction"] for cell in got[1] for s in cell}) > 1
