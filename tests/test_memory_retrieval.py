"""The memory carries a key past every attention path (benchmarks/cpu_memory_probe.py at its committed settings).

Trained the same way for 150 steps, MemSparseLM with a MAC memory layer answers a one-letter key stated 112-160
tokens before the question (window 32, segment 16, two layers: no attention path reaches it) and the same model
without memory cannot; both copy it from inside the window. About 3 minutes on 2 cores: marked slow.
"""

from __future__ import annotations

import argparse

import pytest
from load_script import load_benchmark

probe = load_benchmark("cpu_memory_probe")


@pytest.mark.slow
def test_memory_carries_the_key_beyond_attention_and_no_memory_does_not():
    args = argparse.Namespace(steps=150, batch=32, length=192, lr=3e-3, eval_every=150, seed=0)
    with_memory = probe.train(True, args)["final"]
    without = probe.train(False, args)["final"]
    assert with_memory["acc_in_window"] >= 0.9 and without["acc_in_window"] >= 0.9
    assert with_memory["acc_beyond_attention"] >= 0.8  # measured 1.0 (benchmarks/results/cpu_memory_probe.json)
    assert without["acc_beyond_attention"] <= 0.25     # chance is 0.05


def test_multi_letter_key_samples_label_every_letter_after_the_question():
    """--key-length N: the key follows the question, each of its N letters labelled at the position before it;
    N = 1 draws exactly the committed runs' samples."""
    import torch

    ids, labels, ans = probe.batch(torch.Generator().manual_seed(0), 4, 8, 24, 64, key_length=5)
    for row, lab, (key, q) in zip(ids.tolist(), labels, ans):
        text = "".join(map(chr, row))
        assert len(key) == 5 and text.startswith("K=" + "".join(map(chr, key)) + ";")
        assert text[q - 2:q + 1] == "?K=" and row[q + 1:q + 6] == key
        assert lab[q:q + 5].tolist() == key and int((lab != -100).sum()) == 5
    one = probe.batch(torch.Generator().manual_seed(3), 4, 8, 24, 64)
    assert [len(a) for a, _ in one[2]] == [1] * 4 and int((one[1] != -100).sum()) == 4
    first = probe.sample(torch.Generator().manual_seed(7), 20, 64)
    g = torch.Generator().manual_seed(7)  # the one-letter draw order: key letter, then the filler's start
    key = probe.KEYS[int(torch.randint(len(probe.KEYS), (1,), generator=g))]
    assert first[1] == [ord(key)]


def test_random_filler_samples_keep_the_layout_and_hide_no_key_letter():
    """--filler random: the same layout (key, `distance` filler characters, question, key, padding to `length`),
    the filler drawn from lowercase letters and spaces only, and different between samples."""
    import torch

    ids, labels, ans = probe.batch(torch.Generator().manual_seed(0), 6, 100, 140, 192, key_length=2, filler="random")
    fills = []
    for row, lab, (key, q) in zip(ids.tolist(), labels, ans):
        text = "".join(map(chr, row))
        assert len(row) == 192 and text.startswith("K=" + "".join(map(chr, key)) + ";")
        assert text[q - 2:q + 1] == "?K=" and row[q + 1:q + 3] == key and lab[q:q + 2].tolist() == key
        fill = text[5:q - 2]
        assert 100 <= len(fill) <= 140 and set(fill) <= set(probe.RANDOM_FILLER)
        assert set(text[q + 3:]) <= set(probe.RANDOM_FILLER)  # the padding too
        fills.append(fill)
    assert len(set(fills)) == len(fills)
    sky = probe.batch(torch.Generator().manual_seed(0), 6, 100, 140, 192, key_length=2)
    assert all("the sky is blue" in "".join(map(chr, r)) for r in sky[0].tolist())


def test_alphabet_limits_the_key_letters_and_keeps_the_default_samples():
    import torch

    g = torch.Generator().manual_seed(2)
    keys = ["".join(map(chr, probe.sample(g, 20, 64, key_length=5, letters=probe.KEYS[:2])[1])) for _ in range(20)]
    assert set("".join(keys)) == {"A", "B"}
    full = probe.sample(torch.Generator().manual_seed(7), 20, 64, key_length=3)
    same = probe.sample(torch.Generator().manual_seed(7), 20, 64, key_length=3, letters=probe.KEYS)
    assert full == same


