"""The policy tool (``tools/policy_check.py``): what it flags, what it leaves alone, which files it reads.

spellxfer-check: allow-file. This file writes forbidden examples on purpose, so the tool skips it
whole; the file-wide marker is honoured under tests/ only (see the marker's tests below).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from policy_check import ALLOW_FILE_MARKER, ALLOW_MARKER, check, scan, scan_text

from spellxfer.core.errors import SpellxferError

TOOL = REPO / "tools" / "policy_check.py"
ET = "enable_thinking"
TH = "thinking"
SOFT = "/think"
SP = "spelling"

# A small project whose every line is allowed, including the look-alikes the rules must not flag.
CLEAN_FILES = {
    "spellxfer/generate.py": """\
def render(tok, msgs):
    # Qwen3 stays in non-thinking mode.
    return tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)


def reject_thinking(body: dict) -> None:
    # A server reads the flag only to refuse it.
    if body.get("chat_template_kwargs", {}).get("enable_thinking"):
        raise ValueError("thinking is not served")


def strip(reply: str) -> str:
    return reply.split("</think>")[-1]


def set_template(tok):
    tok.chat_template = NON_THINKING_TEMPLATE
""",
    "configs/eval.yaml": """\
model: Qwen/Qwen3-4B
enable_thinking: false  # non-thinking mode only
task: spelling
subtasks: [spell_forward, spell_reversed]
metrics: [position_acc, count_acc]
""",
    "configs/serve.json": '{"chat_template_kwargs": {"enable_thinking": false}}\n',
    "docs/evaluation.md": """\
# Evaluation

