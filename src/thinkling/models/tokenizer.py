"""Character tokenizer for the tiny from-scratch models.

One token per character over a fixed alphabet (newline + printable ASCII), so
every synthetic task, control tag (`[short]`) and forced word (`Wait`) encodes
without training a tokenizer, and a saved model never meets an unknown id.
"""

from __future__ import annotations

from thinkling.errors import ThinklingError

SPECIALS = ("<pad>", "<bos>", "<eos>")
DEFAULT_CHARS = "\n" + "".join(chr(c) for c in range(32, 127))


class CharTokenizer:
    """`<pad>`=0, `<bos>`=1, `<eos>`=2, then one id per character of `chars`."""

    def __init__(self, chars: str = DEFAULT_CHARS):
        if len(set(chars)) != len(chars):
            raise ThinklingError("tokenizer chars: duplicate characters")
        self.chars = chars
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._ids = {c: i + len(SPECIALS) for i, c in enumerate(chars)}

    @property
    def vocab_size(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError:
            pos = next(i for i, c in enumerate(text) if c not in self._ids)
            raise ThinklingError(
                f"tokenizer: cannot encode character {text[pos]!r} at position {pos} "
                "(the character tokenizer knows newline and printable ASCII)"
            ) from None

    def decode(self, ids: list[int]) -> str:
        n = len(SPECIALS)
        try:
            return "".join(self.chars[i - n] for i in ids if i >= n)
        except IndexError:
            bad = next(i for i in ids if i >= self.vocab_size)
            raise ThinklingError(f"tokenizer: id {bad} is outside the vocabulary of {self.vocab_size}") from None

    def to_dict(self) -> dict:
        return {"type": "char", "specials": list(SPECIALS), "chars": self.chars}

    @classmethod
    def from_dict(cls, d: dict) -> CharTokenizer:
        if not isinstance(d, dict) or d.get("type") != "char" or d.get("specials") != list(SPECIALS):
            raise ThinklingError("tokenizer: not a character tokenizer (expected type 'char' with <pad>, <bos>, <eos>)")
        if not isinstance(d.get("chars"), str):
            raise ThinklingError("tokenizer: 'chars' must be a string")
        return cls(d["chars"])