def test_unseen_letters_stay_out_of_training_keys_and_get_bands_of_their_own():
    """--unseen N: training keys use the alphabet's first letters only; the last N are scored in unseen_* bands
    (keys made of them), and --unseen-in-filler puts them in the random filler (inputs, never labelled)."""
    import torch

    g = torch.Generator().manual_seed(3)
    keys = "".join(chr(c) for _ in range(40) for c in probe.sample(g, 20, 64, 3, "random", letters="AB")[1])
    assert set(keys) == {"A", "B"}
    g = torch.Generator().manual_seed(4)
    ids, _, ans = probe.batch(g, 8, 30, 40, 96, filler="random", letters="QRSU", filler_extra="QRSU")
    filler = "".join(chr(c) for row, (_, q) in zip(ids.tolist(), ans) for c in row[4:q - 2])
    assert set(filler) & set("QRSU")  # the unseen letters appear in the filler (the test fails without it)
    args = argparse.Namespace(steps=1, batch=2, length=192, lr=1e-3, eval_every=1, seed=0, filler="random",
                              unseen=4, unseen_in_filler=False, eval_samples=2)
    row = probe.train(True, args)["final"]
    assert {"acc_unseen_in_window", "acc_unseen_beyond_attention"} <= set(row) and "acc_unseen_relay" not in row


def test_loss_all_labels_every_next_token_and_agrees_on_the_key():
    import torch

    ids, labels, _ = probe.batch(torch.Generator().manual_seed(5), 3, 8, 24, 64, key_length=2)
    assert probe.training_labels(ids, labels, "answer") is labels
    every = probe.training_labels(ids, labels, "all")
    assert torch.equal(every[:, :-1], ids[:, 1:]) and (every[:, -1] == -100).all()
    keyed = labels != -100
    assert torch.equal(every[keyed], labels[keyed])


def test_rare_mix_gives_the_rare_letters_their_share():
    assert probe.rare_mix("ABCD", "QR", 0.0) == "ABCD"
    for share in (0.01, 0.05, 0.2):
        mix = probe.rare_mix("ABCDEFGHIJKLMNOP", "QRSU", share)
        got = sum(mix.count(c) for c in "QRSU") / len(mix)
        assert abs(got - share) <= 0.2 * share and set(mix) == set("ABCDEFGHIJKLMNOPQRSU")


def test_depth_builds_that_many_layers_with_the_memory_in_layer_1():
    """--depth N: N layers, the memory in layer 1 only; the default is the committed runs' 2-layer model."""
    assert [probe.build(True, 0, **kw).config.memory.chunk_size for kw in ({}, {"chunk": 4})] == [16, 4]
    two, six = probe.build(True, 0), probe.build(True, 0, depth=6)
    assert (two.config.depth, six.config.depth) == (2, 6)
    assert two.config.memory_layers == six.config.memory_layers == [1]
    assert probe.build(False, 0, depth=6).config.memory_layers == []


def test_memory_lr_scale_puts_the_memory_in_a_group_of_its_own():
    model = probe.build(True, 0)
    (one,) = probe.probe_groups(model, 1e-3)
    assert len(one["params"]) == len(list(model.parameters())) and "lr" not in one
    rest, memory = probe.probe_groups(model, 1e-3, 5.0)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in memory["params"]} == model.memory_parameter_names() != set()
    assert memory["lr"] == 5e-3 and "lr" not in rest
    assert len(rest["params"]) + len(memory["params"]) == len(names)


def test_copy_steps_train_in_the_window_first_and_count_in_the_curve(monkeypatch):
    """--copy-steps N: the first N training batches hold in-window keys only (8-24 tokens back), then the mixed
    schedule's `--steps` follow (two of three batches reach the farthest band); the curve counts both."""
    calls, real = [], probe.batch

    def batch(g, n, lo, hi, *a, **k):
        calls.append((lo, hi))
        return real(g, n, lo, hi, *a, **k)
    monkeypatch.setattr(probe, "batch", batch)
    args = argparse.Namespace(steps=3, batch=2, length=192, lr=1e-3, eval_every=100, seed=0, copy_steps=3,
                              eval_samples=2)
    row = probe.train(True, args)["final"]
    assert row["step"] == 6
    assert calls[:6] == [(8, 24)] * 3 + [(8, 160), (8, 160), (8, 24)]


