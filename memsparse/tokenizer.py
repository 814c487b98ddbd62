"""Tokenizers: a zero-setup byte tokenizer and a byte-level BPE trained locally with `tokenizers`.

Both expose the same small interface (`encode`, `decode`, `vocab_size`, special ids, `save`), and
`load_tokenizer` restores either from a directory written by `save` (a self-describing run directory).
Nothing here downloads anything.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

SPECIALS = ("<bos>", "<eos>", "<pad>")
_CONFIG_NAME = "memsparse_tokenizer.json"


class ByteTokenizer:
    """UTF-8 bytes 0..255, then <bos>=256, <eos>=257, <pad>=258."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 256 + len(SPECIALS)
        self.bos_id, self.eos_id, self.pad_id = 256, 257, 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / _CONFIG_NAME
        path.write_text(json.dumps({"type": "byte"}))
        return path


class BPETokenizer:
    """Byte-level BPE (a `tokenizers.Tokenizer`) with the <bos>/<eos>/<pad> specials."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        ids = [tokenizer.token_to_id(s) for s in SPECIALS]
        if any(i is None for i in ids):
            raise ValueError(f"BPE tokenizer lacks one of the special tokens {SPECIALS}")
        self.bos_id, self.eos_id, self.pad_id = ids

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        path = directory / _CONFIG_NAME
        path.write_text(json.dumps({"type": "bpe", "file": "tokenizer.json"}))
        return path


Tokenizer = ByteTokenizer | BPETokenizer


def train_bpe(texts: Iterable[str] | Iterator[str], vocab_size: int, min_frequency: int = 2,
              split_digits: bool = True, digit_group: int = 0) -> BPETokenizer:
    """Train a byte-level BPE with `vocab_size` entries (specials included) on an iterator of texts.

    `split_digits`: every digit is a token of its own (as in LLaMA's tokenizer), so a number of n digits is n tokens
    whatever the corpus held; without it a number may be one merged token or an uneven split (" 32684" one token,
    " 89625" four), and a key made of a token the corpus merged is one the model rarely learns to copy. Measured
    2026-12-02 (docs/results.md): with split digits the retrieval curriculum learned nothing beyond its window in
    the steps that the merged BPE needed, so the retrieval recipes train with `split_digits=False`.

    `digit_group` n > 0 (with `split_digits=False`): numbers are cut into runs of at most n digits before the BPE
    learns its merges (a space before a number stays with its first run, as in " 32", "68", "4"), so every
    number token is one of at most ~1.1 x 10^n strings and a random key is made of tokens common among keys.
    Measured 2026-12-02 (docs/results.md): with n=2 the retrieval curriculum learned beyond its window no faster
    than with split digits, so the retrieval recipes keep digit_group=0."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIALS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIALS)} for a byte-level BPE, got {vocab_size}")
    if digit_group < 0 or (digit_group and split_digits):
        raise ValueError(f"digit_group must be 0, or > 0 with split_digits=False; got digit_group={digit_group}, "
                         f"split_digits={split_digits}")
    tok = HFTokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif digit_group:
        from tokenizers import Regex

        runs = pre_tokenizers.Split(Regex(rf" ?[0-9]{{1,{int(digit_group)}}}"), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([runs, byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tok)


def load_tokenizer(spec: str | Path) -> Tokenizer:
    """`"byte"` -> ByteTokenizer; a directory written by `save` (or a `tokenizer.json`) -> that tokenizer."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        cfg = path / _CONFIG_NAME
        if cfg.exists():
            meta = json.loads(cfg.read_text())
            if meta.get("type") == "byte":
                return ByteTokenizer()
            path = path / meta.get("file", "tokenizer.json")
        else:
            path = path / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {spec!s}: expected 'byte', a saved tokenizer dir or tokenizer.json")
    from tokenizers import Tokenizer as HFTokenizer

    return BPETokenizer(HFTokenizer.from_file(str(path)))


def encode_pieces(tokenizer: Tokenizer, pieces: Sequence[str]) -> list[list[int]]:
    """Encode each piece on its own: concatenating the results has an exactly known length."""
    return [tokenizer.encode(p) for p in pieces]
