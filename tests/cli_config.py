"""memsparse-train in-process with the CLI's argument parser built once: for the recipe, mistake and training tests.

Building LightningCLI's parser (four subcommands, each from the Trainer's, the module's and the data module's
signatures) is about two thirds of a `--print_config` call or of a mistake's one-line error (~1 s on 2 cores), and
more than half of a tiny in-process fit. Inside `reused_parser()`, MemSparseCLI reuses the first parser it built
with the same settings. Parsing, instantiating and fitting from a parser do not change it: when this was written,
every recipe printed the same configuration and every case of test_cli_errors.py printed the same error, in any
order, as with a new parser each time, and a tiny fit run after two other fits on the reused parser saved the same
config.yaml and the same final weights (sha256 of the state dict) as one on a new parser. The callbacks `cli()`
passes as trainer defaults are new instances each time (LightningCLI adds them when it builds the Trainer, not
through the parser); the logger default is set on the parser, so it is part of the reuse key.
"""

from __future__ import annotations

import contextlib

import pytest
import yaml
from memsparse.train.cli import MemSparseCLI, main

_BUILT: dict = {}


@contextlib.contextmanager
def reused_parser():
    setup_parser = MemSparseCLI.setup_parser

    def reuse(self, add_subcommands, main_kwargs, subparser_kwargs):
        key = (add_subcommands, repr(main_kwargs), repr(subparser_kwargs), repr(self.trainer_defaults.get("logger")))
        if key not in _BUILT:
            before = set(vars(self))
            setup_parser(self, add_subcommands, main_kwargs, subparser_kwargs)
            _BUILT[key] = {k: v for k, v in vars(self).items() if k not in before}  # parser, subcommand parsers
        vars(self).update(_BUILT[key])

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MemSparseCLI, "setup_parser", reuse)
        yield


def print_config(args: list[str], capsys) -> dict:
    """`memsparse-train *args --print_config` -> the printed configuration (exit status 0 checked)."""
    with reused_parser(), pytest.raises(SystemExit) as e:
        main([*args, "--print_config"])
    assert e.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)
