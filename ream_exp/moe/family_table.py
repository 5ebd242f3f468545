"""The family table of docs/models.md: every MoE model type of the installed transformers, compressed or refused.

    python -m ream_exp.moe.family_table                 # print the markdown table
    python -m ream_exp.moe.family_table --write docs/models.md   # replace the table between the markers

Each causal-LM model type (moe/registry.py) is built at tiny size from its config class (moe/tiny_configs.py)
and read by `family_for` (moe/discover.py): a family it reads is compressed, with what is special about it;
one it refuses says why. tests/test_every_moe_family.py proves every compressed one (never-routed experts
removed and reloaded, reap and ream_official, streamed = in memory, every count key) and checks that the
docs/models.md holds this very table. Vision-language model types are listed apart: not checked yet.
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


def rows() -> list[tuple[str, str, str]]:
    """(model type, status, what is special or why refused) for every causal-LM MoE model type."""
    from .registry import causal_lm_moe_types

    out = []
    for model_type in causal_lm_moe_types():
        family = claim(model_type)
        if isinstance(family, str):
            out.append((model_type, "refused", family))
        else:
            out.append((model_type, "compressed", "; ".join(family.notes) or "-"))
    return out


def markdown() -> str:
    import transformers

    from .registry import vision_language_moe_types

    table = rows()
    done = sum(status == "compressed" for _, status, _ in table)
    lines = [f"{done} of the {len(table)} causal-LM MoE model types of transformers {transformers.__version__} "
             "are compressed; the others are refused before any weights load, with the reason below.", "",
             "| model type | status | what is special / why refused |", "|---|---|---|"]
    lines += [f"| `{mt}` | {status} | {text.replace('|', '/')} |" for mt, status, text in table]
    vl = vision_language_moe_types()
    lines += ["", f"Not checked yet: the {len(vl)} vision-language model types whose text model is MoE ("
              + ", ".join(f"`{mt}`" for mt in vl) + ")."]
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
