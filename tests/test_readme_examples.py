"""Every ```python block of README.md (and of docs/*.md) runs as written.

Each block is executed on its own, in a fresh namespace, with a temporary
working directory, so a block cannot lean on names from an earlier one and
files it writes land nowhere in the checkout.  A block that is not meant to
run is marked in the Markdown by an HTML comment on the line right before its
fence, ``<!-- no-run: the reason -->``; it is reported as skipped with that
reason.  There are none today.
"""
import glob
import os
import re
import signal
import threading

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# one block may take at most this long (they are meant to run in seconds on a CPU)
BLOCK_TIMEOUT_S = 60

_OPEN = re.compile(r"^(\s*)```python\s*$")
_NO_RUN = re.compile(r"^\s*<!--\s*no-run:\s*(.*?)\s*-->\s*$")


def python_blocks(text: str, path: str = "README.md") -> list:
    """``[(path, first line number, section heading, code, no-run reason or None)]`` for every ```python
    fence in ``text`` (the heading is the last Markdown heading before the block)."""
    lines = text.splitlines()
    blocks = []
    heading = ""
    i = 0
    while i < len(lines):
        m = _OPEN.match(lines[i])
        if not m:
            if lines[i].lstrip().startswith("```"):        # another language's fence: skip its body
                i += 1
                while i < len(lines) and lines[i].strip() != "```":
                    i += 1
            elif lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        indent = len(m.group(1))
        reason = None
        if i > 0:
            skip = _NO_RUN.match(lines[i - 1])
            if skip:
                reason = skip.group(1)
                if not reason:
                    raise ValueError(f"{path}:{i}: a no-run marker needs a reason")
        start = i + 1
        j = start
        while j < len(lines) and lines[j].strip() != "```":
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unterminated ```python block")
        code = "\n".join(line[indent:] if line[:indent].strip() == "" else line.lstrip() for line in lines[start:j])
        blocks.append((path, start + 1, heading, code + "\n", reason))
        i = j + 1
    return blocks


def _documents() -> list:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def _all_blocks() -> list:
    out = []
    for doc in _documents():
        with open(doc, encoding="utf-8") as f:
            out += python_blocks(f.read(), os.path.relpath(doc, ROOT))
    return out


def _block_id(block) -> str:
    path, line, heading = block[:3]
    return f"{path}:{line}:{heading[:50]}"


BLOCKS = _all_blocks()


def _params():
    for block in BLOCKS:
        marks = [pytest.mark.skip(reason=f"marked no-run: {block[4]}")] if block[4] is not None else []
        yield pytest.param(block, id=_block_id(block), marks=marks)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 7, [b[:2] for b in BLOCKS]


class _Timeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise _Timeout(f"the block ran longer than {BLOCK_TIMEOUT_S} s")


@pytest.mark.parametrize("block", list(_params()))
def test_python_block_runs(block, tmp_path, monkeypatch):
    path, line, _, code, _ = block
    monkeypatch.chdir(tmp_path)
    # the file name and a line offset make a traceback point at the Markdown line
    compiled = compile("\n" * (line - 1) + code, os.path.join(ROOT, path), "exec")
    namespace = {"__name__": "__main__"}
    # a time limit where SIGALRM can be used (POSIX, the main thread)
    alarm = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if alarm:
        old = signal.signal(signal.SIGALRM, _on_alarm)
        signal.alarm(BLOCK_TIMEOUT_S)
    try:
        exec(compiled, namespace)
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)


def test_extraction_and_no_run_marker():
    text = "\n".join([
        "# Title",
        "```python",
        "x = 1",
        "```",
        "```bash",
        "# not a heading",
        "```",
        "<!-- no-run: needs a GPU -->",
        "```python",
        "y = 2",
        "```",
        "## Section",
        "  ```python",
        "  z = 3",
        "  ```",
    ])
    blocks = python_blocks(text, "doc.md")
    assert [b[1:] for b in blocks] == [
        (3, "Title", "x = 1\n", None), (10, "Title", "y = 2\n", "needs a GPU"), (14, "Section", "z = 3\n", None)]
    with pytest.raises(ValueError, match="unterminated"):
        python_blocks("```python\nx = 1\n", "doc.md")
    with pytest.raises(ValueError, match="reason"):
        python_blocks("<!-- no-run: -->\n```python\nx = 1\n```\n", "doc.md")
