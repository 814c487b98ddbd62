"""The README's quickstart command stays runnable: its eval lengths fit every task it names."""

import re
import shlex
from pathlib import Path

from memsparse.eval.harness import parse_lengths
from memsparse.eval.tasks import get_task

from memsparse.tokenizer import ByteTokenizer

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quickstart_eval_lengths_fit_the_tasks():
    line = next(ln for ln in README.read_text().splitlines() if "memsparse-train fit" in ln and "memsparse-eval" in ln)
    args = shlex.split(line.split("memsparse-eval", 1)[1])
    opts = dict(zip(args[::2], args[1::2]))
    assert "recipes/quickstart.yaml" in line and opts["--checkpoint"] == "outputs/quickstart/export"
    tok = ByteTokenizer()  # the quickstart recipe trains with the byte tokenizer
    assert re.search(r"tokenizer:\s*byte", (README.parent / "recipes" / "quickstart.yaml").read_text())
    for name in opts["--tasks"].split(","):
        for length in parse_lengths(opts["--lengths"]):
            assert length >= get_task(name).min_length(tok), (name, length)
