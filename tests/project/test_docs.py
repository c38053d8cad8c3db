"""The docs and the code point only at what is in the tree, and the README stays short.

Checked in README.md, docs/*.md and every Python file: markdown links (and their `#anchors`), paths
under the project's folders (`minigpt4/…`, `tests/…`, `train_configs/…`, …; globs must match), and
every section-sign reference (`docs/method.md` then the sign and N), which must name a markdown file that
has a section numbered N; in a markdown file the sign alone means a section of that file.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README_MAX_LINES = 300
FOLDERS = ("minigpt4", "demo", "tests", "docs", "train_configs", "eval_configs", "scripts", "recipes", ".ci")
PY_PLACES = ("app.py", "demo", "minigpt4", "scripts", "tests", "recipes")
EXTENSIONS = "py|md|yaml|yml|txt|sh|json|png|jpg|safetensors|toml"

# A path in text: one of FOLDERS, then a file with an extension or a folder ending in "/". Not part of a
# longer path, a URL or a `commit:path` (`~/.cache/minigpt4/…`, `github.com/…/tests/…`). A one-letter
# upper-case name (`train_configs/X.yaml`) is a placeholder.
PATH = re.compile(
    rf"(?<![\w/.~:-])((?:{'|'.join(map(re.escape, FOLDERS))})/(?:[\w*.-]+/)*(?:[\w*.-]*\.(?:{EXTENSIONS})\b|))"
)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SECTION = re.compile(r"(?:([\w./-]+\.md)\s*)?\u00a7\s*(\d+)?")  # \u00a7: the section sign


def _docs() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _python_files() -> list[Path]:
    files = []
    for place in PY_PLACES:
        path = ROOT / place
        files += [path] if path.is_file() else sorted(path.rglob("*.py")) if path.is_dir() else []
    return files


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _headings(path: Path) -> list[str]:
    """The markdown headings of `path`, outside fenced code blocks."""
    headings, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            headings.append(match.group(1).strip())
    return headings


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def _exists(target: str, base: Path) -> bool:
    if "*" in target:
        return any(ROOT.glob(target))
    return (base / target).exists() or (ROOT / target).exists()


def _broken_references(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    broken = [
        f"{ref} (no such file)"
        for ref in PATH.findall(text)
        if not _exists(ref, ROOT) and not re.fullmatch(r"[A-Z]", Path(ref).stem)
    ]
    for match in SECTION.finditer(text):
        name, number = match.groups()
        if name is None:
            target = path if path.suffix == ".md" else None
        else:
            target = next((p for p in (path.parent / name, ROOT / name) if p.is_file()), None)
        if target is None or number is None:
            broken.append(f"{match.group(0)!r} (needs a markdown file in the tree and a section number)")
        elif not any(h.startswith(f"{number}. ") for h in _headings(target)):
            broken.append(f"{match.group(0)!r} ({_rel(target)} has no section {number})")
    if path.suffix == ".md":
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file) if file else path
            if not linked.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in map(slug, _headings(linked)):
                broken.append(f"{target} (no heading #{anchor} in {_rel(linked)})")
    return list(dict.fromkeys(broken))


@pytest.mark.parametrize("path", _docs() + _python_files(), ids=_rel)
def test_every_reference_points_into_the_tree(path: Path) -> None:
    assert _broken_references(path) == []


def test_the_checks_catch_what_they_should(tmp_path: Path) -> None:
    page = ROOT / "docs" / "method.md"
    assert slug("HTTP API (OpenAI-compatible)") == "http-api-openai-compatible"
    assert slug("Open instructions (`instruct`)") == "open-instructions-instruct"
    assert any(h.startswith("4. ") for h in _headings(page))
    bad, gone = tmp_path / "bad.md", "gone.yaml"  # the name apart, so this file does not name it
    bad.write_text(
        f"See [x](nothere.md), [y](method.md#no-such-part), `train_configs/{gone}`, DESIGN \u00a74 and"
        " docs/method.md \u00a79; fine: `~/.cache/minigpt4/gguf/`, https://github.com/o/r/tests/x.py,"
        f" `tests/project/test_docs.py`, `abc1234:train_configs/{gone}`, docs/method.md \u00a74.\n",
        encoding="utf-8",
    )
    (tmp_path / "method.md").write_text(page.read_text(encoding="utf-8"), encoding="utf-8")
    found = _broken_references(bad)
    assert [f.split(" (")[0] for f in found] == [
        f"train_configs/{gone}",
        "'\u00a74'",
        "'docs/method.md \u00a79'",
        "nothere.md",
        "method.md#no-such-part",
    ], found


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move detail into docs/"


def test_every_tracked_file_over_10_mb_goes_through_the_space_upload_path() -> None:
    """The Hub refuses a pushed file over 10 MB outside Git LFS; docs/space.md uploads with `hf upload`
    (the Hub stores large files through LFS itself) and must name each such file."""
    tracked = (
        subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True)
        .stdout.decode()
        .split("\0")
    )
    large = [
        name
        for name in tracked
        if name and (ROOT / name).is_file() and (ROOT / name).stat().st_size > 10_000_000
    ]
    page = (ROOT / "docs" / "space.md").read_text(encoding="utf-8")
    assert "hf upload <owner>/<space> . --repo-type space" in page
    assert [name for name in large if name not in page] == []


# The commands whose argument parsers can be built without a model, and where they live.
PARSED_COMMANDS = {
    "train": "minigpt4.train.loop",
    "cache-features": "minigpt4.train.features",
    "eval": "minigpt4.eval.run",
    "make-data": "minigpt4.commands.make_data",
}


def _documented_commands() -> list[tuple[str, str, list[str]]]:
    """(file, command, arguments) of every `python -m minigpt4 CMD …` or `minigpt4 CMD …` line in a
    fenced shell block of the docs, continuation lines joined and comments dropped."""
    import shlex  # noqa: PLC0415

    found = []
    for path in _docs():
        fenced, joined = False, ""
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.startswith("```"):
                fenced, joined = not fenced, ""
                continue
            if not fenced:
                continue
            joined += line.rstrip().removesuffix("\\") + " "
            if line.rstrip().endswith("\\"):
                continue
            text, joined = joined, ""
            match = re.search(
                r"(?:python -m minigpt4|^\s*minigpt4|-m minigpt4) ([\w-]+)((?: [^|;&#]*)?)", text
            )
            if match and match.group(1) in PARSED_COMMANDS:
                found.append((_rel(path), match.group(1), shlex.split(match.group(2))))
    return found


def test_the_documented_training_and_eval_commands_parse():
    import importlib  # noqa: PLC0415

    commands = _documented_commands()
    assert {command for _, command, _ in commands} >= {"train", "cache-features", "eval"}
    bad = []
    for where, command, args in commands:
        module = importlib.import_module(PARSED_COMMANDS[command])
        try:
            parsed = module.build_parser().parse_args(args)
            if getattr(parsed, "old_overrides", None):
                bad.append(f"{where}: {command} {' '.join(args)}: positional overrides")
        except SystemExit:
            bad.append(f"{where}: {command} {' '.join(args)}")
    assert not bad, "documented commands that their parser refuses:\n" + "\n".join(bad)
