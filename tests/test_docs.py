"""The documentation users have: README.md and the pages of docs/ point only at things that exist, the site
builds, and the settings reference is the schema's.

Every relative link or image names a file or folder of the repository; an #anchor into a markdown file
names one of its headings under GitHub's rule (lowercase, punctuation other than '-' and '_' dropped,
each space a '-', repeated headings suffixed -1, -2, ...), which mkdocs.yml gives the site too, so a link
works on GitHub and on the site alike. `mkdocs build --strict` (the site, mkdocs.yml) refuses a link from a
page to a missing page or file, an anchor that names no heading and a page left out of the site: it runs
here, so `make test` (and CI) fail on them. The settings reference (docs/reference/settings.md) is what
`python -m ream_exp.settings_reference` writes. The README is the front door: short, with the two commands.
Docs cite docs/algorithms.md, never the team's internal spec, and the paper's numbers in docs/algorithms.md
are tests/data/paper_table.csv.
"""

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
ALGORITHMS = ROOT / "docs" / "algorithms.md"
SETTINGS_PAGE = ROOT / "docs" / "reference" / "settings.md"

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
    ("calib.sources.NAME", "calibsourcesname"),
])
def test_anchor_rule(heading, anchor):
    """GitHub's rule, and the site's (mkdocs.yml: pymdownx's slugify of the heading's text, code and links
    rendered as their text), give the same anchor."""
    from pymdownx.slugs import slugify

    assert github_anchor(heading) == anchor
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    assert slugify(case="lower")(text, "-") == anchor


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


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's banner about MkDocs 2.0
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
                           "--site-dir", str(site)], capture_output=True, text=True, env=env, timeout=600)


def test_site_builds_in_strict_mode(tmp_path):
    """`make docs` as CI runs it: every page in the site, every link between pages and every anchor resolves."""
    result = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    for page in ("index.html", "reference/settings/index.html", "algorithms/index.html", "toy/index.html"):
        assert (tmp_path / "site" / page).is_file()


def test_strict_build_refuses_a_broken_link_or_anchor(tmp_path):
    """The same config over a copy of docs/ with a link to a missing page and one to a missing heading."""
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text(encoding="utf-8") + "\n[gone](no-such-page.md) [bad](running.md#no-such-heading)\n")
    result = mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "no-such-page.md" in output and "no-such-heading" in output, output[-4000:]


def test_settings_reference_is_what_the_generator_writes():
    from ream_exp.settings_reference import render

    assert SETTINGS_PAGE.read_text(encoding="utf-8") == render(), \
        "the schema or conf/ changed: python -m ream_exp.settings_reference > docs/reference/settings.md"


def test_settings_reference_names_every_setting():
    """Walked here from the schema, not by the generator: every key of every group, of a calibration source
    and of each method's settings, and every option of conf/, is on the page."""
    from ream_exp import CONF_DIR
    from ream_exp.methods import METHODS
    from ream_exp.settings import SCHEMA, SOURCE, Group, method_group

    page = SETTINGS_PAGE.read_text(encoding="utf-8")
    keys = list(SCHEMA.fields)
    keys += [f"{k}.{sub}" for k, spec in SCHEMA.fields.items() if isinstance(spec, Group) for sub in spec.fields]
    keys += [f"calib.sources.NAME.{k}" for k in SOURCE.fields]
    keys += [f"method.{k}" for name, module in METHODS.items() for k in method_group(module, name).fields
             if k != "name"]
    options = [p.stem for group in ("model", "calib", "method", "eval", "logger")
               for p in (CONF_DIR / group).glob("*.yaml")]
    missing = [k for k in keys + options if f"`{k}`" not in page]
    assert len(keys) > 60 and set(METHODS) <= set(options) and missing == []


def test_readme_is_a_front_door():
    """A few screens, with the two commands as the Makefile and CI have them, and a link to every page."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 150
    assert "make demo" in readme and "make test" in readme
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo: setup\n\t\$\(BIN\)/ream-exp$", makefile, re.M)  # the default job, no arguments
    assert re.search(r"^test: setup.*\n\t.* -m pytest ", makefile, re.M)
    assert re.search(r"^make test$", (ROOT / ".ci" / "run").read_text(encoding="utf-8"), re.M)
    nav = re.findall(r"^\s*- (?:[^:\n]+: )?(\S+\.md)$", (ROOT / "mkdocs.yml").read_text(encoding="utf-8"), re.M)
    linked = {t.partition("#")[0] for t in LINK.findall(without_code(readme))}
    assert len(nav) > 10 and [p for p in nav if f"docs/{p}" not in linked] == []


def test_toy_heatmap_in_the_docs_is_the_packages():
    """docs/img holds a copy of the figure the package ships (the site cannot reach outside docs/)."""
    shipped = ROOT / "ream_exp" / "toy" / "expert_heatmap.png"
    assert (ROOT / "docs" / "img" / "toy_expert_heatmap.png").read_bytes() == shipped.read_bytes()


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
