"""Small indexed datasets the data tests share, written by the project's own tools."""

import importlib.util
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))  # tiny.py, the tiny model


def tool(name: str):
    """A tools/ script as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
    return path


def stdlib_corpus(out: Path, packages=("json", "email", "logging")) -> tuple[str, list[str]]:
    """Python sources of a few stdlib packages, one document per file, and short jsonl documents (so
    sequences hold whole documents too), through tools/preprocess_data.py; returns the prefix and the
    documents' texts in the order written."""
    main = tool("preprocess_data").main
    files = sorted(p for package in packages for p in (STDLIB / package).glob("*.py"))
    short = [f"x{i} = {i} * {i}\n" for i in range(40)]
    jsonl = write_jsonl(Path(f"{out}-short.jsonl"), short)
    assert main(["--input", str(jsonl), *map(str, files), "--output", str(out)]) == 0
    return str(out), short + [f.read_text(encoding="utf-8") for f in files]


def stream(texts: list[str], tokenizer) -> list[np.ndarray]:
    return [np.append(tokenizer.encode(text), tokenizer.eod) for text in texts if len(tokenizer.encode(text))]
