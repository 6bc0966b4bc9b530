"""Every ```python block of README.md and docs/*.md runs, so no example can rot.

The convention, which the docs follow:

* **Collected**: every fenced block of README.md and docs/*.md whose language is
  ``python``. Its test id is ``<file>:<line of the opening fence>``. What is not
  meant to run (signatures, listings, shell commands, output samples, Sentry
  queries) uses another fence: ``text``, ``bash``, ``json`` or a bare one.
  ``test_fences`` refuses ``py``, ``python3``, ``pycon`` and the like, and any
  other fence with a line that looks like Python (``import``, ``def``, ``class``),
  so no example escapes the run.
* **Test modules**: a block that defines a top-level ``test_*`` function is a
  test module. It is written to an empty temp directory, named after a
  ``# test_x.py`` first line when it has one, and run by ``python -m pytest`` in
  a subprocess with ``asyncio_mode = "auto"`` and the project's
  ``filterwarnings`` (``error`` first), with degrade's pytest plugin (so the
  ``fault_proxy`` and ``simulate_outage`` fixtures) loaded as for any user. Every
  test function of the block must pass: a skip or a deselection fails it.
* **Scripts**: any other block is run as ``python -W error <file>`` in a fresh
  subprocess with a timeout, in an empty temp directory. It must exit 0, and
  its stderr must show no unraisable exception ("Exception ignored in"), no
  "Task was destroyed but it is pending" and no unclosed-resource warning.
* **Markers**, as HTML comments on the lines right above the fence (invisible on
  the site):

  - ``<!-- continue -->``: the block continues the previous ``python`` block of
    the same file; that block's source (with its own continuations) is
    prepended. Without the marker every block must be self-contained.
  - ``<!-- env: NAME=value ... -->``: run with these environment variables.

* **Names**: every block (with what it continues) is also checked by ruff for
  syntax errors and undefined names (F821), so code in a function body that the
  run never reaches still cannot refer to something that does not exist.
* **Services**: a block whose source names 127.0.0.1's Postgres (5432), Redis
  (6379) or RabbitMQ (5672) port needs that service: ``require_service``
  skips it locally when the service is missing and fails it in CI. Examples
  use the local services' defaults, unique keys / queues / exchanges /
  tables, and clean up after themselves.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import POSTGRES, RABBITMQ, REDIS, require_service

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Seconds one block may run (the slowest measured takes a few seconds).
BLOCK_TIMEOUT = 60.0

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^\s*<!--\s*(?P<body>.*?)\s*-->\s*$")
_MODULE_NAME = re.compile(r"^#\s*(?P<name>test_\w+\.py)\s*$")
_SERVICES = {
    "PostgreSQL": (re.compile(r"\b5432\b"), POSTGRES),
    "Redis": (re.compile(r"\b6379\b"), REDIS),
    "RabbitMQ": (re.compile(r"\b5672\b"), RABBITMQ),
}
_PYTHON_LINE = re.compile(r"^\s*(import \w|from [\w.]+ import |(async )?def \w+\(|class \w+[(:])")
_BAD_STDERR = ("Exception ignored in", "Task was destroyed but it is pending", "ResourceWarning")


@dataclass
class Fence:
    """One fenced block of a Markdown file."""

    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    source: str
    markers: list[str] = field(default_factory=list)

    @property
    def lang(self) -> str:
        """The language: the info string's first word (``python`` in ``python title="app.py"``)."""
        return self.info.split()[0].lower() if self.info.split() else ""

    @property
    def id(self) -> str:
        shown = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{shown}:{self.line}"


@dataclass
class Block:
    """A ``python`` block ready to run: its own source plus what it continues."""

    fence: Fence
    code: str
    env: dict[str, str]

    @property
    def id(self) -> str:
        return self.fence.id

    @property
    def test_functions(self) -> list[str]:
        tree = ast.parse(self.code)
        return [
            node.name
            for node in tree.body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
        ]

    @property
    def services(self) -> list[tuple[str, tuple[str, int]]]:
        return [
            (name, address) for name, (pattern, address) in _SERVICES.items() if pattern.search(self.code)
        ]


