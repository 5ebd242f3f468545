"""A compressed checkpoint that says how it was made and loads in older transformers too.

`save_checkpoint` writes into checkpoint/:

- the model and tokenizer (`save_pretrained`, in the model's own dtype);
- plan.json and plan_perms.pt (the neuron permutations, when the method aligns neurons);
- config.json with a `compression` block (method and settings, ratio, calibration, run seed, ream-exp
  version and git commit, kept experts or groups per layer) and the config keys transformers 4.x reads
  (`legacy_keys`), since transformers 5 writes only its own names and 4.57 falls back to its defaults
  for the rest (128 experts for Qwen3-MoE, rope_theta 10000);
- README.md, a model card (huggingface_hub's ModelCard: base_model, tags, library and pipeline in its
  YAML header), rewritten with the scores by `write_model_card` once the checkpoint is evaluated.

A quant stage (ream_exp/quant/stage.py) adds a `quantization` entry to the compression block, which the
card reports.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from omegaconf import OmegaConf

from . import PACKAGE_DIR, __version__
from .atomic import atomic_write
from .moe import family_for
from .moe.families import expert_count_of
from .plan import Plan

CARD = "README.md"
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"  # ModelCard.from_template fills card_data (the YAML)


# ---- config.json: the keys older transformers read ------------------------------------------------

def expert_count_names(config) -> set[str]:
    """Every config key under which this family's config (either transformers generation) holds the
    routed-expert count: the family's count_key plus its aliases in the config class's attribute_map."""
    names = {k for k in family_for(config).count_keys if "." not in k}  # top-level keys (legacy readers)
    for alias, target in type(config).attribute_map.items():
        if alias in names or target in names:
            names |= {alias, target}
    return names


def legacy_keys(config, saved: dict) -> dict:
    """Keys to add to config.json so transformers 4.x reads what transformers 5 wrote."""
    count = expert_count_of(config)
    keys = {name: count for name in expert_count_names(config)}
    rope = saved.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope:  # one set for all layers (every supported family)
        keys["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" in rope:  # Qwen3-Next, GLM-4.5: top-level in transformers 4
            keys["partial_rotary_factor"] = rope["partial_rotary_factor"]
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
        # transformers 4 reads scaling (YaRN, ...) from rope_scaling; null for plain RoPE, where a default
        # like gpt-oss's YaRN would otherwise apply
        keys["rope_scaling"] = scaling if scaling.get("rope_type", "default") != "default" else None
    return keys


# ---- the compression block ------------------------------------------------------------------------

def git_commit() -> dict:
    """The commit of the ream-exp checkout this code runs from; None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", "-C", str(PACKAGE_DIR), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != PACKAGE_DIR.parent:
            return {"commit": None, "dirty": None}  # installed inside some other repository
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def lm_eval_git_hash() -> str:
    """What lm-eval records as `git_hash` in its results files (lm_eval/results_*.json): this code's commit
    (git_commit), "unknown" outside a git checkout, as an installed package runs. lm-eval's own
    get_git_commit_hash runs `git describe` in the working directory, whatever that is, and leaves git's
    "fatal: not a git repository" on the terminal once per suite outside one (docs/getting-started.md, Install)."""
    return git_commit()["commit"] or "unknown"


def compression_kind(plan: Plan) -> str:
    if all(len(lp.keep) == lp.num_experts for lp in plan.layers):
        return "none"
    return "merging" if any(lp.groups for lp in plan.layers) else "pruning"


def compression_block(cfg, plan: Plan, experts_before: int, experts_after: int, calibrated: bool = True) -> dict:
    """How this checkpoint was made, from the run's config and plan (JSON-able); the calibration settings
    only when the method read calibration tokens (`calibrated`)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    settings = {**container["method"], **plan.info.get("settings", {})}  # the plan's: C as resolved
    return {
        "method": cfg.method.name,
        "kind": compression_kind(plan),
        "settings": settings,
        "ratio": float(cfg.ratio),
        "experts_per_layer": {"before": experts_before, "after": experts_after},
        "base_model": {k: container["model"].get(k) for k in ("name", "path", "dtype")},
        "calibration": container["calib"] if calibrated else None,
        "seed": int(cfg.seed),
        "ream_exp": {"version": __version__, **git_commit()},
        "layers": {str(lp.layer): {"keep": lp.keep, **({"groups": lp.groups} if lp.groups else {})}
                   for lp in plan.layers},
        "plan": "plan.json",
        # budget=global (docs/budgets.md): N'_l per MoE layer; config.json's ream_exp_layer_experts says the same
        **({"budget": plan.info["budget"], "layer_experts": plan.info["layer_experts"]}
           if "layer_experts" in plan.info else {}),
    }


def rewrite_config(directory: Path, config, block: dict) -> dict:
    """config.json plus the legacy keys and the compression block (an earlier one kept as `previous`)."""
    path = directory / "config.json"
    saved = json.loads(path.read_text())
    saved.update(legacy_keys(config, saved))
    if "compression" in saved:  # a checkpoint ream-exp compressed before
        block = {**block, "previous": saved["compression"]}
    saved["compression"] = block
    text = (json.dumps(saved, indent=2, sort_keys=True) + "\n").encode()
    atomic_write(path, lambda f: f.write(text))
    return saved


def save_checkpoint(model, tokenizer, directory: Path, cfg, plan: Plan, experts_before: int,
                    calibrated: bool = True) -> None:
    directory = Path(directory)
    model.save_pretrained(directory)
    write_provenance(model, tokenizer, directory, cfg, plan, experts_before, calibrated)


def write_provenance(model, tokenizer, directory: Path, cfg, plan: Plan, experts_before: int,
                     calibrated: bool = True) -> None:
    """Everything of the checkpoint beside the weights and config.json (which save_pretrained, or the
    streamed writer of ream_exp/methods/layer_stream.py, wrote): tokenizer, plan, legacy keys, compression
    block, card."""
    tokenizer.save_pretrained(directory)
    plan.save(directory)
    experts_after = expert_count_of(model.config)
    rewrite_config(directory, model.config, compression_block(cfg, plan, experts_before, experts_after, calibrated))
    write_model_card(directory)


# ---- the model card -------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id(path: str | None) -> str | None:
    """`path` when it names a hub repository rather than a directory on this machine."""
    if not path or Path(path).expanduser().exists() or not _HUB_ID.match(path):
        return None
    return path


def card_data(block: dict) -> ModelCardData:
    """The card's metadata (its YAML header, as the hub reads it): the base model where it is a hub id."""
    tags = ["ream-exp", "moe"]
    if block["kind"] != "none":
        tags.append(f"expert-{block['kind']}")
    tags.append(block["method"])
    if block.get("quantization"):
        tags += ["compressed-tensors", block["quantization"]["name"]]
    return ModelCardData(base_model=hub_id(block["base_model"]["path"]), tags=tags, library_name="transformers",
                         pipeline_tag="text-generation")


