"""What a model answers on niah_multikey: the asked value, another needle's value, or neither, whole and by token.

    python benchmarks/multikey_answers.py RUN/eval_niah/results.json --tokenizer RUN/tokenizer --out DIR

A multi-key prompt holds four needles ("One of the special magic numbers for loud-fox is: 4896617.") and asks for
one key's value. A wrong answer can be another needle's value (the model copies values but not which key each
follows: a binding failure), a mix of the needles' value tokens, or tokens of none of them (no copy at all). This
regenerates each prompt's needles from its seed (the eval's generator; an answer that does not match is an error)
and counts, per length and for the asked needle inside the attention window or not (the file's needle distances):
answers right / a distractor's value / other, and the predicted tokens found in the asked value / only in a
distractor's / in neither. Give the run's own tokenizer: the values' tokens depend on it, and nothing in the file
can check it (the needles' places cannot: the essay haystack comes from the machine's stdlib docstrings, so a
prompt's filler differs between Python versions, its keys and values do not). Writes multikey_answers.md and
.json to --out (default: beside the results file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

from memsparse.eval.tasks import get_task
from memsparse.eval.tasks.base import encode_value

from memsparse.tokenizer import load_tokenizer

ANSWERS = ("right", "distractor", "other")
TOKENS = ("asked", "distractor", "neither")


def classify(prediction_ids: list[int], asked_ids: list[int], distractor_ids: list[list[int]]) -> dict:
    """{"answer": right | distractor | other, "tokens": {asked, distractor, neither: count}} of one prediction,
    compared as token id sequences (each value's own tokens, with its leading space, as the prompt holds it)."""
    answer = ("right" if prediction_ids == asked_ids
              else "distractor" if any(prediction_ids == d for d in distractor_ids) else "other")
    tokens = dict.fromkeys(TOKENS, 0)
    others = {t for d in distractor_ids for t in d}
    for t in prediction_ids:
        tokens["asked" if t in asked_ids else "distractor" if t in others else "neither"] += 1
    return {"answer": answer, "tokens": tokens}


def inside(cell: dict, sample: dict) -> bool:
    """Is the asked needle inside the cell's attention window (from the file's needle distances and window; without
    them: depth 1, the needle just before the question)?"""
    dist, window = sample.get("needle_distances"), cell.get("window")
    if dist and window:
        return int(dist[0]) <= int(window)
    return float(cell["depth"]) == 1.0


def analyse(results: dict, tokenizer) -> dict:
    """{"<length>/<inside|beyond>": {"prompts", "answers": {...}, "tokens": {...}}} over the task's cells (`inside`:
    the asked needle within the attention window). A regenerated answer that differs from the file's is a
    ValueError (another task or generator than the eval's)."""
    task_name = "niah_multikey"
    task = get_task(task_name)
    out: dict = defaultdict(lambda: {"prompts": 0, "answers": dict.fromkeys(ANSWERS, 0),
                                     "tokens": dict.fromkeys(TOKENS, 0)})
    cells = [c for c in results["cells"] if c["task"] == task_name]
    if not cells:
        raise ValueError(f"the results hold no {task_name} cells")
    for c in cells:
        for s in c["samples"]:
            smp = task.generate(int(c["length"]), float(c["depth"]), int(s["seed"]), tokenizer)
            if str(smp.answer) != str(s["answer"]):
                raise ValueError(f"prompt seed {s['seed']} at {c['length']} regenerates answer {smp.answer!r}, the "
                                 f"file says {s['answer']!r}: not the task (or generator) the eval ran with")
            others = [list(map(int, encode_value(tokenizer, " " + str(v)))) for v in smp.meta["values"][1:]]
            got = classify(list(tokenizer.encode(s["prediction"])), list(map(int, smp.answer_ids)), others)
            row = out[f"{c['length']}/{'inside' if inside(c, s) else 'beyond'}"]
            row["prompts"] += 1
            row["answers"][got["answer"]] += 1
            for k, n in got["tokens"].items():
                row["tokens"][k] += n
    return dict(sorted(out.items(), key=lambda kv: (int(kv[0].split("/")[0]), kv[0])))


def table(rows: dict) -> str:
    lines = ["| length / key | prompts | right | a distractor's value | other | predicted tokens: asked / "
             "distractor only / neither |", "|---|---|---|---|---|---|"]
    for k, r in rows.items():
        a, t = r["answers"], r["tokens"]
        lines.append(f"| {k} | {r['prompts']} | {a['right']} | {a['distractor']} | {a['other']} | "
                     f"{t['asked']} / {t['distractor']} / {t['neither']} |")
    return "\n".join(lines)


def total(runs: list[dict]) -> dict:
    """The runs' rows summed by inside / beyond the window over every length: {"inside"|"beyond": row}."""
    out: dict = {}
    for rows in runs:
        for k, r in rows.items():
            t = out.setdefault(k.split("/")[1], {"prompts": 0, "answers": dict.fromkeys(ANSWERS, 0),
                                                 "tokens": dict.fromkeys(TOKENS, 0)})
            t["prompts"] += r["prompts"]
            for part in ("answers", "tokens"):
                for name, n in r[part].items():
                    t[part][name] += n
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> dict:
    """Returns the rows of the one results file, or with several {"files": {path: rows}, "total": rows}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, nargs="+",
                    help="memsparse-eval results.json files holding niah_multikey cells (several: one table each, "
                         "and their total)")
    ap.add_argument("--tokenizer", required=True, help="the tokenizer the evals ran with (the run's export)")
    ap.add_argument("--out", type=Path, default=None,
                    help="directory for multikey_answers.md / .json (default: beside the one results file)")
    args = ap.parse_args(argv)
    for path in args.results:
        if not path.is_file():
            ap.error(f"no results file at {path}")
    if len(args.results) > 1 and args.out is None:
        ap.error("several results files need --out DIR")
    try:
        tok = load_tokenizer(args.tokenizer)
        runs = [analyse(json.loads(path.read_text()), tok) for path in args.results]
    except (ValueError, OSError, KeyError) as e:
        ap.error(str(e).strip("'\""))
    out = args.out or args.results[0].parent
    out.mkdir(parents=True, exist_ok=True)
    parts = [f"`{path}`\n\n{table(rows)}" for path, rows in zip(args.results, runs)]
    if len(runs) == 1:
        result = runs[0]
        data = {"results": str(args.results[0]), "rows": result}
    else:
        result = {"files": {str(p): r for p, r in zip(args.results, runs)}, "total": total(runs)}
        parts.append(f"All {len(runs)} files, every length\n\n{table(result['total'])}")
        data = result
    md = "\n\n".join(parts)
    (out / "multikey_answers.md").write_text(md + "\n")
    (out / "multikey_answers.json").write_text(json.dumps(data, indent=1))
    print(md)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