def fences(path: Path) -> list[Fence]:
    """Every fenced block of ``path`` with the marker comments right above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Fence] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            i += 1
            continue
        fence, info, start = match["fence"], match["info"].strip(), i + 1
        markers: list[str] = []
        j = i - 1
        while j >= 0 and (marker := _MARKER.match(lines[j])) is not None:
            markers.insert(0, marker["body"])
            j -= 1
        body: list[str] = []
        i += 1
        while i < len(lines):
            close = lines[i].strip()
            if close.startswith(fence[0]) and set(close) == {fence[0]} and len(close) >= len(fence):
                break
            body.append(lines[i])
            i += 1
        else:
            raise AssertionError(f"{path.name}:{start}: unclosed fence")
        found.append(Fence(path, start, info, "\n".join(body) + "\n", markers))
        i += 1
    return found


def blocks(paths: list[Path]) -> list[Block]:
    """The ``python`` blocks of ``paths``, continuations and environments resolved."""
    result: list[Block] = []
    for path in paths:
        previous: Block | None = None
        for fence in fences(path):
            if fence.lang != "python":
                continue
            code, env = fence.source, {}
            if "continue" in fence.markers:
                if previous is None:
                    raise AssertionError(f"{fence.id}: <!-- continue --> with no python block before it")
                code, env = previous.code + "\n" + fence.source, dict(previous.env)
            for marker in fence.markers:
                if marker.startswith("env:"):
                    for pair in marker.removeprefix("env:").split():
                        name, _, value = pair.partition("=")
                        env[name] = value
            previous = Block(fence, code, env)
            result.append(previous)
    return result


BLOCKS = blocks(DOC_FILES)


#: Starlette 1.x warns about TestClient on httpx (docs/testing.md uses TestClient). The
#: warning is a StarletteDeprecationWarning, a UserWarning, so it is matched by message only.
_TESTCLIENT_NUDGE = "ignore:Using `httpx` with `starlette.testclient` is deprecated"


def _filterwarnings() -> list[str]:
    """The project's pytest ``filterwarnings`` (``error`` first), plus the TestClient nudge."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    filters: list[str] = config["tool"]["pytest"]["ini_options"]["filterwarnings"]
    return [*filters, _TESTCLIENT_NUDGE]


def _env(block: Block) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(block.env)
    return env


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _run(command: list[str], cwd: Path, block: Block) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            command,
            cwd=cwd,
            env=_env(block),
            capture_output=True,
            text=True,
            timeout=BLOCK_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else exc.stderr or ""
        pytest.fail(f"{block.id}: still running after {BLOCK_TIMEOUT} s\n{_tail(out)}\n{_tail(err)}")


def _stem(block: Block) -> str:
    return f"{block.fence.path.stem.lower()}_L{block.fence.line}"


def run_script(block: Block, tmp_path: Path) -> None:
    script = tmp_path / f"doc_{_stem(block)}.py"
    script.write_text(block.code, encoding="utf-8")
    warnings = [arg for f in _filterwarnings() for arg in ("-W", f)]
    done = _run([sys.executable, *warnings, str(script)], tmp_path, block)
    report = (
        f"{block.id} exited {done.returncode}\n"
        f"--- stdout\n{_tail(done.stdout)}\n--- stderr\n{_tail(done.stderr)}"
    )
    assert done.returncode == 0, report
    for bad in _BAD_STDERR:
        assert bad not in done.stderr, report


def run_test_module(block: Block, tmp_path: Path) -> None:
    first = block.fence.source.splitlines()[0] if block.fence.source.strip() else ""
    named = _MODULE_NAME.match(first)
    module = tmp_path / (named["name"] if named else f"test_{_stem(block)}.py")
    module.write_text(block.code, encoding="utf-8")
    ini = [
        "[pytest]",
        "asyncio_mode = auto",
        "asyncio_default_fixture_loop_scope = function",
        "filterwarnings =",
    ]
    ini += [f"    {f}" for f in _filterwarnings()]
    (tmp_path / "pytest.ini").write_text("\n".join(ini) + "\n", encoding="utf-8")
    # Hypothesis' plugin costs about a second of imports per run, and no example uses it.
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "-p",
        "no:hypothesispytest",
        "-q",
        "-rA",
        "--no-header",
        module.name,
    ]
    done = _run(command, tmp_path, block)
    report = f"{block.id}: pytest exited {done.returncode}\n{_tail(done.stdout, 120)}\n{_tail(done.stderr)}"
    assert done.returncode == 0, report
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    outcomes = {word: int(count) for count, word in re.findall(r"\b(\d+) (\w+)", summary)}
    expected = len(block.test_functions)
    assert outcomes == {"passed": expected}, f"expected {expected} passed, got {summary!r}\n{report}"
    for bad in _BAD_STDERR:
        assert bad not in done.stdout + done.stderr, report


def fence_problems(path: Path) -> list[str]:
    """Fences of ``path`` that hold Python but would not run: a wrong fence name, or no name."""
    problems = []
    for fence in fences(path):
        if fence.lang == "python":
            continue
        if fence.lang in {"py", "py3", "python3", "pycon", "pytb", "ipython"}:
            problems.append(f"{fence.id}: use ```python (it runs) or ```text")
        elif fence.lang not in {"bash", "sh", "shell", "console"}:
            code = [line for line in fence.source.splitlines() if _PYTHON_LINE.match(line)]
            if code:
                problems.append(f"{fence.id}: ```{fence.lang} holds Python ({code[0]!r}): make it ```python")
    return problems


