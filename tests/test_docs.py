"""Every `scalegpt ...` command line that README.md and docs/ show still works, so the docs cannot drift
from the code.

Each command line in a fenced code block is parsed by the real CLI parser; a config it names is loaded
with its overrides through the real loader; `train` and `launch` lines run their --dry-run path, and
`plan` runs (it is arithmetic). Commands that read a run, checkpoint, export or model folder (sample,
eval, export, plot, inspect of a run) cannot run without one: they are parsed, and the path must have
one of the shapes the docs promise. All of it runs in this process, in a few seconds, so it belongs to
the fast tier. A failure names the file, the line and the reason.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import scalegpt.launch.cli as cli
from scalegpt.train.config.loading import load_config
from scalegpt.train.errors import UserError

from conftest import CONFIGS, ROOT

README_MAX_LINES = 250
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("**/*.md"))]

# Sub-commands whose positional argument is trained weights, not a config.
WEIGHT_COMMANDS = {"sample", "eval", "export", "plot"}
# The folders the docs use for weights: runs (run.dir), exports, and downloaded Hugging Face models.
RUN_PATH = re.compile(r"runs/(?P<run>[\w.-]+)(/L\d+-d\d+)?(/checkpoints/step_\d{6})?")
OTHER_WEIGHTS = re.compile(r"(exports|models)/[\w.-]+")
# An argument in capitals (CONFIG, RUN_DIR, KEY=V1,V2) or `...` is a placeholder: a code block shows a
# command to copy, not a synopsis.
PLACEHOLDER = re.compile(r"[A-Z][A-Z0-9_]{2,}(=.*)?|.*\.\.\..*")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=\S*")


@dataclass(frozen=True)
class Command:
    """One `scalegpt` command line of a doc: where it is, and its arguments after `scalegpt`."""

    file: Path
    line: int
    text: str

    @property
    def where(self) -> str:
        return f"{self.file.relative_to(ROOT)}:{self.line}: {self.text}"


def _command_text(raw: str) -> str | None:
    """The command of a code-block line, without a shell prompt, a venv path or leading VAR=value."""
    text = raw.strip()
    text = text.removeprefix("$ ").removeprefix(".venv/bin/")
    words = text.split(" ")
    while words and ENV_ASSIGNMENT.fullmatch(words[0]) and not words[0].startswith("scalegpt"):
        words.pop(0)
    text = " ".join(words).removeprefix(".venv/bin/")
    return text if text.startswith("scalegpt ") else None


def commands_in(path: Path) -> list[Command]:
    """Every `scalegpt ...` line inside the fenced code blocks of one Markdown file."""
    found: list[Command] = []
    fence: str | None = None
    pending: tuple[int, str] | None = None  # a line continued with a backslash
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        stripped = raw.strip()
        if fence is None:
            if stripped.startswith("```") or stripped.startswith("~~~"):
                fence = stripped[:3]
            continue
        if stripped.startswith(fence):
            fence = None
            continue
        if pending is not None:
            start, text = pending
            text = f"{text} {stripped.removesuffix(chr(92)).strip()}"
            pending = (start, text) if stripped.endswith("\\") else None
            if pending is None:
                found.append(Command(path, start, text))
            continue
        text = _command_text(raw)
        if text is None:
            continue
        if text.endswith("\\"):
            pending = (number, text.removesuffix("\\").strip())
        else:
            found.append(Command(path, number, text))
    return found


ALL_COMMANDS = [c for doc in DOCS for c in commands_in(doc)]


def _parse(argv: list[str]) -> object:
    """The CLI's own parse, as `main` does it: key=value overrides may also follow the options."""
    parser = cli.build_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if unknown:
        raise UserError(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def _packaged_run_dirs() -> set[str]:
    """run.dir of every packaged run config: the run directories the docs may sample, plot or export."""
    return {str(load_config(p).run.dir) for p in sorted(CONFIGS.glob("*.yaml"))}


@pytest.fixture
def user_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory to run from, holding what the docs tell the user to make first: a hostfile, GPT-2's
    folder (only its config.json, all that loading reads), and the shakespeare.yaml and curated.yaml of
    docs/data.md."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "hosts").write_text("worker-0 slots=8\nworker-1 slots=8\n")
    template = Path(cli.__file__).parent / "templates" / "hostfile"
    (tmp_path / "launch" / "templates").mkdir(parents=True)
    shutil.copy(template, tmp_path / "launch" / "templates" / "hostfile")
    (tmp_path / "models" / "gpt2").mkdir(parents=True)
    (tmp_path / "models" / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "shakespeare.yaml").write_text("defaults:\n  model: nano\n  data: shakespeare\n")
    (tmp_path / "curated.yaml").write_text("defaults:\n  model: nano\n  data: curated-mix\n")
    return tmp_path


def _check(command: Command, run_dirs: set[str], capsys: pytest.CaptureFixture[str]) -> str | None:
    """None when the command line works as documented, else the reason it does not."""
    try:
        argv = shlex.split(command.text, comments=True)[1:]
    except ValueError as exc:
        return f"not a shell line: {exc}"
    if any(PLACEHOLDER.fullmatch(arg) for arg in argv):
        return "a placeholder (an argument in capitals, or `...`) in a code block: show a command that runs"
    try:
        args = _parse(argv)
    except (UserError, SystemExit) as exc:
        return f"the parser refuses it: {exc}"
    name = args.command
    try:
        if name in WEIGHT_COMMANDS or (name == "inspect" and args.config.startswith("runs/")):
            path = args.run_dir if name == "plot" else getattr(args, "path", None) or args.config
            return _check_weights_path(path, run_dirs) or (_check_out_dir(args.out_dir) if name == "export" else None)
        if name in ("train", "launch"):
            return _run_main([*argv, "--dry-run"] if "--dry-run" not in argv else argv, capsys)
        if name == "plan":
            return _run_main(argv, capsys)
        load_config(args.config, args.overrides)
    except UserError as exc:
        return f"the config does not validate: {exc}"
    return None


def _run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str | None:
    code = cli.main(argv)
    err = capsys.readouterr().err.strip()
    return None if code == 0 else f"`scalegpt {shlex.join(argv)}` exits {code}: {err}"


def _check_weights_path(path: str, run_dirs: set[str]) -> str | None:
    run = RUN_PATH.fullmatch(path)
    if run is not None:
        run_dir = f"runs/{run.group('run')}"
        if run_dir in run_dirs:
            return None
        return f"{run_dir} is no packaged config's run.dir ({', '.join(sorted(run_dirs))})"
    if OTHER_WEIGHTS.fullmatch(path):
        return None
    return f"{path} is not a documented weights path (runs/NAME[/checkpoints/step_NNNNNN], exports/NAME, models/NAME)"


def _check_out_dir(path: str) -> str | None:
    return None if OTHER_WEIGHTS.fullmatch(path) else f"export writes to {path}; the docs write to exports/ or models/"


def test_the_docs_show_commands_to_check() -> None:
    per_file = {doc.name: sum(c.file == doc for c in ALL_COMMANDS) for doc in DOCS}
    assert per_file["README.md"] >= 4, per_file  # the four jobs
    assert len(DOCS) > 1, "docs/ has no pages"


def test_every_documented_command_line_parses_and_validates(user_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dirs = _packaged_run_dirs()
    failures = []
    for command in ALL_COMMANDS:
        reason = _check(command, run_dirs, capsys)
        if reason is not None:
            failures.append(f"{command.where}\n    {reason}")
    if failures:
        pytest.fail(f"{len(failures)} documented command line(s) fail:\n" + "\n".join(failures), pytrace=False)
    assert not (user_dir / "runs").exists(), "a dry run wrote a run directory"


def test_the_extractor_finds_prompts_venv_paths_continuations_and_environment(tmp_path: Path) -> None:
    doc = tmp_path / "page.md"
    doc.write_text(
        "`scalegpt train inline` is prose.\n"
        "```bash\n"
        "$ scalegpt prepare smoke\n"
        ".venv/bin/scalegpt train smoke --dry-run   # a comment\n"
        "SCALEGPT_DATA_ROOT=../shared/data scalegpt prepare smoke\n"
        "scalegpt launch smoke \\\n"
        "  --procs 2\n"
        "echo scalegpt is not first here\n"
        "```\n"
    )
    found = [(c.line, c.text) for c in commands_in(doc)]
    assert found == [
        (3, "scalegpt prepare smoke"),
        (4, "scalegpt train smoke --dry-run   # a comment"),
        (5, "scalegpt prepare smoke"),
        (6, "scalegpt launch smoke --procs 2"),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("scalegpt train smoke --no-such-option", "the parser refuses it: unrecognized arguments: --no-such-option"),
        ("scalegpt train smoke model.no_such_key=1", "exits 2: scalegpt: error: model.no_such_key in the command line"),
        ("scalegpt prepare smoke train.max_steps=many", "the config does not validate: train.max_steps"),
        ("scalegpt plot runs/smoke/extra", "runs/smoke/extra is not a documented weights path"),
        ("scalegpt prepare CONFIG", "a placeholder"),
        ("scalegpt sample runs/smok --prompt hi", "runs/smok is no packaged config's run.dir"),
        ("scalegpt export runs/smoke --format hf /tmp/x", "export writes to /tmp/x"),
        ("scalegpt launch smoke --hostfile missing-hosts", "exits 2: scalegpt: error:"),
    ],
)
def test_a_broken_command_line_fails_with_its_reason(
    line: str, reason: str, user_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    command = Command(user_dir / "page.md", 7, line)
    found = _check(command, {"runs/smoke"}, capsys)
    assert found is not None and reason in found, found


def test_the_readme_is_a_front_door_of_at_most_250_lines() -> None:
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail to a page of docs/"
