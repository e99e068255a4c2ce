"""README.md and docs/: every link resolves, every command shown exists with the options shown, and the
short commands run. The README stays a five-minute read."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from lora_export.cli import cli

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", page.read_text(), re.M)}


def broken_links(page: Path) -> list[str]:
    bad = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{page.name}: {target} (no such heading)")
    return bad


def test_the_pages_exist_and_the_readme_is_short():
    names = {p.name for p in PAGES}
    for page in ("export", "generation", "serving", "optimizing", "tensorrt", "verify-and-bench", "contract"):
        assert f"{page}.md" in names
    assert (ROOT / "README.md").stat().st_size <= 15 * 1024


def test_every_link_resolves():
    bad = [b for page in PAGES for b in broken_links(page)]
    assert not bad, "\n".join(bad)


def test_the_link_check_can_fail(tmp_path):
    (tmp_path / "a.md").write_text("# Top\n[x](b.md) [y](#top) [z](#nowhere) [w](a.md#top)\n")
    assert broken_links(tmp_path / "a.md") == ["a.md: b.md (no such file)", "a.md: #nowhere (no such heading)"]


def shown_commands() -> list[tuple[str, list[str]]]:
    """Every `lora-export ...` command line in an indented or fenced code block: (page, argv)."""
    out = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        fence = None  # the language of the fenced block we are in
        for n, line in enumerate(lines):
            if line.startswith("```"):
                fence = None if fence is not None else (line[3:].strip() or "text")
                continue
            if fence == "python" or not (fence or line.startswith("    ")):
                continue
            code = line.split(" #", 1)[0].strip()
            while code.endswith("\\") and n + 1 < len(lines):
                n += 1
                code = code[:-1] + " " + lines[n].split(" #", 1)[0].strip()
            words, part = shlex.split(code, comments=True), []
            for w in [*words, "&&"]:
                if w not in ("&&", ";", "|", "||"):
                    part.append(w)
                    continue
                if part and part[0] == "lora-export":
                    out.append((page.name, part[1:]))
                part = []
    return out


def option_problems(argv: list[str]) -> list[str]:
    """Names in `argv` that the CLI does not have: the command, then each --option of that command."""
    name = next((w for w in argv if not w.startswith("-")), None)
    if name is None:
        return []
    cmd = cli.get_command(click.Context(cli), name)
    if cmd is None:
        return [f"no command {name!r}"]
    known = {o for p in cmd.params for o in [*p.opts, *p.secondary_opts]} | {"--help", "-h"}
    given = [w.split("=", 1)[0] for w in argv[argv.index(name) + 1 :] if w.startswith("-") and len(w) > 1]
    return [f"{name}: no option {w}" for w in given if w not in known and not re.fullmatch(r"-\d.*", w)]


def test_every_command_shown_has_its_options():
    commands = shown_commands()
    assert len(commands) >= 20, len(commands)  # the parser finds them
    bad = [f"{page}: lora-export {' '.join(argv)}: {p}" for page, argv in commands for p in option_problems(argv)]
    assert not bad, "\n".join(bad)
    assert option_problems(["export-decoder", "--layuot", "bank"]) == ["export-decoder: no option --layuot"]
    assert option_problems(["export-decodr"]) == ["no command 'export-decodr'"]


@pytest.mark.parametrize("argv", [["--help"], ["--version"], *[[c, "--help"] for c in sorted(cli.commands)]])
def test_the_short_forms_run(argv):
    result = CliRunner().invoke(cli, argv)
    assert result.exit_code == 0, result.output


def test_the_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if "python -m pytest" in line).strip()
    ci = (ROOT / ".ci" / "run").read_text()
    for step in setup.split(" && ")[2:]:  # after the venv: every install step and the test command itself
        words = [w for w in step.split() if w != "--quiet"]
        assert any(words == [w for w in line.split("#")[0].split() if w != "--quiet"] for line in ci.splitlines()), step


def test_the_shown_tools_and_samples_exist():
    missing = []
    for page in PAGES:
        for path in re.findall(r"\b((?:tools|samples)/[\w./-]+\.(?:py|sh))\b", page.read_text()):
            if not (ROOT / path).exists():
                missing.append(f"{page.name}: {path}")
    assert not missing, "\n".join(missing)


def test_the_readme_python_snippets_compile():
    for page in PAGES:
        for n, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S)):
            compile(block, f"{page.name} python block {n}", "exec")


def test_the_help_of_the_installed_entry_point():
    proc = subprocess.run([sys.executable, "-m", "lora_export", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "export-decoder" in proc.stdout
