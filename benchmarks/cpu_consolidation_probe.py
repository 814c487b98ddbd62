"""Do consolidation passes help the memory hold a key, and does their worth grow with distance? A CPU probe at toy
scale (claim 2 of the seeds: extra test-time passes that replay evicted context into the memory raise retrieval
accuracy, and the length-scaled schedule spends them where they pay).

The MAC model of `cpu_memory_probe.py` (window 32, segment 16, memory in layer 1) is trained as there (keys 8-160
tokens back; `--train-passes N`: N consolidation passes unrolled in training, default none), then scored by greedy
argmax at the question with the key placed further and further back (112-160 tokens: the training range; then
~12x, ~35x and ~100x further, up to 16K tokens), under each consolidation setting: off, fixed passes 1 / 2 / 4 / 8,
and the schedule n(L) = clamp(round(a * log2(L / window)), 0, n_max) at a = 0.25 / 0.5 / 1 (n_max 8; what it gives
at each length is recorded). Every setting sees the same prompts; the wall time of each setting's forward is
recorded beside its accuracy. `--filler random` trains and scores on random letters instead of the repeated
sentence (as `cpu_memory_probe.py --filler random`): a haystack whose every token surprises the memory. A pass
replays the whole evicted segment, or with `--replay surprising --replay-tokens K` only its K most surprising
tokens.

    python benchmarks/cpu_consolidation_probe.py --out benchmarks/results/cpu_consolidation_probe

writes consolidation_probe.json (training curve, accuracy / wall time / passes per setting and distance band),
consolidation_probe.md (the table) and consolidation_probe.png (accuracy against passes per band, and the
schedules' points).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import torch
from memsparse.eval.harness import EvalInputError, parse_consolidation

from memsparse.config import ConsolidationConfig
from memsparse.consolidation import consolidation_passes

_spec = importlib.util.spec_from_file_location("cpu_memory_probe", Path(__file__).with_name("cpu_memory_probe.py"))
probe = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(probe)

# (label, lo, hi, prompt length): the key lo-hi tokens before the question
BANDS = (("112-160", 112, 160, 192), ("1.5K-2K", 1536, 2048, 2112), ("4.5K-6K", 4608, 6144, 6208),
         ("12K-16K", 12288, 16384, 16448))
SETTINGS = ("off", "fixed:1", "fixed:2", "fixed:4", "fixed:8", "schedule:a=0.25", "schedule:a=0.5", "schedule:a=1")


def consolidation(setting: str, replay: str = "segment", replay_tokens: int = 64) -> ConsolidationConfig:
    """A `memsparse-eval --consolidation` spec (`off`, `fixed:N`, `schedule:a=A`; n_max 8 by default) as a
    ConsolidationConfig replaying `replay` ("segment": the whole evicted segment; "surprising": its `replay_tokens`
    most surprising tokens)."""
    try:
        fields = parse_consolidation(setting)
    except EvalInputError as e:
        raise SystemExit(f"unknown consolidation setting {setting!r}: {e}") from None
    return ConsolidationConfig(**{"replay": replay, "replay_tokens": replay_tokens, **fields})


@torch.no_grad()
def score(model, setting: str, band: tuple, n: int, seed: int, chunk: int, replay: str = "segment",
          replay_tokens: int = 64, filler: str = "sky") -> dict:
    """Accuracy, wall time and passes of one setting on `n` prompts of one band (the same prompts for every
    setting: the generator is seeded by the band); `filler` as in training ("sky" or "random")."""
    label, lo, hi, length = band
    model.set_consolidation(consolidation(setting, replay, replay_tokens))
    model.eval()
    ids, _, ans = probe.batch(torch.Generator().manual_seed(seed + lo), n, lo, hi, length, filler=filler)
    t0, right = time.perf_counter(), 0
    for i in range(0, n, chunk):
        logits = model(ids[i:i + chunk]).logits
        right += sum(all(h) for h in probe.key_hits(logits, ans[i:i + chunk]))
    wall = time.perf_counter() - t0
    passes = consolidation_passes(model.config.consolidation, length, model.config.window, training=False)
    return {"band": label, "length": length, "setting": setting, "passes": passes, "n": n,
            "accuracy": right / n, "wall_s": round(wall, 2)}


def table(rows: list[dict]) -> str:
    """Markdown: exact match per setting (rows) and distance band (columns), passes and wall time in brackets."""
    bands = list(dict.fromkeys(r["band"] for r in rows))
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    cell = {(r["setting"], r["band"]): r for r in rows}
    lines = ["| setting | " + " | ".join(f"key {b} back" for b in bands) + " |",
             "|---|" + "---|" * len(bands)]
    for s in settings:
        vals = [cell.get((s, b)) for b in bands]
        lines.append(f"| {s} | " + " | ".join("-" if r is None else
                                               f"{r['accuracy']:.2f} ({r['passes']} p, {r['wall_s']:.0f} s)"
                                               for r in vals) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, train_passes: int = 0, replay: str = "segment", filler: str = "sky") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (label, *_rest) in enumerate(BANDS):
        color = f"C{i}"
        fixed = sorted((r["passes"], r["accuracy"]) for r in rows if r["band"] == label
                       and (r["setting"] == "off" or r["setting"].startswith("fixed")))
        ax.plot([p for p, _ in fixed], [a for _, a in fixed], "o-", color=color, label=f"key {label} back")
        sched = [(r["passes"], r["accuracy"]) for r in rows
                 if r["band"] == label and r["setting"].startswith("schedule")]
        ax.plot([p for p, _ in sched], [a for _, a in sched], "x", color=color, ms=9)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks([0, 1, 2, 4, 8], ["0", "1", "2", "4", "8"])
    ax.set_xlabel("consolidation passes per evicted segment (x: the length-scaled schedules)")
    ax.set_ylabel("exact match (greedy)")
    ax.set_ylim(-0.03, 1.03)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"CPU probe: window 32, memory in layer 1, trained on keys 8-160 back with {train_passes} "
                 f"consolidation passes; replay: {replay}; filler: {filler}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=192, help="training sample length")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-passes", type=int, default=0,
                    help="consolidation passes in training (unrolled; the settings scored are inference's)")
    ap.add_argument("--replay", default="segment", choices=["segment", "surprising"],
                    help="what a pass replays: the evicted segment, or its --replay-tokens most surprising tokens")
    ap.add_argument("--replay-tokens", type=int, default=4)
    ap.add_argument("--filler", default="sky", choices=["sky", "random"],
                    help="the haystack, in training and scoring: the repeated sentence, or random letters and "
                         "spaces (every filler token unpredictable, so every write of the memory is surprising)")
    ap.add_argument("--eval-samples", type=int, default=200, help="prompts per band of the training curve")
    ap.add_argument("--samples", type=int, default=100, help="prompts per distance band and setting")
    ap.add_argument("--bands", type=int, default=len(BANDS), help="how many of the distance bands (shortest first)")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--chunk", type=int, default=25, help="prompts per forward")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.train_passes < 0:
        raise SystemExit(f"--train-passes must be >= 0, got {args.train_passes}")
    if not 1 <= args.bands <= len(BANDS):
        raise SystemExit(f"--bands must be 1-{len(BANDS)}, got {args.bands}")
    settings = [s for s in args.settings.split(",") if s]
    if not 1 <= args.replay_tokens <= 16:
        raise SystemExit(f"--replay-tokens must be 1-16 (the segment), got {args.replay_tokens}")
    for s in settings:
        consolidation(s, args.replay, args.replay_tokens)  # a bad setting fails before training
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model, run = probe.fit(True, args)
    train_s = time.time() - t0
    rows = []
    for band in BANDS[:args.bands]:
        for s in settings:
            r = score(model, s, band, args.samples, args.seed, args.chunk, args.replay, args.replay_tokens,
                      args.filler)
            rows.append(r)
            print(json.dumps(r), file=sys.stderr, flush=True)
    result = {"args": vars(args), "chance": 1 / len(probe.KEYS), "train_wall_s": round(train_s, 1),
              "training": run, "rows": rows, "window": model.config.window, "torch": torch.__version__,
              "device": "cpu"}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "consolidation_probe.json").write_text(json.dumps(result, indent=2))
        plot(rows, out / "consolidation_probe.png", args.train_passes, args.replay, args.filler)
        (out / "consolidation_probe.md").write_text(table(rows))
    return result


if __name__ == "__main__":
    main()