def ruff_names(block: Block, tmp_path: Path) -> None:
    source = tmp_path / "names" / f"doc_{_stem(block)}.py"
    source.parent.mkdir()
    source.write_text(block.code, encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ruff",
            "check",
            "--isolated",
            "--no-cache",
            "--select",
            "F821,E9",
            "--output-format",
            "json",
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    problems = json.loads(done.stdout or "[]")
    listed = "\n".join(f"  line {p['location']['row']}: {p['code']} {p['message']}" for p in problems)
    assert not problems, f"{block.id}: ruff finds\n{listed}"


class TestExamples:
    @pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
    def test_runs(self, block: Block, tmp_path: Path) -> None:
        """The block (with what it continues) names only defined things and runs cleanly."""
        ruff_names(block, tmp_path)
        for name, address in block.services:
            require_service(name, *address)
        start = time.monotonic()
        if block.test_functions:
            run_test_module(block, tmp_path)
        else:
            run_script(block, tmp_path)
        print(f"{block.id}: {time.monotonic() - start:.2f} s")


class TestConvention:
    def test_blocks_found(self) -> None:
        """The collection finds the docs' examples (a broken parser cannot pass silently)."""
        assert len(BLOCKS) >= 30
        assert {b.fence.path.name for b in BLOCKS} >= {"README.md", "quickstart.md", "testing.md"}

    @pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
    def test_fences(self, path: Path) -> None:
        """No Python escapes the run: other Python fence names are refused, other fences hold no code."""
        assert not fence_problems(path)

    @pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
    def test_markers_are_known(self, path: Path) -> None:
        """Every marker above a python fence is one this test understands."""
        for fence in fences(path):
            for marker in fence.markers:
                assert marker == "continue" or marker.startswith("env:") or fence.lang != "python", (
                    f"{fence.id}: unknown marker {marker!r}"
                )


def _markdown(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "page.md"
    path.write_text(text, encoding="utf-8")
    return path


class TestHarness:
    """The harness itself: a broken example must fail, whatever way it breaks."""

    def test_markers(self, tmp_path: Path) -> None:
        """``continue`` prepends the block before; ``env:`` sets variables; other fences are skipped."""
        page = _markdown(
            tmp_path,
            "```python\nx = 1\n```\n\n```text\nnot python\n```\n\n"
            "<!-- continue -->\n<!-- env: A=1 B=two -->\n```python\nassert x == 1\n```\n\n"
            "```python\ny = 2\n```\n",
        )
        first, second, third = blocks([page])
        assert (first.id, second.id, third.id) == ("page.md:1", "page.md:11", "page.md:15")
        assert second.code == "x = 1\n\nassert x == 1\n"
        assert second.env == {"A": "1", "B": "two"}
        assert (third.code, third.env) == ("y = 2\n", {})

    def test_python_outside_python_fences(self, tmp_path: Path) -> None:
        """Python in a ``py`` or a bare fence is reported; shell commands and output are not."""
        page = _markdown(
            tmp_path,
            "```py\nx = 1\n```\n\n```\nfrom degrade import Registry\n```\n\n"
            "```text\nHTTP/1.1 503 Service Unavailable\n```\n\n```bash\nimport foo\n```\n",
        )
        problems = fence_problems(page)
        assert [p.split(":")[1] for p in problems] == ["1", "5"]

    def test_continue_needs_a_block_before(self, tmp_path: Path) -> None:
        """A ``continue`` marker on the first python block is an error, not an empty prefix."""
        page = _markdown(tmp_path, "<!-- continue -->\n```python\nx = 1\n```\n")
        with pytest.raises(AssertionError, match="no python block before it"):
            blocks([page])

    def test_undefined_name_fails(self, tmp_path: Path) -> None:
        """A name used only in a function body that never runs is still caught."""
        (block,) = blocks([_markdown(tmp_path, "```python\ndef f():\n    return missing\n```\n")])
        with pytest.raises(AssertionError, match="F821 Undefined name `missing`"):
            ruff_names(block, tmp_path)

    @pytest.mark.parametrize(
        "code",
        [
            "raise SystemExit(1)",
            "import socket\ns = socket.socket()\ndel s",  # an unclosed socket: ResourceWarning
        ],
        ids=["exit-status", "unclosed-socket"],
    )
    def test_bad_script_fails(self, tmp_path: Path, code: str) -> None:
        """A script that exits non-zero or leaks a resource fails its test."""
        (block,) = blocks([_markdown(tmp_path, f"```python\n{code}\n```\n")])
        with pytest.raises(AssertionError):
            run_script(block, tmp_path)

    def test_skipped_test_module_fails(self, tmp_path: Path) -> None:
        """A test module whose test is skipped does not pass: every test must run and pass."""
        code = "import pytest\n\ndef test_a():\n    pass\n\ndef test_b():\n    pytest.skip('no service')\n"
        (block,) = blocks([_markdown(tmp_path, f"```python\n{code}```\n")])
        assert block.test_functions == ["test_a", "test_b"]
        with pytest.raises(AssertionError, match="expected 2 passed"):
            run_test_module(block, tmp_path)