def score_rows(rows: dict[str, dict]) -> str:
    """A markdown table: one row per model, MC / GEN / AVG and every task, in %."""
    tasks = sorted({t for r in rows.values() for t in (r.get("tasks") or {})})
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"
    lines = ["| model | MC | GEN | AVG | " + " | ".join(tasks) + " |", "|---" * (4 + len(tasks)) + "|"]
    for name, r in rows.items():
        cells = [fmt(r.get(k)) for k in ("mc", "gen", "avg")]
        cells += [fmt((r.get("tasks") or {}).get(t, {}).get("score")) for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _body(block: dict, config: dict, scores: dict | None, baseline: dict | None) -> str:
    n = block["experts_per_layer"]
    base = block["base_model"]["path"]
    calib = block["calibration"]
    after = (f"{n['before']} -> {n['after']} routed experts in every MoE layer" if "layer_experts" not in block else
             f"{n['before']} routed experts per MoE layer -> {block['layer_experts']} (budget={block['budget']}; "
             "load it with ream_exp.load_compressed: stock transformers and vLLM do not load per-layer expert counts)")
    made = [f"- method: `{block['method']}` ({block['kind']}), ratio {block['ratio']}: {after}",
            f"- base model: `{base}`, dtype {config.get('dtype') or config.get('torch_dtype')}",
            f"- run seed {block['seed']}"]
    if calib:
        made.append(f"- calibration: `{calib.get('name')}`, mix {calib.get('mix')}, n {calib.get('n')}, "
                    f"seq_len {calib.get('seq_len')}, seed {calib.get('seed')}")
    quant = block.get("quantization")
    if quant:
        group = f", groups of {quant['group_size']}" if quant.get("group_size") else ""
        made.append(f"- quantized after compression: `{quant['name']}` ({quant['scheme']} by {quant['algorithm']}"
                    f"{group}, {quant['calibration_sequences']} calibration sequences), llm-compressor "
                    f"{quant['tools'].get('llmcompressor')}, compressed-tensors format; kept unquantized: "
                    + ", ".join(f"`{p}`" for p in quant["ignore"])
                    + (f"; the model before quantization: {quant['unquantized']}/ beside this checkpoint"
                       if quant.get("unquantized") else ""))
    code = block["ream_exp"]
    made.append(f"- ream-exp {code['version']}, commit {code['commit']}"
                + (" (with uncommitted changes)" if code.get("dirty") else ""))
    name = hub_id(base) or (block["base_model"]["name"] if block["base_model"]["name"] != "local" else None)
    title = f"# {Path(name or str(base)).name} with {block['method']} at ratio {block['ratio']}"
    text = [title + (f", {quant['name']}" if quant else ""), "",
            "Compressed with ream-exp by "
            + ("merging" if block["kind"] == "merging" else "removing") + " routed experts; the router and every "
            "other weight are the base model's" + (", then quantized as below" if quant else "") + ". Every setting "
            "is in config.json's `compression` block and "
            "the per-layer plan in plan.json (plan_perms.pt: neuron permutations of merged experts).", "",
            "## How it was made", "", *made, "", "## Scores", ""]
    if scores and scores.get("tasks"):
        rows = {"uncompressed": baseline} if baseline else {}
        label = f"{block['method']} ({n['after']}/{n['before']} experts"
        rows[label + (f", {quant['name']})" if quant else ")")] = scores
        text += [score_rows(rows), "", "Scores in % (lm-evaluation-harness, as configured by the run)."]
    else:
        text.append("Not evaluated by ream-exp.")
    return "\n".join(text) + "\n"


def model_card(block: dict, config: dict, scores: dict | None = None, baseline: dict | None = None) -> ModelCard:
    """The model card of a checkpoint made as `block` says (config.json's compression block)."""
    return ModelCard.from_template(card_data(block), template_str=CARD_TEMPLATE,
                                   body=_body(block, config, scores, baseline))


def write_model_card(directory: Path, scores: dict | None = None, baseline: dict | None = None) -> Path:
    """README.md from config.json's compression block (and the scores once evaluated), written atomically."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    text = str(model_card(config["compression"], config, scores, baseline)).encode()
    return atomic_write(directory / CARD, lambda f: f.write(text))
