"""`memsparse-export CKPT DIR`: write a training checkpoint's model and tokenizer as an export directory
(`MemSparseLM.from_pretrained(DIR)`, `load_tokenizer(DIR)`, `memsparse-eval --checkpoint DIR`)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of `memsparse-export`; bad input exits with 2 and one line."""
    p = argparse.ArgumentParser(prog="memsparse-export",
                                description="Export a memsparse-train .ckpt to a directory loadable by "
                                            "MemSparseLM.from_pretrained and memsparse-eval.")
    p.add_argument("checkpoint", help="a memsparse-train checkpoint file (e.g. outputs/run/checkpoints/last.ckpt)")
    p.add_argument("directory", help="output directory (config.json, model.safetensors, the tokenizer)")
    args = p.parse_args(argv)
    from .module import export_checkpoint

    try:
        out = export_checkpoint(args.checkpoint, args.directory)
    except (OSError, ValueError) as e:
        p.exit(2, f"memsparse-export: error: {e}\n")
    print(f"exported {args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
