"""A real English corpus that is always present: the docstrings of the installed Python standard library.

Used by the offline main job, the benchmarks and the tests. Docstrings are read with `ast` from the source
files (no module is imported, so nothing runs), in a fixed order, so the corpus is reproducible.
"""

from __future__ import annotations

import ast
import os
import sysconfig
from pathlib import Path
from typing import Iterator, Optional

SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("."))
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    return files


def _docstrings(path: Path) -> Iterator[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:
                yield doc.strip()


def stdlib_docstrings(max_chars: Optional[int] = None, part: str = "all") -> str:
    """Docstrings of the standard library, one paragraph per docstring.

    `part` is `"train"` (9 of every 10 source files), `"validation"` (the 10th) or `"all"`; `max_chars`
    caps the length.
    """
    chunks, size = [], 0
    for index, path in enumerate(_stdlib_files()):
        if (part == "train" and index % 10 == 9) or (part == "validation" and index % 10 != 9):
            continue
        for doc in _docstrings(path):
            chunks.append(doc)
            size += len(doc) + 2
            if max_chars is not None and size >= max_chars:
                return "\n\n".join(chunks)[:max_chars]
    return "\n\n".join(chunks)


def write_stdlib_corpus(directory: str, max_train_chars: Optional[int] = None,
                        max_validation_chars: Optional[int] = None) -> tuple[str, str]:
    """Write `train.txt` and `validation.txt` from the standard library's docstrings; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for part, cap in (("train", max_train_chars), ("validation", max_validation_chars)):
        path = os.path.join(directory, f"{part}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(stdlib_docstrings(cap, part))
        paths.append(path)
    return paths[0], paths[1]


def train_tokenizer(files: list[str], vocab_size: int = 2048, model_max_length: int = 1024):
    """A byte-level BPE tokenizer (GPT-2 style) trained on local text files; no download needed.

    Returns a `PreTrainedTokenizerFast` with `<|endoftext|>` as bos/eos/pad token.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train(files=list(files), vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>"],
              show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=model_max_length)
