"""README.md is executable: every shell command in its fenced code blocks runs as written.

The breaking change this catches: a README that no longer matches the tool. A renamed or removed
config group, option or key, console script, CLI flag or make target; a default that does not run
(an objective whose default model does not fit, a default batch a documented launcher refuses, a
sweep whose jobs cannot all start); a documented follow-up command that cannot read what the
command before it wrote (a run's `final/`, a sweep folder); and an error message shown under
"Errors" that is no longer what the command prints.

How: blocks whose language is bash/sh/shell/console, and blocks of `$ command` prompts, are
parsed into commands (one line, backslash continuations joined, `&&` chains kept whole). Each
command runs with `bash -c` exactly as written, in a scratch working directory shared by the
commands of its block (in order, so a later command reads what an earlier one wrote) that looks
like the root of a clone (the repository's top-level entries linked in, so `make ...` and
`.venv/bin/...` resolve). Cost is lowered only by appending arguments through bash functions
defined before the command: `ssltrain`, and `accelerate launch ... -m ssltrain` / `torchrun ...
-m ssltrain`, get two logged steps (CHEAP); the probe and comparison tools get one
seed and two label fractions. Batch sizes, models and data stay the README's. The user's own
files a command names (`~/corpus/*.txt`) are prepared in a scratch HOME. Only commands that need
a GPU, the network, the package registry or that are the suite itself are skipped (SKIP_RULES,
each rule checked to still match a README command). A `$ command` followed by output lines must
print exactly those lines (and exit non-zero when they are an error); every other command must
exit 0.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO
from test_multiprocess import DIST_ENV

README = REPO / "README.md"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
COMMAND_TIMEOUT_S = 900  # the slowest README command (a sweep, then a comparison) takes ~1-2 min here

# Appended to every ssltrain run: two optimizer steps, each logged; the held-out evaluations at
# the start and the end stay. Nothing that changes batch sizes, models or data.
CHEAP = ("trainer.max_steps=2", "trainer.log_every=1")
# One seed and two small label fractions (the full train pool is most of a probe's time).
PROBE_CHEAP = ("--seeds", "0", "--fractions", "0.02,0.1")

# Defined before each command; each function passes the command's own arguments first, so the
# appended ones only lower the cost (Hydra and argparse take the last value of a repeated key).
PRELUDE = f"""
_cheap=({' '.join(CHEAP)})
ssltrain() {{ command ssltrain "$@" "${{_cheap[@]}}"; }}
accelerate() {{
    case " $* " in
        " launch "*" -m ssltrain "*) command accelerate "$@" "${{_cheap[@]}}" ;;
        *) command accelerate "$@" ;;
    esac
}}
torchrun() {{
    case " $* " in
        *" -m ssltrain "*) command torchrun "$@" "${{_cheap[@]}}" ;;
        *) command torchrun "$@" ;;
    esac
}}
ssltrain-probe() {{ command ssltrain-probe "$@" {' '.join(PROBE_CHEAP)}; }}
ssltrain-compare() {{ command ssltrain-compare "$@" {' '.join(PROBE_CHEAP)}; }}
"""

# (name, pattern searched in the command without its comments, why it cannot run here).
SKIP_RULES = [
    ("gpu hardware", r"\bhardware=(gpu|multi_gpu|deepspeed)\b", "needs a GPU"),
    ("fsdp on GPUs", r"\bhardware=fsdp\b(?!.*\bhardware\.device=cpu\b)", "needs a GPU"),
    ("8 processes", r"--(num_processes|nproc_per_node)[ =]8\b", "needs a GPU (8 processes)"),
    ("make bench-gpu", r"\bmake bench-gpu\b", "needs a GPU"),
    ("hub data", r"\bdata=(hf_dataset|hf_image_dataset)\b", "needs network (the HF hub)"),
    ("make install", r"\bmake install\b",
     "needs the package registry and rebuilds the environment the suite runs in"),
    ("make test", r"\bmake test(-fast)?\b", "is the test suite itself"),
]

# Entries of the repository that a scratch "clone" does not link: state, not sources.
NOT_LINKED = {".git", "outputs", "multirun", "runs", ".pytest_cache", ".ruff_cache", "build", "dist"}


def strip_comment(line: str) -> str:
    """The line up to a `#` that starts a bash comment (outside quotes, at the start of a word)."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


