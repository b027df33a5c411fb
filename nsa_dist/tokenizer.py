"""Tokenizers that need no download: byte-level by default, or any local HF `tokenizer.json`.

Byte-level: a token is one UTF-8 byte (vocabulary 256), and the end-of-document token (EOD) is byte 0
(NUL), which text and source code do not contain: NUL bytes in the input are dropped when encoding, so
EOD marks document ends only. This keeps the vocabulary at 256, the quickstart model's.
"""

import hashlib
from pathlib import Path

import numpy as np

from nsa_dist.config import ConfigError

# special tokens tried in this order as the EOD of a tokenizer.json when none is named
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")


class TokenizerError(ConfigError):
    """A tokenizer file is missing or does not parse; the message names the file and the fix."""


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 256
    eod = 0

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8").replace(b"\0", b""), dtype=np.uint8).astype(np.int32)

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 < int(i) < 256).decode("utf-8", errors="replace")

    def describe(self) -> dict:
        """What a dataset records of the tokenizer that wrote it, to refuse another one later."""
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod": self.eod}


class HFTokenizer:
    """A local HF `tokenizer.json` through the `tokenizers` package; EOD is `eod_token`, or the first of
    EOD_CANDIDATES that the vocabulary has."""

    kind = "tokenizer.json"

    def __init__(self, path: str | Path, eod_token: str = ""):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise TokenizerError(f"tokenizer file {self.path} does not exist: give the path of a local HF "
                                 "tokenizer.json, or leave the tokenizer empty for the byte-level default")
        try:
            self._tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as exc:  # tokenizers raises a bare Exception with serde's message
            raise TokenizerError(f"tokenizer file {self.path} does not parse as an HF tokenizer.json "
                                 f"({' '.join(str(exc).split())[:200]}): give a tokenizer.json saved by the "
                                 "`tokenizers` or `transformers` package, or leave the tokenizer empty for "
                                 "the byte-level default") from exc
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        candidates = (eod_token,) if eod_token else EOD_CANDIDATES
        ids = [self._tokenizer.token_to_id(token) for token in candidates]
        found = [(token, i) for token, i in zip(candidates, ids) if i is not None]
        if not found:
            raise TokenizerError(f"tokenizer file {self.path} has no end-of-document token "
                                 f"{' or '.join(map(repr, candidates))}: name one of its special tokens as "
                                 "the EOD (data.eod_token, or --eod-token for the tools)")
        self.eod_token, self.eod = found[0]
        self.sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def describe(self) -> dict:
        return {"kind": self.kind, "vocab_size": self.vocab_size, "eod": self.eod, "sha256": self.sha256}


def load_tokenizer(path: str | Path = "", eod_token: str = "") -> ByteTokenizer | HFTokenizer:
    """The byte-level tokenizer when `path` is empty, else the tokenizer.json at `path`."""
    return HFTokenizer(path, eod_token) if str(path) else ByteTokenizer()


class MegatronTokenizerAdapter:
    """What Megatron-core's GPTDataset reads of a tokenizer: vocab_size, eod, and identifiers for its
    index cache (a dataset built with another tokenizer gets other cache files)."""

    def __init__(self, tokenizer: ByteTokenizer | HFTokenizer):
        self.vocab_size = tokenizer.vocab_size
        self.eod = tokenizer.eod
        self.unique_identifiers = tokenizer.describe()