def test_logit_adjust_from_trains_plain_first_and_counts_the_prior_after(monkeypatch):
    """--logit-adjust-from N: steps 1..N take the plain loss (as with TAU 0, the same parameters after them), the
    adjusted loss follows with the prior counted from step N + 1 only."""
    import torch

    seen, real = [], probe.adjusted_cross_entropy

    def adjusted(logits, labels, counts, tau):
        seen.append(float(counts.sum()))
        return real(logits, labels, counts, tau)
    monkeypatch.setattr(probe, "adjusted_cross_entropy", adjusted)

    def run(**k):
        args = argparse.Namespace(steps=4, batch=2, length=192, lr=1e-3, eval_every=100, seed=0, eval_samples=2,
                                  **k)
        model, _ = probe.fit(True, args)
        return [p.detach().clone() for p in model.parameters()]
    plain = run()
    late = run(logit_adjust=2.0, logit_adjust_from=4)  # the adjustment from step 5 on: never, in 4 steps
    assert seen == [] and all(torch.equal(a, b) for a, b in zip(plain, late))
    half = run(logit_adjust=2.0, logit_adjust_from=2)
    assert seen == [2.0, 4.0]  # two labelled answers a step (batch 2, one-letter keys), counted from step 3
    assert any(not torch.equal(a, b) for a, b in zip(plain, half))


def test_balanced_from_adds_the_unseen_letters_to_the_training_keys_from_that_step(monkeypatch):
    """--balanced-from N (with --unseen): the steps before N draw key letters from the seen letters only, the steps
    from N on from the whole alphabet (a last stage of balanced keys)."""
    letters, real = [], probe.batch

    def batch(g, n, lo, hi, length, kl, fl, train_letters, *a, **k):
        letters.append(train_letters)
        return real(g, n, lo, hi, length, kl, fl, train_letters, *a, **k)
    monkeypatch.setattr(probe, "batch", batch)
    args = argparse.Namespace(steps=4, batch=2, length=192, lr=1e-3, eval_every=100, seed=0, eval_samples=2,
                              alphabet=20, unseen=4, balanced_from=3)
    probe.fit(True, args)
    seen, everything = probe.KEYS[:16], probe.KEYS[:20]
    assert letters[:4] == [seen, seen, everything, everything]
    letters.clear()
    probe.fit(True, argparse.Namespace(**{**vars(args), "balanced_share": 0.02}))  # the unseen four at ~2%
    late = letters[2]
    assert letters[:2] == [seen, seen] and set(late) == set(everything)
    assert sum(late.count(c) for c in probe.KEYS[16:20]) / len(late) == pytest.approx(0.02, rel=0.05)


def test_copy_loss_labels_every_token_during_the_copying_start_only(monkeypatch):
    """--copy-loss all: the --copy-steps start labels every next token, the mixed schedule after it --loss's."""
    kinds, real = [], probe.training_labels

    def training_labels(ids, labels, loss):
        kinds.append(loss)
        return real(ids, labels, loss)
    monkeypatch.setattr(probe, "training_labels", training_labels)
    args = argparse.Namespace(steps=2, batch=2, length=192, lr=1e-3, eval_every=100, seed=0, copy_steps=2,
                              eval_samples=2, copy_loss="all")
    probe.train(True, args)
    assert kinds == ["all", "all", "answer", "answer"]


def test_eval_no_writes_scores_the_same_prompts_with_the_writes_off(monkeypatch):
    """--eval-no-writes: every band scored again with the memory's writes off (the flags restored after), on the
    same prompts as the writes-on scores; the rows also hold the memory's write rates."""
    flags, real = [], probe.accuracy

    def accuracy(model, g, *a, **k):
        flags.append((all(b.memory_writes for b in model.blocks), int(g.initial_seed())))
        return real(model, g, *a, **k)
    monkeypatch.setattr(probe, "accuracy", accuracy)
    args = argparse.Namespace(steps=2, batch=2, length=192, lr=1e-3, eval_every=2, seed=0, eval_samples=2,
                              eval_no_writes=True)
    model, run = probe.fit(True, args)
    row = run["final"]
    assert {"acc_in_window_no_writes", "acc_relay_no_writes", "acc_beyond_attention_no_writes"} <= set(row)
    assert {"memory_forget", "memory_keep_1k", "memory_lr"} <= set(row)
    assert [f for f, _ in flags] == [True] * 3 + [False] * 3 and {s for _, s in flags} == {10_000}
    assert all(b.memory_writes for b in model.blocks)