@dataclass(frozen=True)
class Command:
    index: int  # position among the README's commands
    block: int  # index of its fenced block in README.md
    heading: str  # the section heading above that block
    text: str  # as written, continuation lines included
    expected: tuple[str, ...] | None = None  # output shown after a `$ ` prompt (None: none shown)

    @property
    def code(self) -> str:
        """The command without comments and continuations, on one line (rules and ids)."""
        lines = [strip_comment(line).removesuffix("\\").strip() for line in self.text.splitlines()]
        return " ".join(line for line in lines if line)

    @property
    def id(self) -> str:
        return f"{self.heading}: {self.code}"

    @property
    def shows_error(self) -> bool:
        return any(re.search(r"\berror\b|^Traceback", line, re.IGNORECASE) for line in self.expected or ())


def _commands(lines: list[str], block: int, heading: str, first: int) -> list[Command]:
    """The commands of one shell block: `$ ` prompt lines with their output, or plain command lines."""
    prompt = any(line.startswith("$ ") for line in lines)
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if prompt and not line.startswith("$ "):
            if commands and line.strip():
                last = commands[-1]
                commands[-1] = Command(last.index, last.block, last.heading, last.text,
                                       (*(last.expected or ()), line.rstrip()))
            i += 1
            continue
        if prompt:
            line = line[2:]
        if not strip_comment(line).strip():  # blank or a comment line
            i += 1
            continue
        text = [line]
        while text[-1].rstrip().endswith("\\") and i + 1 < len(lines):
            i += 1
            text.append(lines[i])
        commands.append(Command(first + len(commands), block, heading, "\n".join(text), () if prompt else None))
        i += 1
    return commands


def readme_commands(text: str) -> list[Command]:
    commands: list[Command] = []
    heading, fence, lang, body, block = "README", None, "", [], 0
    for line in text.splitlines():
        if fence is None:
            opening = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", line)
            if opening:
                fence, lang, body = opening.group(1), opening.group(2).lower(), []
            elif re.match(r"^#{1,6} ", line):
                heading = line.lstrip("#").strip()
            continue
        if line.strip().startswith(fence) and not line.strip().strip(fence[0]):
            is_prompt = any(b.startswith("$ ") for b in body)
            if lang in SHELL_LANGS or (not lang and is_prompt):
                commands.extend(_commands(body, block, heading, len(commands)))
            block += 1
            fence = None
            continue
        body.append(line)
    return commands


COMMANDS = readme_commands(README.read_text(encoding="utf-8"))


def skip_reason(command: Command) -> str | None:
    for _, pattern, reason in SKIP_RULES:
        match = re.search(pattern, command.code)
        if match:
            return f"{reason} ({match.group(0).strip()})"
    return None


def _params():
    for command in COMMANDS:
        reason = skip_reason(command)
        marks = [pytest.mark.skip(reason=reason)] if reason else []
        yield pytest.param(command, id=command.id, marks=marks)