We train on spelling but never report spelling accuracy; only position and count accuracy.
The `/thinking_budget` endpoint does not exist. Prompts may end in `/no_think`.
""",
    "prompts/qwen3.jinja": """\
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}
{%- endif %}
""",
}


@pytest.fixture
def project(tmp_path: Path) -> Path:
    for rel, text in CLEAN_FILES.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def plant(root: Path, rel: str, line: str) -> int:
    """Append ``line`` to ``rel`` (creating it); return its 1-based line number."""
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    before = p.read_text() if p.exists() else ""
    p.write_text(before + line + "\n")
    return before.count("\n") + 1


def found(root: Path, paths=None) -> list[tuple[str, int, str]]:
    return [(v.path, v.line, v.rule) for v in scan(root, paths)]


def test_clean_project_has_no_violations(project):
    assert scan(project) == []


@pytest.mark.parametrize(
    ("rel", "line", "rule"),
    [
        ("spellxfer/generate.py", f"out = tok.apply_chat_template(msgs, {ET}=True)", "thinking-on"),
        ("configs/eval.yaml", f"{ET}: true", "thinking-on"),
        ("configs/request.json", f'{{"chat_template_kwargs": {{"{ET}": true}}}}', "thinking-on"),
        ("spellxfer/generate.py", f"out = tok.apply_chat_template(msgs, {ET}=use_think)", "thinking-on"),
        ("spellxfer/generate.py", f"kwargs = {{'{ET}': not args.fast}}", "thinking-on"),
        ("spellxfer/serve.py", f'think = body.get("{ET}", True)', "thinking-on"),
        ("spellxfer/generate.py", f"def render(tok, msgs, {ET}: bool):", "thinking-on"),
        (
            "spellxfer/prompts.py",
            f'PROMPT = "How many r letters are in {{word}}? {SOFT}"',
            "thinking-soft-switch",
        ),
        ("spellxfer/generate.py", f"out = tok.apply_chat_template(msgs, {TH}=True)", "thinking-template"),
        ("prompts/qwen3.jinja", f"{{%- if {ET} | default(true) %}}", "thinking-template"),
        (
            "spellxfer/generate.py",
            f"tok.chat_template = Path('qwen3_{TH}.jinja').read_text()",
            "thinking-template",
        ),
        ("configs/eval.yaml", f"base_model: Qwen/Qwen3-4B-{TH.title()}-2507", "thinking-model"),
        ("spellxfer/module.py", f'        self.log("val/{SP}_accuracy", acc)', "spelling-metric"),
        ("configs/eval.yaml", f"{SP}_acc: 0.93", "spelling-metric"),
        ("docs/results.md", f"| model | {SP}_accuracy | count_acc |", "spelling-metric"),
        ("results.json", f'{{"test/{SP}_exact_match": 0.5}}', "spelling-metric"),
        ("spellxfer/metrics.py", f"class {SP.title()}Accuracy(Metric):", "spelling-metric"),
    ],
)
def test_each_planted_violation_is_reported_at_its_file_line_and_rule(project, rel, line, rule):
    n = plant(project, rel, line)
    assert found(project) == [(rel, n, rule)]
    (v,) = scan(project)
    assert v.text == line.strip()
    assert str(v).startswith(f"{rel}:{n}: [{rule}] ")


@pytest.mark.parametrize(
    "line",
    [
        f"x = f(msgs, {ET}=False or force)",  # not a literal: `force` can turn it on
        f"x = f(msgs, {ET}=False if safe else True)",
        f'kwargs["{ET}"] = True',
    ],
)
def test_expressions_that_start_with_false_are_not_literals(line):
    assert [v.rule for v in scan_text(line)] == ["thinking-on"]


@pytest.mark.parametrize(
    ("line", "suffix"),
    [
        (f"    {ET}: bool = False,", ".py"),  # a parameter defaulting to off
        (f"if cfg.{ET}:", ".py"),  # a read
        (f"if {ET} == True:", ".py"),  # a comparison
        (f"{ET}:", ".yaml"),  # a mapping opener, nothing set on this line
        (f"{{%- set {ET} = false %}}", ".jinja"),
        (f"{{%- if {ET} is defined and {ET} is false %}}", ".jinja"),
        ("'<\\/think>'", ".json"),  # JSON-escaped closing tag
        ("see docs/think.md", ".md"),
        (f"count_acc_after_{SP}_ft: 0.4", ".yaml"),  # a transfer metric of the spelling-tuned model
        (f"n_{SP}_tokens: 12", ".yaml"),
    ],
)
def test_look_alikes_are_allowed(line, suffix):
    assert scan_text(line, suffix=suffix) == []


def test_allow_marker_skips_only_its_own_line(project):
    plant(project, "docs/policy.md", f"Never write `{ET}=True`. <!-- {ALLOW_MARKER} -->")
    assert scan(project) == []
    n = plant(project, "docs/policy.md", f"Never write `{ET}=True`.")
    assert found(project) == [("docs/policy.md", n, "thinking-on")]


def test_several_rules_on_one_line_are_each_reported_once(project):
    n = plant(project, "spellxfer/bad.py", f'f({ET}=True, prompt="q {SOFT}", key="{SP}_em")')
    assert found(project) == [
        ("spellxfer/bad.py", n, "thinking-on"),
        ("spellxfer/bad.py", n, "thinking-soft-switch"),
        ("spellxfer/bad.py", n, "spelling-metric"),
    ]


def test_walk_skips_data_files_envs_and_run_outputs_but_reads_ci_scripts(project):
    bad = f"{ET}: true"
    plant(project, "data/train.jsonl", bad)  # training data, not code
    plant(project, ".venv/lib/site.py", bad)
    plant(project, "results/run1/summary.yaml", bad)
    plant(project, "spellxfer/__pycache__/notes.txt", bad)
    assert scan(project) == []
    n = plant(project, ".ci/gpu-smoke", f"python -m spellxfer evaluate --{ET}=true")
    assert found(project) == [(".ci/gpu-smoke", n, "thinking-on")]


def test_explicit_paths_limit_the_scan_and_named_files_are_read_whatever_their_suffix(project):
    plant(project, "configs/eval.yaml", f"{ET}: true")
    n = plant(project, "data/train.jsonl", f'{{"{SP}_acc": 1}}')
    assert found(project, [Path("spellxfer")]) == []
    assert found(project, [Path("data/train.jsonl")]) == [("data/train.jsonl", n, "spelling-metric")]
    assert [v.path for v in scan(project, [project / "configs"])] == ["configs/eval.yaml"]


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_in_a_git_checkout_gitignore_decides(project):
    subprocess.run(["git", "init", "-q", str(project)], check=True)
    (project / ".gitignore").write_text("scratch/\n")
    plant(project, "scratch/try.py", f"f({ET}=True)")  # ignored
    n = plant(project, "results/committed.json", f'{{"{SP}_score": 1}}')  # not ignored here: read
    assert found(project) == [("results/committed.json", n, "spelling-metric")]


def test_check_prints_violations_and_returns_1(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    n = plant(project, "configs/eval.yaml", f"{ET}: true")
    assert check() == 1
    out = capsys.readouterr().out
    assert f"configs/eval.yaml:{n}: [thinking-on] " in out
    assert "policy check: 1 violation(s) in 1 file(s)" in out


def test_check_returns_0_when_clean(project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    assert check() == 0
    assert check(paths=["configs", "docs/evaluation.md"]) == 0
    assert "policy check: clean" in capsys.readouterr().out


def test_check_names_a_missing_path(project, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(SpellxferError, match="no such file or directory: configs/nope.yaml"):
        check(paths=["configs/nope.yaml"])
    with pytest.raises(SpellxferError, match="not a directory"):
        check(root=str(project / "missing-root"))


def test_a_file_marker_at_the_top_of_a_test_file_skips_that_file_only(project):
    bad = f"out = f(msgs, {ET}=True)"
    plant(project, "tests/test_guard.py", f"# {ALLOW_FILE_MARKER}: forbidden examples on purpose")
    plant(project, "tests/test_guard.py", bad)
    assert scan(project) == []
    n = plant(project, "tests/test_other.py", bad)  # no marker: read as usual
    assert found(project) == [("tests/test_other.py", n, "thinking-on")]


def test_the_file_marker_counts_only_under_tests_and_only_in_the_first_ten_lines(project):
    plant(project, "spellxfer/guard.py", f"# {ALLOW_FILE_MARKER}")
    n = plant(project, "spellxfer/guard.py", f"out = f(msgs, {ET}=True)")
    assert found(project) == [("spellxfer/guard.py", n, "thinking-on")]
    for i in range(10):
        plant(project, "tests/test_late.py", f"x{i} = {i}")
    plant(project, "tests/test_late.py", f"# {ALLOW_FILE_MARKER}")  # line 11: too late
    m = plant(project, "tests/test_late.py", f"{SP}_acc = 1.0")
    assert ("tests/test_late.py", m, "spelling-metric") in found(project)


def test_the_command_line_tool_exits_0_clean_1_on_a_violation_2_on_a_bad_path(project):
    def tool(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=project)

    clean = tool()
    assert clean.returncode == 0 and "policy check: clean" in clean.stdout
    n = plant(project, "configs/eval.yaml", f"{ET}: true")
    bad = tool()
    assert bad.returncode == 1 and f"configs/eval.yaml:{n}: [thinking-on] " in bad.stdout
    assert tool("docs").returncode == 0  # only the named directory is read
    missing = tool("configs/nope.yaml")
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: no such file or directory: configs/nope.yaml"


def test_the_repository_itself_is_clean():
    """The guard that keeps main clean: the same scan `make test`, `.ci/run` and pre-commit run."""
    violations = scan(Path(__file__).parents[1])
    assert violations == [], "\n".join(f"{v}\n    {v.text}" for v in violations)
