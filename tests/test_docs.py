"""The documentation: every ```python block of README.md and docs/*.md runs, the README stays
short, and docs/backends.md's table names every CNNKERN_* variable that the code reads.

A block is run on the CPU, in a fresh namespace, in this process (the examples pick
``device = "cuda" if torch.cuda.is_available() else "cpu"``, so on a machine without a GPU they run
on the "torch" backend). A block right below an HTML comment ``<!-- no-test: why -->`` is skipped;
fewer than a third of them may be.
"""

from __future__ import annotations

import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

_NO_TEST = re.compile(r"<!--\s*no-test\b")


def _pages() -> list[str]:
    pages = [os.path.join(ROOT, "README.md")]
    pages += sorted(os.path.join(DOCS, f) for f in os.listdir(DOCS) if f.endswith(".md"))
    return pages


def _python_blocks():
    """(page, line, code, skipped) for every ```python block; ``skipped`` when the line right
    above its opening fence is a no-test comment."""
    out = []
    for page in _pages():
        with open(page, encoding="utf-8") as f:
            lines = f.read().splitlines()
        fence = None  # (language, line number, the line above) of the open block
        body: list[str] = []
        for i, line in enumerate(lines):
            if fence is None and line.startswith("```"):
                fence, body = (line[3:].strip(), i + 1, lines[i - 1] if i else ""), []
            elif fence is not None and line.strip() == "```":
                lang, start, above = fence
                if lang == "python":
                    out.append(
                        (os.path.relpath(page, ROOT), start, "\n".join(body) + "\n", bool(_NO_TEST.search(above)))
                    )
                fence = None
            elif fence is not None:
                body.append(line)
        assert fence is None, f"{page}: a code block opened at line {fence[1]} is never closed"
    return out


BLOCKS = _python_blocks()


def test_examples_exist_and_few_are_skipped():
    assert len(BLOCKS) >= 8, [b[:2] for b in BLOCKS]
    skipped = sum(b[3] for b in BLOCKS)
    assert 3 * skipped < len(BLOCKS), f"{skipped} of {len(BLOCKS)} examples are marked no-test"
    assert any(page == "README.md" for page, *_ in BLOCKS), "the README has no tested example"


@pytest.mark.parametrize("page,line,code,skipped", BLOCKS, ids=[f"{p}:{n}" for p, n, *_ in BLOCKS])
def test_example_runs(page, line, code, skipped):
    if skipped:
        pytest.skip(f"{page}:{line} is marked no-test")
    import torch

    import cnnkern

    compiled = compile(code, f"{page}:{line}", "exec")
    with cnnkern.use_backend("auto"), torch.random.fork_rng(), contextlib.redirect_stdout(io.StringIO()):
        torch.manual_seed(0)
        exec(compiled, {"__name__": "__docs__"})


def test_readme_is_short():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        n = len(f.read().splitlines())
    assert n <= 200, f"README.md has {n} lines (at most 200: the details go to docs/)"


def test_readme_keeps_the_ci_quickstart():
    """.ci/run calls `scripts/dev test`, the README's Quickstart command."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    quick = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "scripts/dev test" in quick and "scripts/dev bench" in quick
    launch = text.split("### CPU-side launch work", 1)[1].split("\n## ", 1)[0]
    assert "docs/performance.md#cpu-side-launch-work" in launch and "scripts/dev bench-host" in launch
    assert "## CPU-side launch work" in open(os.path.join(DOCS, "performance.md"), encoding="utf-8").read()


# where the code that reads environment variables lives, and the files that can hold such a read
_CODE_DIRS = ("cnnkern", "kernels", "benchmarks", "scripts", "tests")
_CODE_SUFFIXES = (".py", ".sh", ".c", ".h", ".cpp", ".cu", ".cuh")
_NAME = re.compile(r"\b((?:CNNKERN|CUEMU)_[A-Z0-9_]*[A-Z0-9])\b")


def _code_files():
    yield os.path.join(ROOT, "setup.py")
    yield os.path.join(ROOT, "scripts", "dev")
    for top in _CODE_DIRS:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT, top)):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "results")]
            for f in filenames:
                if f.endswith(_CODE_SUFFIXES) and f != "test_docs.py":
                    yield os.path.join(dirpath, f)


def _env_table_names() -> set[str]:
    text = open(os.path.join(DOCS, "backends.md"), encoding="utf-8").read()
    table = text.split("## Environment variables", 1)[1]
    names = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", row.split("|")[1]))
    return names


def test_every_variable_is_in_the_env_table():
    found: dict[str, str] = {}
    for path in _code_files():
        with open(path, encoding="utf-8", errors="replace") as f:
            for name in _NAME.findall(f.read()):
                found.setdefault(name, os.path.relpath(path, ROOT))
    assert "CNNKERN_BACKEND" in found  # the scan itself works
    missing = {name: where for name, where in found.items() if name not in _env_table_names()}
    assert not missing, f"not in docs/backends.md's environment table: {missing}"