def _write_user_corpus(home: Path) -> None:
    """~/corpus/*.txt as a user would have it: real English text, a few files of many lines."""
    corpus = home / "corpus"
    corpus.mkdir(parents=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse", "textwrap", "difflib", "shutil", "string", "csv", "calendar", "pathlib"):
        source = stdlib / f"{name}.py"
        if source.is_file():
            shutil.copyfile(source, corpus / f"{name}.txt")
    for source in sorted((stdlib / "idlelib").glob("*.txt")):
        shutil.copyfile(source, corpus / f"idlelib-{source.name}")
    assert len(list(corpus.glob("*.txt"))) >= 4, f"too few standard-library texts found in {stdlib}"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


class Blocks:
    """Runs README commands: each block in its own scratch clone, its commands in order."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.results: dict[Command, Result] = {}

    def workdir(self, block: int) -> Path:
        base = self.root / f"block-{block}"
        work = base / "work"
        if not work.exists():
            work.mkdir(parents=True)
            (base / "hf-home").mkdir()
            (base / "tmp").mkdir()
            for entry in REPO.iterdir():
                if entry.name not in NOT_LINKED:
                    (work / entry.name).symlink_to(entry)
        return work

    def run(self, command: Command) -> Result:
        """Run the command, after the runnable commands before it in its block (once each)."""
        for earlier in COMMANDS[:command.index]:
            if earlier.block == command.block and earlier not in self.results and not skip_reason(earlier):
                self._run(earlier)
        if command not in self.results:
            self._run(command)
        return self.results[command]

    def _run(self, command: Command) -> None:
        work = self.workdir(command.block)
        env = {**self.env, "HF_HOME": str(work.parent / "hf-home"), "TMPDIR": str(work.parent / "tmp")}
        start = time.perf_counter()
        proc = subprocess.Popen(["bash", "-c", PRELUDE + command.text], cwd=str(work), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            out, err = proc.communicate(timeout=COMMAND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's workers too
            out, err = proc.communicate()
            err += f"\n[test_readme] killed after {COMMAND_TIMEOUT_S} s"
        self.results[command] = Result(proc.returncode, out, err, time.perf_counter() - start)


@pytest.fixture(scope="module")
def blocks(cache_dir, tmp_path_factory) -> Blocks:
    root = tmp_path_factory.mktemp("readme")
    home = root / "home"
    _write_user_corpus(home)
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        HOME=str(home),
        SSLTRAIN_CACHE=str(cache_dir),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        CUDA_VISIBLE_DEVICES="",
        PYTHONUNBUFFERED="1",
        TORCHINDUCTOR_CACHE_DIR=str(root / "inductor-cache"),  # compiled losses, shared like a user's
    )
    env.pop("VIRTUAL_ENV", None)
    return Blocks(root, env)


def _report(command: Command, result: Result, problem: str) -> str:
    return (f"README command ({command.heading}) {problem}\n$ {command.text}\n"
            f"exit code {result.returncode} after {result.seconds:.0f} s\n"
            f"--- stdout (tail)\n{result.stdout[-3000:]}\n--- stderr (tail)\n{result.stderr[-6000:]}")


@pytest.mark.slow
@pytest.mark.parametrize("command", list(_params()))
def test_readme_command(command: Command, blocks: Blocks):
    result = blocks.run(command)
    if command.expected:
        shown = "\n".join(command.expected).strip()
        printed = "\n".join(part.strip() for part in (result.stderr, result.stdout) if part.strip())
        if printed != shown:
            pytest.fail(_report(command, result, "prints something else than README shows")
                        + f"\n--- README shows\n{shown}\n--- printed\n{printed}", pytrace=False)
        if command.shows_error and result.returncode == 0:
            pytest.fail(_report(command, result, "shows an error but exits 0"), pytrace=False)
        if not command.shows_error and result.returncode != 0:
            pytest.fail(_report(command, result, "failed"), pytrace=False)
    elif result.returncode != 0:
        pytest.fail(_report(command, result, "failed"), pytrace=False)


def test_readme_commands_are_found_and_skip_rules_are_current():
    runnable = [c for c in COMMANDS if not skip_reason(c)]
    assert runnable, "no runnable shell command found in README.md's fenced blocks"
    assert any(c.expected for c in runnable), "no `$ command` with its output found in README.md"
    stale = [name for name, pattern, _ in SKIP_RULES if not any(re.search(pattern, c.code) for c in COMMANDS)]
    assert not stale, f"skip rules that match no README command (remove them): {stale}"


def test_readme_parser():
    text = "\n".join([
        "## Part",
        "```bash",
        "# a comment line",
        "tool a=1 && tool b=2   # chained, one command",
        "tool --x 1 \\",
        "    --y 2",
        "```",
        "```python",
        "print('not shell')",
        "```",
        "```",
        "$ tool bad=1",
        "tool: error: bad",
        "```",
    ])
    commands = readme_commands(text)
    assert [c.code for c in commands] == ["tool a=1 && tool b=2", "tool --x 1 --y 2", "tool bad=1"]
    assert commands[1].text == "tool --x 1 \\\n    --y 2"
    assert commands[0].expected is None and commands[2].expected == ("tool: error: bad",)
    assert commands[2].shows_error and {c.heading for c in commands} == {"Part"}
    assert commands[0].block == 0 and commands[2].block == 2
    assert strip_comment("a data.paths='~/x#y' # c") == "a data.paths='~/x#y'"