def test_beyond_share_draws_that_share_of_keys_beyond_attention_and_keeps_the_default_samples():
    """--beyond-share X: each key lies 112-160 back with probability X, else within attention's reach; without it
    the draws (and so the committed runs' samples) are unchanged."""
    import torch

    def distances(beyond, seed=0, n=400):
        _, _, ans = probe.batch(torch.Generator().manual_seed(seed), n, 8, 90, 192, beyond=beyond)
        return [q - 3 - 3 for _, q in ans]  # "K=X;" ... "?K=": the filler's length between

    far = [d for d in distances((112, 160, 0.25)) if d >= 112]
    near = [d for d in distances((112, 160, 0.25)) if d < 112]
    assert 0.18 < len(far) / 400 < 0.32 and all(d <= 160 for d in far) and all(8 <= d <= 90 for d in near)
    assert all(d >= 112 for d in distances((112, 160, 1.0), n=50))
    assert all(d <= 90 for d in distances((112, 160, 0.0), n=50))
    a = probe.batch(torch.Generator().manual_seed(4), 6, 8, 160, 192)
    b = probe.batch(torch.Generator().manual_seed(4), 6, 8, 160, 192, beyond=None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("argv, message", [
    (["--beyond-share", "1.5"], "--beyond-share must be in [0, 1]"),
    (["--beyond-share", "0.3", "--far", "200,220", "--length", "260"], "not with --far"),
    (["--near-max", "120"], "--near-max must be in [8, 112)"),
    (["--logit-adjust", "-1"], "--logit-adjust must be >= 0"),
    (["--logit-adjust-from", "100"], "--logit-adjust-from needs --logit-adjust TAU"),
    (["--copy-loss", "all"], "--copy-loss needs --copy-steps N"),
    (["--balanced-from", "100"], "--balanced-from needs --unseen N"),
    (["--unseen", "4", "--balanced-share", "0.1"], "--balanced-share needs --balanced-from N"),
    (["--unseen", "4", "--balanced-from", "9", "--balanced-share", "1.0"], "--balanced-share needs --balanced-from N"),
])
def test_bad_share_settings_are_one_line_errors(argv, message, monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["cpu_memory_probe.py", *argv])
    with pytest.raises(SystemExit) as e:
        probe.main()
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_adjusted_cross_entropy_shifts_the_logits_by_the_log_prior():
    """--logit-adjust TAU: the loss on logits + TAU * log(add-one prior of the labelled tokens); TAU 0 is the plain
    loss, and a never-labelled token, low in the prior, is pushed down less than under the plain loss."""
    import torch

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, probe.VOCAB, generator=g, requires_grad=True)
    labels = torch.full((2, 6), -100)
    labels[:, 3] = torch.tensor([65, 66])
    counts = torch.zeros(probe.VOCAB)
    counts[65], counts[66] = 40.0, 8.0
    plain = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(probe.adjusted_cross_entropy(logits, labels, counts, 0.0), plain)
    prior = (counts + 1) / (counts.sum() + probe.VOCAB)
    got = probe.adjusted_cross_entropy(logits, labels, counts, 2.0)
    want = torch.nn.functional.cross_entropy((logits + 2.0 * prior.log()).flatten(0, 1), labels.flatten(),
                                             ignore_index=-100)
    torch.testing.assert_close(got, want)
    (g_plain,), (g_adj,) = torch.autograd.grad(plain, logits), torch.autograd.grad(got, logits)
    assert (g_adj[:, 3, 67] < 0.2 * g_plain[:, 3, 67]).all()  # 67: never a label (measured 0.13x)


def test_stop_ends_every_answer_with_a_labelled_stop_token():
    """--stop: the answer is the key then ";" (labelled like the key), and the defaults' samples are unchanged."""
    import torch

    ids, labels, ans = probe.batch(torch.Generator().manual_seed(0), 4, 8, 24, 64, key_length=2, stop=True)
    for row, lab, (a, q) in zip(ids.tolist(), labels, ans):
        assert len(a) == 3 and a[-1] == ord(probe.STOP) and row[q + 1:q + 4] == a
        assert lab[q:q + 3].tolist() == a and int((lab != -100).sum()) == 3
    plain = probe.batch(torch.Generator().manual_seed(0), 4, 8, 24, 64, key_length=2)
    again = probe.batch(torch.Generator().manual_seed(0), 4, 8, 24, 64, key_length=2, stop=False)
    assert torch.equal(plain[0], again[0]) and torch.equal(plain[1], again[1])
