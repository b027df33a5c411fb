"""Builds the offline default corpus: the Python sources of the standard library and of the installed
packages, one long document per package (its .py files in path order, each headed by its path), in the
spirit of LongBench's repository-level code tasks. Nothing is downloaded.

    python tools/build_code_corpus.py                      # writes data/code/code.{bin,idx,meta.json}
    python tools/build_code_corpus.py --tokenizer path/tokenizer.json --output data/code-hf/code

Prints the corpus size in documents and tokens. Train on it with `data.source: indexed` and
`data.path: data/code/code` (configs/code.yaml).
"""

import argparse
import site
import sys
import sysconfig
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn  # noqa: E402

from nsa_dist.indexed import DatasetError, write_indexed  # noqa: E402
from nsa_dist.tokenizer import TokenizerError, load_tokenizer  # noqa: E402

SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}


def package_roots() -> list[Path]:
    """The standard library's directory, then every site-packages directory, each once."""
    roots = [Path(sysconfig.get_paths()["stdlib"])] + [Path(p) for p in site.getsitepackages()]
    seen, unique = set(), []
    for root in roots:
        if root.is_dir() and root.resolve() not in seen:
            seen.add(root.resolve())
            unique.append(root)
    return unique


def python_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path] if path.suffix == ".py" else []
    files = []
    for file in sorted(path.rglob("*.py")):
        if not SKIP_DIRS.intersection(file.relative_to(path).parts[:-1]) and file.is_file():
            files.append(file)
    return files


def packages(roots: list[Path]) -> list[tuple[str, Path, list[Path]]]:
    """(name, root, files) per top-level package or module of each root that has Python sources."""
    found = []
    for root in roots:
        for entry in sorted(root.iterdir()):
            if entry.name in SKIP_DIRS or entry.name.startswith(".") or entry.name.endswith(".dist-info"):
                continue
            files = python_files(entry)
            if files:
                found.append((entry.name, root, files))
    return found


def document(root: Path, files: list[Path]) -> str:
    parts = []
    for file in files:
        try:
            source = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test fixtures are deliberately not UTF-8
        parts.append(f"# file: {file.relative_to(root)}\n{source}")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="data/code/code", help="output prefix (default data/code/code)")
    parser.add_argument("--tokenizer", default="", help="a local HF tokenizer.json; default: byte-level")
    parser.add_argument("--eod-token", default="", help="the tokenizer.json's end-of-document token")
    args = parser.parse_args(argv)
    try:
        tokenizer = load_tokenizer(args.tokenizer, args.eod_token)
        found = packages(package_roots())
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
        with Progress(*columns) as progress:
            task = progress.add_task("packages", total=len(found))

            def texts() -> Iterator[str]:
                for name, root, files in found:
                    progress.update(task, description=f"{name[:24]:24s}")
                    yield document(root, files)
                    progress.advance(task)

            info = write_indexed(args.output, texts(), tokenizer)
    except (DatasetError, TokenizerError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"code corpus {args.output}: {info.documents} documents (packages), {info.tokens:,} tokens "
          f"({tokenizer.kind} tokenizer), longest document {info.longest_document:,} tokens")
    return 0


if __name__ == "__main__":
    sys.exit(main())
