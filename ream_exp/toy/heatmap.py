"""Which experts each domain uses: a per-layer heatmap of routing frequency (domains x experts).

    python -m ream_exp.toy.heatmap --out ream_exp/toy/expert_heatmap.png [--model DIR]

Routes each domain's evaluation text (general = facts + stories, math, code) through the model and
counts the top-k choices of every layer's router with a forward hook on ``mlp.gate`` (in
transformers 5 it returns (router_logits, top_k_weights, top_k_index)). A cell is the fraction of
the domain's tokens whose top-k contains that expert (the ``freq`` saliency of the paper), so each
row sums to top_k. Distinct rows mean the experts specialise, which is what makes the choice of
calibration mix matter when experts are pruned or merged.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

HERE = Path(__file__).parent


def domain_texts(tasks_dir: Path = HERE / "tasks") -> dict[str, list[str]]:
    """Each eval item as the full text the model should produce (prompt + correct answer)."""
    def rows(name):
        with open(tasks_dir / f"{name}.jsonl") as f:
            return [json.loads(line) for line in f]

    mc = [r["prompt"] + " " + r["choices"][r["label"]] for t in ("toy_facts", "toy_stories")
          for r in rows(t)]
    return {"general": mc,
            "math": [r["prompt"] + r["answer"] for r in rows("toy_arith")],
            "code": [r["prompt"] + r["body"] for r in rows("toy_code")]}


@torch.no_grad()
def routing_frequencies(model, tok, texts: dict[str, list[str]], batch_size: int = 32) -> torch.Tensor:
    """[layers, domains, experts]: fraction of a domain's (non-pad) tokens routed to each expert."""
    layers = model.model.layers
    n_experts = model.config.num_experts
    counts = torch.zeros(len(layers), len(texts), n_experts)
    state = {}

    def hook(layer_idx):
        def count(_module, _inputs, output):
            top_k_index = output[2][state["keep"]]  # drop pad tokens
            counts[layer_idx, state["domain"]] += torch.bincount(
                top_k_index.flatten().cpu(), minlength=n_experts).float()
        return count

    handles = [layer.mlp.gate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    tokens = torch.zeros(len(texts))
    try:
        for d, domain_texts_ in enumerate(texts.values()):
            for start in range(0, len(domain_texts_), batch_size):
                enc = tok(domain_texts_[start:start + batch_size], return_tensors="pt", padding=True)
                state.update(domain=d, keep=enc["attention_mask"].flatten().bool())
                model(**enc)
                tokens[d] += enc["attention_mask"].sum()
    finally:
        for h in handles:
            h.remove()
    return counts / tokens[None, :, None]


def plot(freq: torch.Tensor, domains: list[str], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = freq.shape[0]
    fig, axes = plt.subplots(n_layers, 1, figsize=(10, 1.2 + 1.1 * n_layers), squeeze=False)
    for layer, ax in enumerate(axes[:, 0]):
        im = ax.imshow(freq[layer].numpy(), aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(domains)), domains)
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_xticks(range(0, freq.shape[2], 4))
        fig.colorbar(im, ax=ax, pad=0.01)
    axes[-1, 0].set_xlabel("expert")
    fig.suptitle("Toy MoE: fraction of each domain's tokens routed to each expert (top-k)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=HERE / "checkpoint")
    p.add_argument("--out", type=Path, default=HERE / "expert_heatmap.png")
    args = p.parse_args()
    torch.set_num_threads(1)  # tiny matrices: a second thread only helps on an idle machine
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    texts = domain_texts()
    freq = routing_frequencies(model, tok, texts)
    plot(freq, list(texts), args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
