"""Mutation pass: plant one small deliberate bug at a time and check that the suite catches it.

    python -m tests.mutate            every mutant (what `make mutate` runs)
    python -m tests.mutate NAME ...   only these mutants (names as listed in MUTANTS)

Each mutant names a source file, an exact snippet that must occur exactly once in it, its replacement
and the tests that must fail once it is planted. The repository (tracked and untracked, not ignored
files) is copied to a temporary directory; the selected tests first run there unmutated (they must pass,
or a kill would mean nothing), then once per mutant with only that mutant planted. A mutant is killed
when its tests fail, survived when they pass. The exit status is non-zero when a snippet is not found
exactly once (the source changed: re-anchor the mutant), the unmutated tests fail, or a mutant survives.
The working tree is never modified.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FORMULA_TESTS = "tests/test_formulas.py"


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # source file, relative to the repository root
    snippet: str  # exact text, found exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids that must fail under the mutant


MUTANTS = [
    Mutant("floor-max-instead-of-min", "ream_exp/methods/merging.py",
           "floor = min(0.5,", "floor = max(0.5,",
           (f"{FORMULA_TESTS}::test_floor_is_the_smaller_of_one_half_and_the_smallest_non_zero_score",
            f"{FORMULA_TESTS}::test_ream_floors_the_saliency_of_never_routed_experts")),
    Mutant("floor-from-largest-score", "ream_exp/methods/merging.py",
           "float(nonzero.min())", "float(nonzero.max())",
           (f"{FORMULA_TESTS}::test_floor_is_the_smaller_of_one_half_and_the_smallest_non_zero_score",
            f"{FORMULA_TESTS}::test_ream_floors_the_saliency_of_never_routed_experts")),
    Mutant("pca-not-scaled-by-singular-values", "ream_exp/methods/merging.py",
           "(x @ v[:, :q]) * s[:q]", "(x @ v[:, :q])",
           (f"{FORMULA_TESTS}::test_pca_weight_features_are_scaled_by_the_singular_values",)),
    Mutant("activation-rows-not-normalised", "ream_exp/methods/merging.py",
           "return torch.div(a, norm, out=out).T", "return a.T",
           (f"{FORMULA_TESTS}::test_activation_alignment_ignores_the_scale_of_each_neuron",)),
    Mutant("down-bias-dropped-from-mean-outputs", "ream_exp/methods/observation.py",
           'if w["down_bias"] is not None:', "if False:",
           (f"{FORMULA_TESTS}::test_gpt_oss_mean_outputs_include_the_down_projection_bias",)),
    Mutant("sequential-keeps-original-outputs-too", "ream_exp/methods/layerwise.py",
           "keep_outputs=not sequential", "keep_outputs=True",
           (f"{FORMULA_TESTS}::test_sequential_observes_each_layer_on_the_already_compressed_layers",)),
    Mutant("sequential-runs-compressed-layer-twice", "ream_exp/methods/layerwise.py",
           "advance(states, ctx.model, layer.index, layer.index + 1)",
           "advance(states, ctx.model, layer.index, layer.index + 1); "
           "advance(states, ctx.model, layer.index, layer.index + 1)",
           (f"{FORMULA_TESTS}::test_sequential_observes_each_layer_on_the_already_compressed_layers",)),
    Mutant("hypervolume-offset-ignored", "analysis/pareto.py",
           '.min() - offset', '.min() - 1.0',
           ("tests/test_pareto_reference.py::test_reference_point_and_hypervolume_follow_the_offset",)),
    Mutant("cli-offset-ignored", "analysis/pareto.py",
           "frontiers(data, args.offset,", "frontiers(data, 1.0,",
           ("tests/test_pareto_reference.py::test_cli_passes_the_offset",)),
    Mutant("n-keep-rounds-half-to-even", "ream_exp/plan.py",
           "int(math.floor(num_experts * ratio + 0.5))", "round(num_experts * ratio)",
           (f"{FORMULA_TESTS}::test_experts_to_keep_rounds_halves_up",
            f"{FORMULA_TESTS}::test_ream_keeps_n_minus_rounded_half_up_experts")),
    Mutant("pruning-ignores-router-groups", "ream_exp/methods/base.py",
           "within_router_groups(len(score), n_keep, router_groups, best)",
           "within_router_groups(len(score), n_keep, 1, best)",
           ("tests/test_router_groups.py::test_top_experts_keeps_the_best_within_each_router_group",)),
    Mutant("merging-ignores-router-groups", "ream_exp/methods/merging.py",
           "group_members(layer.num_experts, layer.router_groups)", "group_members(layer.num_experts, 1)",
           ("tests/test_router_groups.py::test_merge_groups_stay_in_their_router_group",)),
    Mutant("surgery-skips-the-router-group-check", "ream_exp/moe/surgery.py",
           "if layer.router_groups == 1:", "if True:",
           ("tests/test_router_groups.py::test_surgery_refuses_plans_that_ignore_the_router_groups",)),
    # The merge operators, each planted with the departure REAP's merge code makes (docs/algorithms.md).
    Mutant("ties-task-vector-sign-flipped", "ream_exp/moe/merge_ops.py",
           "tau = trim(t - base, merge_density)", "tau = trim(base - t, merge_density)",
           ("tests/test_merge_ops.py::test_ties_moves_towards_the_members_not_away",)),
    Mutant("operators-take-unnormalised-weights", "ream_exp/moe/merge_ops.py",
           "out = OPERATORS[name](t.double(), normalised(weights).to(t.device), **params)",
           "out = OPERATORS[name](t.double(), torch.as_tensor(weights, dtype=torch.float64, device=t.device), "
           "**params)",
           ("tests/test_merge_ops.py::test_only_the_ratios_of_the_weights_matter",)),
    Mutant("sub-moe-split-by-reshape", "ream_exp/moe/merge_ops.py",
           "right = vh[:r].reshape(r, k, cols)", "right = vh[:r].reshape(k, r, cols).transpose(0, 1)",
           ("tests/test_merge_ops.py::test_sub_moe_at_full_rank_is_the_weighted_average",)),
    Mutant("multislerp-without-the-tangent-step", "ream_exp/moe/merge_ops.py",
           "return (scale * exp_map(m, wl @ log_map(m, units))).reshape(t.shape[1:])",
           "return (scale * m).reshape(t.shape[1:])",
           ("tests/test_merge_ops.py::test_two_members_give_slerp",)),
    # Qwen3-MoE routers have no per-expert buffers: only the every-family test sees this one.
    Mutant("router-buffers-sliced-from-the-front", "ream_exp/moe/surgery.py",
           "b[keep].clone()", "b[: len(keep)].clone()",
           ("tests/test_prune_every_family.py",)),
    Mutant("mtp-hidden-state-before-embedding", "ream_exp/moe/mtp.py",
           "torch.cat([self.embed_norm(next_embeds), self.hidden_norm(hidden)], dim=-1)",
           "torch.cat([self.hidden_norm(hidden), self.embed_norm(next_embeds)], dim=-1)",
           ("tests/test_mtp.py::test_reap_prunes_the_mtp_layer_by_its_own_saliency",)),
    Mutant("mtp-counts-the-last-real-token", "ream_exp/moe/mtp.py",
           "pair = valid[:, :-1] & valid[:, 1:]", "pair = valid[:, :-1]",
           ("tests/test_mtp.py::test_reap_prunes_the_mtp_layer_by_its_own_saliency",)),
    Mutant("mtp-fed-before-the-final-norm", "ream_exp/methods/capture.py",
           "layer_args[mtp.template], normed=False)", "layer_args[mtp.template], normed=True)",
           ("tests/test_mtp.py::test_ream_merges_the_mtp_layer_on_the_compressed_models_states",)),
]


def check_anchors(mutants: list[Mutant], root: Path) -> list[str]:
    """One line per mutant whose snippet does not occur exactly once in its file."""
    problems = []
    for m in mutants:
        path = root / m.path
        count = path.read_text().count(m.snippet) if path.exists() else 0
        if count != 1:
            problems.append(f"{m.name}: {m.snippet!r} occurs {count} times in {m.path} (need exactly 1)")
    return problems


def copy_repo(root: Path, dest: Path) -> None:
    """The files git would commit (tracked, and untracked but not ignored) copied under dest."""
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = root / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def run_tests(copy: Path, tests: tuple[str, ...]) -> tuple[int, str]:
    """pytest on `tests` inside the copy (its code first on the path); (exit status, last lines)."""
    env = {**os.environ, "PYTHONPATH": str(copy), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_MODE": "offline", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=copy, env=env, capture_output=True, text=True)
    return proc.returncode, "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-5:])


def run_mutant(m: Mutant, copy: Path) -> tuple[str, str]:
    """Plant m in the copy, run its tests, restore the file; ('killed' | 'survived' | 'error', details)."""
    path = copy / m.path
    original = path.read_text()
    path.write_text(original.replace(m.snippet, m.replacement, 1))
    try:
        rc, tail = run_tests(copy, m.tests)
    finally:
        path.write_text(original)
    # pytest: 0 all passed, 1 some failed; anything else (collection/usage errors, no tests) is our mistake
    return {0: "survived", 1: "killed"}.get(rc, "error"), tail


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    unknown = set(names) - {m.name for m in MUTANTS}
    if unknown:
        print(f"unknown mutant(s) {sorted(unknown)}; known: {', '.join(m.name for m in MUTANTS)}")
        return 2
    mutants = [m for m in MUTANTS if not names or m.name in names]
    problems = check_anchors(mutants, ROOT)
    if problems:
        print("mutants no longer anchored (re-anchor them in tests/mutate.py):\n  " + "\n  ".join(problems))
        return 2
    with tempfile.TemporaryDirectory(prefix="ream-mutate-") as tmp:
        copy = Path(tmp)
        copy_repo(ROOT, copy)
        selected = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        rc, tail = run_tests(copy, selected)
        if rc != 0:
            print(f"the selected tests fail without any mutant (exit {rc}):\n{tail}")
            return 2
        results = []
        for m in mutants:
            start = time.perf_counter()
            status, tail = run_mutant(m, copy)
            results.append((m, status))
            print(f"{status:8s} {m.name}  ({time.perf_counter() - start:.0f} s)", flush=True)
            if status != "killed":
                print("  " + tail.replace("\n", "\n  "))
    alive = [m.name for m, status in results if status != "killed"]
    print(f"{len(results) - len(alive)}/{len(results)} mutants killed" + (f"; not killed: {alive}" if alive else ""))
    return 1 if alive else 0


if __name__ == "__main__":
    sys.exit(main())
