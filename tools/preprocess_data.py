"""Turns jsonl or text files into a Megatron-core indexed dataset (<prefix>.bin, <prefix>.idx and
<prefix>.meta.json), one document per jsonl line (its --json-key field) or per text file, each ended by
the tokenizer's EOD token.

    python tools/preprocess_data.py --input docs/*.jsonl --output data/mydocs/mydocs
    python tools/preprocess_data.py --input notes/ --output data/notes/notes --tokenizer path/tokenizer.json

Tokenizer: byte-level by default (vocabulary 256, EOD = byte 0), or a local HF tokenizer.json. The
trainer reads the result with `data.source: indexed` and `data.path: <prefix>` (see the README).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402

from nsa_dist.indexed import DatasetError, write_indexed  # noqa: E402
from nsa_dist.tokenizer import TokenizerError, load_tokenizer  # noqa: E402


def input_files(inputs: list[str]) -> list[Path]:
    """The files named, and every file under the directories named, in a stable order."""
    files = []
    for name in inputs:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise DatasetError(f"input {path} does not exist: give jsonl or text files, or directories of them")
    if not files:
        raise DatasetError(f"no input file found in {', '.join(inputs)}")
    return files


def documents(files: list[Path], json_key: str) -> Iterator[str]:
    for path in files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DatasetError(f"{path}:{number} is not valid JSON ({exc.msg}): fix the line, or "
                                           "remove it") from exc
                    if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                        raise DatasetError(f"{path}:{number} has no string field {json_key!r}: pass "
                                           "--json-key with the field that holds the text")
                    yield record[json_key]
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="jsonl or text files, or directories of them")
    parser.add_argument("--output", required=True, help="output prefix: writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json")
    parser.add_argument("--json-key", default="text", help="the field of each jsonl line that holds the text")
    parser.add_argument("--tokenizer", default="", help="a local HF tokenizer.json; default: byte-level")
    parser.add_argument("--eod-token", default="", help="the tokenizer.json's end-of-document token "
                        "(default: the first of <|endoftext|>, </s>, ... that it has)")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
        files = input_files(args.input)
        total = sum(path.stat().st_size for path in files)
        columns = (TextColumn("tokenizing"), BarColumn(), DownloadColumn(), TimeRemainingColumn())
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task("", total=total)
            # characters approximate bytes here: the bar is a guide, the counts below are exact
            info = write_indexed(args.output, documents(files, args.json_key), tokenizer,
                                 advance=lambda n: progress.advance(task, n))
            progress.update(task, completed=total)
    except (DatasetError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.output}.bin/.idx: {info.documents} documents, {info.tokens} tokens "
          f"({tokenizer.kind} tokenizer, vocabulary {tokenizer.vocab_size}, EOD {tokenizer.eod}), longest "
          f"document {info.longest_document} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
