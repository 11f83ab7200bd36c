"""The README's code blocks, as the README test runs them.

Conventions (stated in the README test's docstring too):

* A fenced block in ``console``, ``bash``, ``sh`` or ``python`` is **run**, in
  the document's order, unless the line before it (blank lines aside) is
  ``<!-- not run: why -->``; a skip without a reason is an error.
* ``console`` blocks are shell sessions: ``$ command`` lines (a trailing ``\\``
  continues a command), each followed by lines its output must contain, in
  order, where ``…`` stands for anything and runs of spaces match any spacing.
  ``[exit N]`` among them says the command must exit with N (else 0). The
  commands of one block share a shell (variables carry over); each block
  starts a fresh one.
* ``bash``/``sh`` blocks are one script that must exit 0.
* A ``python`` block may be followed by a ``text`` block: what it must print,
  matched the same way.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

RUN = {"console", "bash", "sh", "python"}
_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_SKIP = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
_EXIT = re.compile(r"^\[exit (\d+)\]$")


@dataclass
class Command:
    text: str
    expected: list[str] = field(default_factory=list)
    exit_code: int = 0


@dataclass
class Block:
    lang: str
    text: str
    line: int  # 1-based line of the opening fence
    skip: str | None = None  # why it is not run
    expected: list[str] = field(default_factory=list)  # python: the text block after it

    @property
    def runs(self) -> bool:
        return self.lang in RUN and self.skip is None

    def commands(self) -> list[Command]:
        """The ``$`` commands of a console block with what each must print."""
        commands: list[Command] = []
        pending = ""
        for raw in self.text.splitlines():
            if pending:
                pending += "\n" + raw
                if not raw.endswith("\\"):
                    commands.append(Command(pending))
                    pending = ""
                continue
            if raw.startswith("$ "):
                command = raw[2:]
                if command.endswith("\\"):
                    pending = command
                else:
                    commands.append(Command(command))
            elif raw.strip():
                if not commands:
                    raise ValueError(f"README line {self.line}: output before the first $ command")
                exit_code = _EXIT.match(raw.strip())
                if exit_code:
                    commands[-1].exit_code = int(exit_code.group(1))
                else:
                    commands[-1].expected.append(raw)
        if pending:
            raise ValueError(f"README line {self.line}: a command ends with a continuation backslash")
        return commands


def read_blocks(path: Path) -> list[Block]:
    """Every fenced block of ``path`` with its skip reason and, for python blocks, the output block after it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    i = 0
    last_text_line = ""  # the last non-blank line outside a block
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            if lines[i].strip():
                last_text_line = lines[i].strip()
            i += 1
            continue
        indent, lang = fence.group(1), fence.group(2)
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i >= len(lines):
            raise ValueError(f"{path.name} line {start + 1}: a code block is never closed")
        skip = _SKIP.match(last_text_line)
        if last_text_line.startswith("<!-- not run") and not skip:
            raise ValueError(f"{path.name} line {start + 1}: write the skip as <!-- not run: why -->")
        reason = skip.group(1).strip() if skip else None
        if skip and not reason:
            raise ValueError(f"{path.name} line {start + 1}: a block that is not run must say why")
        block = Block(lang, "\n".join(body), start + 1, reason)
        previous = blocks[-1] if blocks else None
        if lang == "text" and previous is not None and previous.lang == "python" and last_text_line == "```":
            previous.expected = [line for line in block.text.splitlines() if line.strip()]
        blocks.append(block)
        last_text_line = "```"
        i += 1
    return blocks


def _pattern(expected: str) -> re.Pattern[str]:
    parts = [re.escape(" ".join(part.split())) for part in expected.strip().split("…")]
    return re.compile(".*".join(parts))


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def missing_lines(expected: list[str], output: str) -> list[str]:
    """The expected lines not found in ``output``, in order (``…`` is anything, spacing is loose, colours ignored)."""
    out = [" ".join(_ANSI.sub("", line).split()) for line in output.splitlines()]
    at = 0
    missing: list[str] = []
    for line in expected:
        pattern = _pattern(line)
        for j in range(at, len(out)):
            if pattern.search(out[j]):
                at = j + 1
                break
        else:
            missing.append(line)
    return missing
