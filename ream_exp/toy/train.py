"""Train the toy MoE (a small Qwen3-MoE) on the toy world, on CPU, and save it with its tokenizer.

    python -m ream_exp.toy.train                 # ~20 min on 2 CPU cores -> ream_exp/toy/checkpoint/
    python -m ream_exp.toy.train --steps 50 --out /tmp/toy   # a quick smoke run

The architecture keeps the paper's proportions at toy scale: 32 experts, top-4 with renormalised
top-k weights (norm_topk_prob, as Qwen3-30B-A3B: 128 experts, top-8). The load-balancing loss keeps
every expert in use, so that pruning or merging any of them costs something. After training it
prints the lm-eval scores of the toy tasks (``ream_exp.toy.quality``).
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

from ream_exp.toy import data
from ream_exp.toy.tokenizer import build_tokenizer

CHECKPOINT = Path(__file__).parent / "checkpoint"


def toy_config(vocab_size: int, tok: PreTrainedTokenizerFast) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=32, num_experts_per_tok=4, norm_topk_prob=True, decoder_sparse_step=1,
        router_aux_loss_coef=0.02, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )


def tokenizer_from_train_text(seed: int) -> PreTrainedTokenizerFast:
    rng = random.Random(f"tokenizer-{seed}")
    return build_tokenizer(data.document(d, "train", rng) for _ in range(600) for d in data.DOMAINS)


def batches(tok, rng: random.Random, batch_size: int, seq_len: int, mix: list[float]):
    """Endless batches of packed rows. Each row starts at a document's <|bos|> (as an lm-eval
    prompt does) and is filled with whole documents, the last one cut at seq_len."""
    while True:
        rows = []
        for _ in range(batch_size):
            row: list[int] = []
            while len(row) < seq_len:
                domain = rng.choices(data.DOMAINS, weights=mix)[0]
                row += tok(data.document(domain, "train", rng))["input_ids"] + [tok.eos_token_id]
            rows.append(row[:seq_len])
        yield torch.tensor(rows)


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, tok, args) -> None:
    rng = random.Random(f"train-{args.seed}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    stream = batches(tok, rng, args.batch_size, args.seq_len, args.mix)
    model.train()
    bar = tqdm(range(args.steps), desc="train", mininterval=5)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        ids = next(stream).to(args.device)
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{out.loss.item():.3f}", aux=f"{out.aux_loss.item():.3f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, default=CHECKPOINT)
    p.add_argument("--steps", type=int, default=2500)
    p.add_argument("--batch-size", type=int, default=12)
    p.add_argument("--seq-len", type=int, default=256)
    # Chosen from a small sweep (2500 steps each): 6e-3 wrecked arithmetic, 2e-3 beat 3e-3; code is
    # learnt from little data, arithmetic wants the most, so code gets the smallest share.
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--mix", type=float, nargs=3, default=[0.5, 0.35, 0.15], help="general math code")
    p.add_argument("--seed", type=int, default=0)
    # One thread: the matrices are tiny, and a second thread waiting on a busy core made a step 4x
    # slower on a shared 2-core machine (2.2 s vs 0.5 s).
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--experts-impl", default="eager",
                   help="transformers experts kernel; eager is fastest on CPU, grouped_mm on GPU")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--no-eval", action="store_true", help="skip the lm-eval scores at the end")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok = tokenizer_from_train_text(args.seed)
    # Round the vocabulary up to a multiple of 64: the BPE stops below its target on this corpus.
    config = toy_config(vocab_size=64 * math.ceil(len(tok) / 64), tok=tok)
    model = Qwen3MoeForCausalLM(config).to(args.device)
    if args.experts_impl != "eager":  # a runtime choice, not saved in the config
        model.set_experts_implementation(args.experts_impl)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, vocab {len(tok)}")
    start = time.time()
    train(model, tok, args)
    minutes = (time.time() - start) / 60
    print(f"trained {args.steps} steps in {minutes:.1f} min")
    model.eval()
    model.to("cpu", getattr(torch, args.save_dtype)).save_pretrained(args.out)
    tok.save_pretrained(args.out)
    if not args.no_eval:
        from ream_exp.toy.quality import evaluate
        print(evaluate(args.out))


if __name__ == "__main__":
    main()
