"""The family table of docs/models.md: every MoE model type of the installed transformers, compressed or refused.

    python -m ream_exp.moe.family_table                 # print the markdown table
    python -m ream_exp.moe.family_table --write docs/models.md   # replace the table between the markers

Each causal-LM model type and each vision-language one whose text model is MoE (moe/registry.py) is built at
tiny size from its config class (moe/tiny_configs.py) and read by `family_for` (moe/discover.py): a family it
reads is compressed, with what is special about it; one it refuses says why. tests/test_every_moe_family.py
proves every compressed one (never-routed experts removed and reloaded, towers bit for bit, reap and
ream_official, streamed = in memory, every count key) and checks that docs/models.md holds this very table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BEGIN = "<!-- family-table:begin (python -m ream_exp.moe.family_table --write docs/models.md) -->"
END = "<!-- family-table:end -->"


def claim(model_type: str):
    """The Family read from the tiny config of `model_type`, or the reason it is refused (a str)."""
    from .discover import Unsupported
    from .families import family_for
    from .tiny_configs import tiny_config

    try:
        return family_for(tiny_config(model_type))
    except Unsupported as exc:
        return str(exc).removeprefix(f"model_type {model_type!r}: ")


def rows(model_types: list[str]) -> list[tuple[str, str, str]]:
    """(model type, status, what is special or why refused) for each of `model_types`."""
    out = []
    for model_type in model_types:
        family = claim(model_type)
        if isinstance(family, str):
            out.append((model_type, "refused", family))
        else:
            out.append((model_type, "compressed", "; ".join(family.notes) or "-"))
    return out


def _table(table: list[tuple[str, str, str]]) -> list[str]:
    return ["| model type | status | what is special / why refused |", "|---|---|---|"] + [
        f"| `{mt}` | {status} | {text.replace('|', '/')} |" for mt, status, text in table]


def markdown() -> str:
    import transformers

    from .registry import causal_lm_moe_types, vision_language_moe_types

    causal, vl = rows(causal_lm_moe_types()), rows(vision_language_moe_types())
    done, vl_done = (sum(status == "compressed" for _, status, _ in t) for t in (causal, vl))
    lines = [f"{done} of the {len(causal)} causal-LM MoE model types of transformers {transformers.__version__} "
             "are compressed; the others are refused before any weights load, with the reason below.", ""]
    lines += _table(causal)
    lines += ["", f"{vl_done} of the {len(vl)} vision-language model types whose text model is MoE (loaded through "
              "AutoModelForImageTextToText, not listed above) are compressed: the text model's experts, with "
              "the vision and audio towers kept and saved untouched.", ""]
    lines += _table(vl)
    return "\n".join(lines)


def replace_between_markers(text: str, table: str) -> str:
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + table + "\n" + text[end:]


def committed_table(readme: Path) -> str:
    text = readme.read_text()
    return text[text.index(BEGIN) + len(BEGIN):text.index(END)].strip("\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", type=Path, help="a markdown file whose table between the markers is replaced")
    args = parser.parse_args(argv)
    table = markdown()
    if args.write:
        args.write.write_text(replace_between_markers(args.write.read_text(), table))
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
