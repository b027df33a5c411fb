"""Megatron-core indexed datasets (`<prefix>.bin` tokens, `<prefix>.idx` index) written atomically, and
checked before training reads them.

Beside the two files, `<prefix>.meta.json` records the tokenizer that wrote them, the document and token
counts and the .bin's size, so a dataset read with another tokenizer or model vocabulary is refused.
Every document ends with the tokenizer's EOD token. Files are written under temporary names and renamed
into place, .meta.json last: an interrupted write leaves no file under the final names.
"""

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType, IndexedDatasetBuilder

from nsa_dist.config import ConfigError

PREPARE_HINT = "prepare it with `python tools/preprocess_data.py` (or tools/build_code_corpus.py)"


class DatasetError(ConfigError):
    """A dataset file is missing, corrupt or does not match the config; the message names the file."""


@dataclass
class DatasetInfo:
    prefix: str
    documents: int
    tokens: int
    longest_document: int  # tokens, EOD included
    max_token: int
    tokenizer: dict  # ByteTokenizer/HFTokenizer.describe() of the tokenizer that wrote it


def paths(prefix: str | Path) -> tuple[Path, Path, Path]:
    prefix = str(prefix)
    return Path(prefix + ".bin"), Path(prefix + ".idx"), Path(prefix + ".meta.json")


def write_indexed(prefix: str | Path, documents: Iterable[str], tokenizer,
                  advance: Callable[[int], None] = lambda n: None) -> DatasetInfo:
    """Tokenizes each text of `documents` (EOD appended) into `<prefix>.bin/.idx`; `advance(n)` hears of
    each document's size in characters (a progress bar). Empty documents are skipped."""
    bin_path, idx_path, meta_path = paths(prefix)
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = {path: path.with_name(f".{path.name}.tmp-{os.getpid()}") for path in (bin_path, idx_path, meta_path)}
    # one byte per token for the byte-level tokenizer: the default corpus is a third of a billion tokens
    dtype = np.uint8 if tokenizer.vocab_size <= 256 else DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(str(tmp[bin_path]), dtype=dtype)
    documents_written = tokens = longest = max_token = 0
    try:
        for text in documents:
            advance(len(text))
            ids = tokenizer.encode(text)
            if len(ids) == 0:
                continue
            ids = np.append(ids, tokenizer.eod).astype(dtype)
            builder.add_document(ids, [len(ids)])
            documents_written += 1
            tokens += len(ids)
            longest = max(longest, len(ids))
            max_token = max(max_token, int(ids.max()))
        if documents_written == 0:
            raise DatasetError(f"no document with any text was found for {prefix}: check the input files "
                               "(and --json-key for jsonl)")
        builder.finalize(str(tmp[idx_path]))
        info = DatasetInfo(str(prefix), documents_written, tokens, longest, max_token, tokenizer.describe())
        meta = {**info.__dict__, "bin_bytes": tmp[bin_path].stat().st_size}
        tmp[meta_path].write_text(json.dumps(meta, indent=1))
        for path in (tmp[bin_path], tmp[idx_path], tmp[meta_path]):
            with open(path, "rb+") as f:
                os.fsync(f.fileno())
        for final in (bin_path, idx_path, meta_path):  # the .meta.json last: it vouches for the other two
            os.replace(tmp[final], final)
        return info
    finally:
        builder.data_file.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)


def _index_counts(idx_path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """The token dtype, per-sequence lengths and document boundaries of an .idx file; DatasetError when
    it is not one Megatron-core can read."""
    data = idx_path.read_bytes()
    head = len(_INDEX_HEADER) + 8 + 1 + 8 + 8
    if len(data) < head or data[:len(_INDEX_HEADER)] != _INDEX_HEADER:
        raise DatasetError(f"{idx_path} is not a Megatron index file (bad header): it is corrupt or not an "
                           f".idx; delete it and {PREPARE_HINT}")
    version, code, sequences, documents = struct.unpack("<QBQQ", data[len(_INDEX_HEADER):head])
    expected = head + 4 * sequences + 8 * sequences + 8 * documents
    if version != 1 or code not in {d.value for d in DType} or len(data) != expected:
        raise DatasetError(f"{idx_path} is corrupt ({len(data)} bytes where its header promises {expected}, "
                           f"version {version}, dtype code {code}): it was truncated or overwritten; delete "
                           f"it and {PREPARE_HINT}")
    lengths = np.frombuffer(data, dtype=np.int32, count=sequences, offset=head)
    document_indices = np.frombuffer(data, dtype=np.int64, count=documents, offset=head + 12 * sequences)
    return np.dtype(DType.dtype_from_code(code)), lengths, document_indices


def check_indexed(prefix: str | Path, tokenizer=None, vocab_size: int | None = None) -> DatasetInfo:
    """Checks a dataset before it is read: both files present, the index whole, the .bin exactly as long
    as the index says, written by `tokenizer` (when given), with token ids below `vocab_size` (when
    given). Raises DatasetError naming the file, what is wrong and the fix."""
    bin_path, idx_path, meta_path = paths(prefix)
    for path in (idx_path, bin_path):
        if not path.is_file():
            raise DatasetError(f"dataset file {path} does not exist (data.path={str(prefix)!r} names the "
                               f"prefix of <prefix>.bin and <prefix>.idx): fix data.path, or {PREPARE_HINT}")
    dtype, lengths, document_indices = _index_counts(idx_path)
    tokens = int(lengths.sum(dtype=np.int64))
    expected_bin = tokens * dtype.itemsize
    actual_bin = bin_path.stat().st_size
    if actual_bin != expected_bin:
        raise DatasetError(f"{bin_path} has {actual_bin} bytes but {idx_path} describes {tokens} tokens of "
                           f"{dtype.itemsize} bytes ({expected_bin}): the two files do not belong together "
                           f"or the .bin is truncated; delete both and {PREPARE_HINT}")
    if len(lengths) == 0:
        raise DatasetError(f"{idx_path} holds no document: {PREPARE_HINT} from non-empty input")
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{meta_path} is not valid JSON ({exc}): delete the dataset's three files and "
                               f"{PREPARE_HINT}") from exc
        if meta.get("bin_bytes") != actual_bin:
            raise DatasetError(f"{bin_path} has {actual_bin} bytes but {meta_path} recorded "
                               f"{meta.get('bin_bytes')}: the files come from different writes; delete the "
                               f"dataset's three files and {PREPARE_HINT}")
    # a dataset of Megatron's own tools has no .meta.json: its tokenizer and largest id are not known
    written_by = meta.get("tokenizer")
    max_token = meta.get("max_token", -1)
    if tokenizer is not None and written_by is not None and written_by != tokenizer.describe():
        raise DatasetError(f"{prefix} was written by the tokenizer {written_by} and the config's is "
                           f"{tokenizer.describe()}: set data.tokenizer (and data.eod_token) to the one that "
                           "wrote it, or prepare the data again with the config's tokenizer")
    if vocab_size is not None and max_token >= vocab_size:
        raise DatasetError(f"{prefix} holds token id {max_token}, which model.vocab_size={vocab_size} cannot "
                           f"embed: set model.vocab_size to at least {max_token + 1} (the tokenizer's "
                           f"vocabulary is {written_by.get('vocab_size') if written_by else 'unknown'})")
    doc_lengths = np.add.reduceat(lengths.astype(np.int64), document_indices[:-1]) if len(document_indices) > 1 \
        else lengths.astype(np.int64)
    return DatasetInfo(str(prefix), len(document_indices) - 1, tokens, int(doc_lengths.max()), max_token,
                       written_by or {})
