"""The documentation users have: README.md and docs/*.md point only at things that exist.

Every relative link or image names a file or folder of the repository; an #anchor into a markdown file
names one of its headings under GitHub's rule (lowercase, punctuation other than '-' and '_' dropped,
each space a '-', repeated headings suffixed -1, -2, ...). The README cites docs/algorithms.md, never
the team's internal spec, and the paper's numbers in docs/algorithms.md are tests/data/paper_table.csv.
"""

import csv
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
ALGORITHMS = ROOT / "docs" / "algorithms.md"

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", re.I)  # https:, mailto:, ...


def without_code(text: str) -> str:
    """The text with fenced blocks and inline code removed: links and headings there are not markup."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: link text kept, lowercase, only letters, digits, '-', '_' and
    spaces kept, each space turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(md: Path) -> set[str]:
    """Every heading anchor of a markdown file, with GitHub's -1, -2 suffixes for repeated ones."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", md.read_text(encoding="utf-8"))):
        base = github_anchor(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def broken_links(md: Path, root: Path = ROOT) -> list[str]:
    """Each relative link of `md` whose file is missing or whose #anchor is not a heading of its target."""
    problems = []
    for target in LINK.findall(without_code(md.read_text(encoding="utf-8"))):
        if EXTERNAL.match(target):
            continue
        path, _, anchor = target.partition("#")
        if not path:
            dest = md
        elif path.startswith("/"):
            dest = root / path.lstrip("/")
        else:
            dest = md.parent / path
        dest = dest.resolve()
        if not dest.is_relative_to(root.resolve()) or not dest.exists():
            problems.append(f"{md.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            problems.append(f"{md.name}: {target} (no heading with that anchor in {dest.name})")
    return problems


# ---- the checker itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("heading, anchor", [
    ("Expected numbers", "expected-numbers"),
    ("The official code's pruning baselines", "the-official-codes-pruning-baselines"),
    ("1. Saliency", "1-saliency"),
    ("Paper, official code and presets", "paper-official-code-and-presets"),
    ("`reap_official` and `freq_official`", "reap_official-and-freq_official"),
    ("MC / GEN for every mix", "mc--gen-for-every-mix"),
    ("See [the docs](docs/x.md) now", "see-the-docs-now"),
])
def test_anchor_rule(heading, anchor):
    assert github_anchor(heading) == anchor


def test_checker_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Part one\n\n## Part one\n\n```\n# not a heading\n```\n")
    (tmp_path / "README.md").write_text(
        "[ok](docs/a.md) [ok](docs/a.md#part-one) [ok](docs/a.md#part-one-1) [ok](#readme)\n"
        "[gone](docs/b.md) [bad anchor](docs/a.md#part-two) [code anchor](docs/a.md#not-a-heading)\n"
        "[outside](../elsewhere.md) ![img](docs/missing.png) [web](https://example.com/x.md#nowhere)\n"
        "`[in code](docs/none.md)`\n\n# README\n")
    problems = broken_links(tmp_path / "README.md", tmp_path)
    assert problems == [
        "README.md: docs/b.md (no such file)",
        "README.md: docs/a.md#part-two (no heading with that anchor in a.md)",
        "README.md: docs/a.md#not-a-heading (no heading with that anchor in a.md)",
        "README.md: ../elsewhere.md (no such file)",
        "README.md: docs/missing.png (no such file)",
    ]


# ---- the repository's documentation ----------------------------------------------------------------

@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(md):
    assert broken_links(md) == []


def test_readme_cites_algorithms_not_the_internal_spec():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "SPEC " not in readme and "SPEC.md" not in readme
    cited = {t for t in LINK.findall(without_code(readme)) if t.partition("#")[0] == "docs/algorithms.md"}
    assert "docs/algorithms.md" in cited and len(cited) > 1  # the pointer and at least one section


def test_no_file_cites_a_document_users_do_not_have():
    """Code, configs, tests and docs cite docs/algorithms.md, never the internal SPEC."""
    cite = re.compile(r"\bSPEC(?:\.md|\s+\d)")
    parts = ("ream_exp", "analysis", "tests", "conf", "sweeps", "docs", "hydra_plugins")
    files = [f for part in parts for f in (ROOT / part).rglob("*")
             if f.suffix in (".py", ".yaml", ".md", ".ipynb") and "__pycache__" not in f.parts]
    citing = [str(f.relative_to(ROOT)) for f in files
              if f != Path(__file__) and cite.search(f.read_text(encoding="utf-8", errors="replace"))]
    assert files and citing == []


# ---- the paper's numbers ---------------------------------------------------------------------------

METHOD_COLUMNS = {"Freq": "freq", "REAP": "reap", "HC-SMoE": "hc_smoe", "REAM": "ream"}


def paper_table() -> dict[tuple[str, int, str], tuple[float, float]]:
    with open(ROOT / "tests" / "data" / "paper_table.csv", newline="") as f:
        return {(r["method"], int(r["experts"]), r["mix"]): (float(r["mc"]), float(r["gen"]))
                for r in csv.DictReader(f)}


def section_rows(md: Path, heading: str) -> list[list[str]]:
    """The body rows of the first table under `heading` (up to the next heading), as lists of cells."""
    text = md.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    end = text.find("\n#", start + len(heading) + 2)
    lines = [l for l in text[start:end if end > 0 else None].splitlines() if l.startswith("|")]
    return [[c.strip() for c in l.strip("|").split("|")] for l in lines[2:]]


def test_every_mix_table_is_the_paper_table():
    table = paper_table()
    header = "| mix | " + " | ".join(f"{m} {e}" for e in (96, 64) for m in METHOD_COLUMNS) + " |"
    assert header in ALGORITHMS.read_text(encoding="utf-8")
    doc = {}
    for mix, *cells in section_rows(ALGORITHMS, "### MC / GEN for every mix"):
        for (e, m), cell in zip([(e, m) for e in (96, 64) for m in METHOD_COLUMNS.values()], cells, strict=True):
            mc, gen = cell.split(" / ")
            doc[(m, e, mix)] = (float(mc), float(gen))
    assert doc == table


def test_best_gen_table_is_the_maximum_of_the_paper_table():
    table = paper_table()
    rows = section_rows(ALGORITHMS, "### Best GEN per method, 96 experts")
    assert sorted(r[0] for r in rows) == sorted(METHOD_COLUMNS)
    for name, mix, mc, gen, _preset in rows:
        best = max((g, x) for (k, e, x), (_, g) in table.items() if k == METHOD_COLUMNS[name] and e == 96)
        assert (float(gen), mix) == best and float(mc) == table[(METHOD_COLUMNS[name], 96, mix)][0]
