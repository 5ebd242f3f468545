"""Group-limited routers (DeepSeek-V3, GLM-4.5, DeepSeek-V2's group_limited_greedy): keeping their groups.

Such a router splits a layer's N experts into n_group equal contiguous blocks (expert e is in group
e // (N / n_group)), scores each block, lets each token use only the experts of its topk_group best blocks
and then picks the top_k of those. Removing experts keeps that routing only if every group loses the
same number of experts and the survivors stay in their blocks, in order:

    each group keeps N' / n_group of its own experts; new expert j belongs to group j // (N' / n_group)

so n_group and topk_group stay as they are. Two limits stay with the router: the groups picked for a
token must hold top_k experts (topk_group * N' / n_group >= top_k), and DeepSeek-V3/GLM score a group by
its two best experts, so each group must keep at least two (`Family.group_score_experts`).

    within_router_groups(N, N', n_group, choose)   what each group keeps, chosen by choose(members, k)
    router_group_problem(...)                       why N -> N' would break the routing (None: it would not)
    router_group_refusal(model_config, ratio, N, N') the same from config.json, before any weights load
"""

from __future__ import annotations

from typing import Callable, Sequence

from .families import Family, family_for


def router_groups(router_or_config, family: Family) -> int:
    """n_group of a router module (or of the model config) whose routing is group-limited, else 1."""
    if not family.group_score_experts:
        return 1
    obj = router_or_config
    groups = getattr(obj, "num_group", None) or getattr(obj, "n_group", None) or 1
    if getattr(obj, "topk_method", None) == "greedy":  # DeepSeek-V2's default ignores its groups
        return 1
    return int(groups)


def group_members(num_experts: int, n_groups: int) -> list[list[int]]:
    """The experts of each router group: n_groups equal contiguous blocks of 0..num_experts-1."""
    if num_experts % n_groups:
        raise ValueError(f"{num_experts} experts cannot form n_group={n_groups} equal router groups")
    size = num_experts // n_groups
    return [list(range(g * size, (g + 1) * size)) for g in range(n_groups)]


def per_group(n_keep: int, n_groups: int) -> int:
    """N' / n_group, the experts each router group keeps."""
    if n_keep % n_groups:
        raise ValueError(f"keeping {n_keep} experts cannot leave n_group={n_groups} router groups equal; "
                         f"N' must be a multiple of n_group")
    return n_keep // n_groups


def within_router_groups(num_experts: int, n_keep: int, n_groups: int,
                         choose: Callable[[list[int], int], Sequence[int]]) -> list[int]:
    """The kept experts, ascending, when each router group keeps N'/n_group of its own members:
    `choose(members, k)` picks k of one group's members (global indices). n_groups = 1: one call."""
    k = per_group(n_keep, n_groups)
    keep = []
    for members in group_members(num_experts, n_groups):
        chosen = [int(e) for e in choose(members, k)]
        if len(set(chosen)) != k or not set(chosen) <= set(members):
            raise ValueError(f"router group {members[0] // len(members)}: chose {chosen}, "
                             f"not {k} distinct experts of {members}")
        keep += sorted(chosen)
    return keep


def router_group_problem(num_experts: int, n_keep: int, n_groups: int, topk_group: int, top_k: int,
                         group_score_experts: int) -> str | None:
    """Why keeping n_keep of num_experts would break group-limited routing, or None when it would not."""
    if n_groups <= 1:
        return None
    removed = num_experts - n_keep
    if removed % n_groups:
        return f"{removed} removed experts cannot come equally from the {n_groups} groups"
    k = n_keep // n_groups
    if k < group_score_experts:
        return f"each group would keep {k}, but the router scores a group by its {group_score_experts} best"
    if topk_group * k < top_k:
        return f"the topk_group={topk_group} groups a token uses would hold {topk_group * k} < top_k={top_k} experts"
    return None


def grouped_keep_problem(keep: list[int], num_experts: int, n_groups: int) -> str | None:
    """Why the kept list `keep` (in its new order) does not keep the router groups, or None."""
    if n_groups <= 1:
        return None
    if len(keep) % n_groups:
        return f"{len(keep)} kept experts are not a multiple of n_group={n_groups}"
    old, new = num_experts // n_groups, len(keep) // n_groups
    wrong = [(j, e) for j, e in enumerate(keep) if e // old != j // new]
    if wrong:
        j, e = wrong[0]
        return (f"new expert {j} would be old expert {e} of group {e // old}, but position {j} is in group "
                f"{j // new}: each group must keep {new} of its own experts, in group order")
    return None


def _allowed_ratios(num_experts: int, n_groups: int, topk_group: int, top_k: int, min_per_group: int) -> str:
    removed = [m for m in range(0, num_experts, n_groups)
               if router_group_problem(num_experts, num_experts - m, n_groups, topk_group, top_k, min_per_group)
               is None]
    ratios = [f"{m / num_experts:g}" for m in removed]
    shown = ratios if len(ratios) <= 6 else ratios[:3] + ["..."] + ratios[-2:]
    return (f"multiples of n_group/N = {n_groups}/{num_experts} up to {removed[-1]}/{num_experts} "
            f"({', '.join(shown)})")


def router_group_refusal(model_config, ratio: float, num_experts: int, n_keep: int) -> str | None:
    """The one-line refusal (from config.json alone) when keeping n_keep experts would break the
    routing, or None; config.check_expert_counts raises it before any weights load."""
    family = family_for(model_config)
    n_groups = family.n_group if family.group_score_experts else 1
    topk_group, top_k = family.topk_group, family.top_k
    limits = (n_groups, topk_group, top_k, family.group_score_experts)
    problem = router_group_problem(num_experts, n_keep, *limits)
    if problem is None:
        return None
    return (f"ratio={ratio} keeps {n_keep} of N={num_experts} experts, but the group-limited router "
            f"(n_group={n_groups}, topk_group={topk_group}, top_k={top_k}) keeps each group's own N'/n_group "
            f"experts: {problem}; allowed ratios: {_allowed_ratios(num_experts, *limits)}")
