"""Why selective recompute closes only part of the block-vs-full gap: which context tokens and layers matter.

On the H200 at n=640 per set (``benchmarks/results/recovery_real_h200``), every selection at <= 20% of the passage
tokens closed only ~50-82% of the block-vs-full accuracy gap on DisflQA, QuAC and NarrativeQA. Accuracy on a few
dozen questions is too coarse to compare many selections, so this measures a continuous target on the questions
that make the gap: the teacher-forced NLL (nats per token) of full mode's own greedy answer (its H200 prediction,
re-tokenized, then EOS unless it ran to the 32-token limit) given the prompt, in full mode, in block mode and with
each selection recomputed, and per selection the fraction of the NLL gap it closes,
``(NLL_block - NLL_sel) / (NLL_block - NLL_full)`` (a ratio of means over examples; a paired bootstrap gives its
interval; the median of per-example ratios is beside it).

Examples: the H200 questions where full mode was right and block mode wrong ("gap"), and a few where both were
right ("control"), per set in sha256(id) order. Prompts are ``benchmarks/recovery_real.py``'s (the "chat" template
through ``blockrag.train.realqa.prompt_samples``: block 0 the instruction, one block per passage, the final block
with the question); the block-mode cache is the engine's (every block encoded alone by ``BlockEncoder``, keys
rotated to their offsets by ``assemble_cache``); every selection is scored by one ``recompute_prefill`` with the
answer fed at the end of the final block (``keep=``: the answer tokens' logits).

Selections, about 20% of the passage tokens unless named otherwise:

* ``deviation:R@L`` -- CacheBlend at check layer L. Its scores are read off the full pass (a causal prefill's
  context KV does not depend on what follows it) with ``blockrag.recompute.deviation_scores``'s formula, at every
  layer at once; every example checks the layer-1 selection against ``select_positions("deviation:0.2")``;
* ``query:0.2``, ``first:K`` (K = 1, 4, 16; ``select_positions``), ``first:4+deviation:0.16``;
* position controls: ``heads:R`` / ``tails:0.2`` (the first R / last 20% of every passage's tokens), ``random:0.2``
  (seeded by the example);
* oracles: ``gold`` (the whole gold passage, ~1/k of the tokens), ``distractors`` (every other passage),
  ``deviation:0.2 in gold`` (deviation:0.2's own picks that fall in the gold passage);
* ``query passage``: the whole passage the question attends to most at layer 1 in block mode (practical);
* ``prefix``, ``prefix+deviation:0.2[@16]``: not a selection but a diagnostic of another block encoding: passage
  i encoded as [block 0, passage i] at positions 0..T0+T_i-1 (block 0, the instruction, is the same in every
  prompt, so this is still precomputable per passage), its keys then moved to its offset; it still sees no other
  passage. Alone, and with deviation:0.2 recomputed over it. It tests whether the deviation at passage starts comes
  from each passage starting a sequence of its own (an attention sink).

``minus deviation:0.2`` is the paired difference of gap closed from deviation:0.2's, over the same resamples.

Per layer it also reports the KV deviation of block mode from full attention: relative L2 of keys and values per
passage token, and how concentrated it is (in the first 4 tokens of every passage, in the top 20% of tokens).

    python benchmarks/recovery_why.py                   # CPU, the defaults: 3 + 1 per set, ~22 minutes on 2 cores
    python benchmarks/recovery_why.py --sets disflqa --per-set 2 --control-per-set 0 --out /tmp/why.json  # ~1 min

Prints a table and ends with one JSON line; writes ``--out`` (JSON) and the tables beside it (.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from finetune_real import git_commit, log, read_jsonl  # noqa: E402

from blockrag.assemble import assemble_cache  # noqa: E402
from blockrag.decode import eos_ids  # noqa: E402
from blockrag.encoder import BlockEncoder  # noqa: E402
from blockrag.eval.report import cpu_name  # noqa: E402
from blockrag.hf import buffer_cache, forward, stacked_kv  # noqa: E402
from blockrag.recompute import block_offsets, query_scores, recompute_prefill, select_positions  # noqa: E402
from blockrag.rope import rope_spec, rotate_keys  # noqa: E402
from blockrag.template import get_template  # noqa: E402
from blockrag.train.realqa import prompt_samples  # noqa: E402

SETS = ("disflqa", "quac", "narrativeqa")
CHECK_LAYERS = (1, 2, 4, 8, 16)
RATIO = 0.2
FIRST = 4  # tokens per passage counted as "first" (first:4; the attention sinks)
MAX_NEW_TOKENS = 32  # the H200 run's limit: an answer that long was cut, not ended by EOS
REFERENCE = "deviation:0.2"  # the selection every other is compared with, paired
PREDICTIONS_MODEL = "model.gguf"  # the H200 run's label of SmolLM2-135M-Instruct Q4_1 (smollm2-135m here)


class Prompt(NamedTuple):
    """One example as the model sees it."""

    source: str
    id: str
    group: str  # "gap" (full right, block wrong on the H200) or "control" (both right)
    lengths: list[int]  # tokens per context block, block 0 (the instruction) first
    context: list[int]  # the N context ids, blocks concatenated
    final: list[int]  # the final block (question + assistant header)
    answer: list[int]  # full mode's H200 answer, re-tokenized (+ EOS if it ended there)
    gold: int  # the gold passage's block index (1..k)


# --- examples ---------------------------------------------------------------------------------------------------


def order_key(example_id: str) -> str:
    return hashlib.sha256(example_id.encode("utf-8")).hexdigest()


def choose(examples: Sequence[dict], predictions: Sequence[dict], per_set: int, control_per_set: int,
           sets: Sequence[str] = SETS) -> list[tuple[dict, str, str]]:
    """(example, group, full mode's prediction) for the first ``per_set`` gap and ``control_per_set`` control
    questions of every set, in sha256(id) order."""
    modes: dict[tuple[str, str], dict[str, dict]] = {}
    for row in predictions:
        if row["model"] == PREDICTIONS_MODEL:
            modes.setdefault((row["source"], row["id"]), {})[row["mode"]] = row
    chosen = []
    for source in sets:
        rows = sorted((e for e in examples if e["source"] == source), key=lambda e: order_key(e["id"]))
        for group, block_right, count in (("gap", 0.0, per_set), ("control", 1.0, control_per_set)):
            fits = [e for e in rows if (m := modes.get((source, e["id"]))) and m["full"]["accuracy"] == 1.0
                    and m["block"]["accuracy"] == block_right]
            chosen += [(e, group, modes[(source, e["id"])]["full"]["prediction"]) for e in fits[:count]]
    return chosen


def build_prompts(chosen, template, tokenizer, eos: int) -> list[Prompt]:
    samples = prompt_samples([e for e, _, _ in chosen], template, tokenizer)
    prompts = []
    for (example, group, prediction), sample in zip(chosen, samples):
        assert len(sample.blocks) == len(example["passages"]) + 1, "expected block 0 and one block per passage"
        answer = tokenizer.encode(prediction, add_special_tokens=False)
        answer = answer + [eos] if len(answer) < MAX_NEW_TOKENS else answer
        prompts.append(Prompt(example["source"], example["id"], group, [len(b) for b in sample.blocks],
                              [t for b in sample.blocks for t in b], list(sample.final), answer,
                              example["gold_index"] + 1))
    return prompts


# --- measurements -----------------------------------------------------------------------------------------------


def spans(lengths: Sequence[int]) -> list[range]:
    """Context positions of every block."""
    return [range(start, start + n) for start, n in zip(block_offsets(lengths), lengths)]


def answer_nll(logits: Tensor, answer: Sequence[int]) -> float:
    """Mean NLL (nats per token) of ``answer`` under (A, V) logits, row i predicting answer[i]."""
    return F.cross_entropy(logits.float(), torch.tensor(list(answer), device=logits.device)).item()


@torch.inference_mode()
def full_pass(model, prompt: Prompt) -> tuple[float, tuple[list[Tensor], list[Tensor]]]:
    """(full mode's answer NLL, its per-layer (1, H, T, D) keys and values; the first N are the context's)."""
    device = next(model.parameters()).device
    ids = torch.tensor([prompt.context + prompt.final + prompt.answer[:-1]], device=device)
    logits, cache = forward(model, ids, logits_to_keep=len(prompt.answer))
    return answer_nll(logits[0], prompt.answer), stacked_kv(cache)


def block_cache(model, prompt: Prompt):
    """The engine's block-mode cache of the context: every block encoded alone, keys rotated to their offsets."""
    device = next(model.parameters()).device
    blocks = [prompt.context[r.start : r.stop] for r in spans(prompt.lengths)]
    # NOTE: token_budget=1 encodes every block in a forward of its own: no padding, half the CPU time of batches
    # padded to the longest block; the KV is the same up to rounding.
    encoded = BlockEncoder(model, fingerprint="", token_budget=1).encode(blocks, [str(i) for i in range(len(blocks))])
    cache, n = assemble_cache(encoded, rope_spec(model), model.config, device, dtype=next(model.parameters()).dtype)
    assert n == len(prompt.context)
    return cache


def prefix_cache(model, prompt: Prompt):
    """Block mode with block 0 (the instruction) as every passage's prefix: each passage encoded after block 0 and
    nothing else (it still sees no other passage), its keys moved from position T0 + j to its offset + j.

    Block 0 is the same in every prompt of a template, so such passage KV could be stored as block KV is; the
    engine does not do this (a diagnostic: does the missing prefix explain the deviation at passage starts?).
    """
    blocks = [prompt.context[r.start : r.stop] for r in spans(prompt.lengths)]
    head = len(blocks[0])
    encoded = BlockEncoder(model, fingerprint="", token_budget=1).encode(
        [blocks[0] + b for b in blocks[1:]], [str(i) for i in range(1, len(blocks))])
    inv_freq = rope_spec(model).inv_freq
    keys = [encoded[0].keys[:, :, :head]] + [rotate_keys(e.keys[:, :, head:], r.start - head, inv_freq)
                                             for e, r in zip(encoded, spans(prompt.lengths)[1:])]
    values = [encoded[0].values[:, :, :head]] + [e.values[:, :, head:] for e in encoded]
    keys, values = torch.cat(keys, dim=2)[:, None], torch.cat(values, dim=2)[:, None]  # (L, 1, H, N, D)
    return buffer_cache(model.config, keys, values, len(prompt.context))


def prefill_nll(model, cache, prompt: Prompt, positions: Sequence[int]) -> float:
    """The answer's NLL with ``positions`` recomputed over the block-mode cache (one recompute prefill)."""
    logits, _ = recompute_prefill(model, cache, prompt.context, positions, prompt.final + prompt.answer[:-1],
                                  keep=len(prompt.answer))
    return answer_nll(logits, prompt.answer)


def kv_deviation(full: tuple[list[Tensor], list[Tensor]], block: tuple[list[Tensor], list[Tensor]],
                 n: int) -> dict[str, Tensor]:
    """Block KV against full-attention KV of the N context tokens, at every layer.

    Args:
        full, block: per-layer (1, H, T, D) keys and values (T >= N; the first N are the context).

    Returns:
        "key", "value": (L, N) ||X_full - X_block|| / ||X_full|| per token, over heads and dims;
        "score": (L, N) ``blockrag.recompute.deviation_scores`` at every layer (difference norms over the mean
        full-attention norm, keys plus values).
    """
    out: dict[str, list[Tensor]] = {"key": [], "value": [], "score": []}
    for fk, fv, bk, bv in zip(*full, *block):
        score = 0
        for name, f, b in (("key", fk, bk), ("value", fv, bv)):
            f, b = f[0, :, :n].float().transpose(0, 1).flatten(1), b[0, :, :n].float().transpose(0, 1).flatten(1)
            diff, norm = (f - b).norm(dim=-1), f.norm(dim=-1)
            out[name].append(diff / norm.clamp_min(1e-12))
            score = score + diff / norm.mean().clamp_min(1e-12)
        out["score"].append(score)
    return {k: torch.stack(v).cpu() for k, v in out.items()}


def top(scores: Tensor, candidates: Sequence[int], ratio: float) -> list[int]:
    """The ceil(ratio * len(candidates)) candidates of highest score (``select_positions``'s count)."""
    count = min(len(candidates), math.ceil(ratio * len(candidates)))
    index = torch.tensor(list(candidates))
    return sorted(index[torch.topk(scores[index], count).indices].tolist())


def selections(model, prompt: Prompt, cache, score: Tensor, seed: int) -> dict[str, list[int]]:
    """Every variant's context positions (see the module docstring); ``score``: (L, N) deviation scores."""
    blocks = spans(prompt.lengths)
    passages = blocks[1:]
    candidates = [p for r in passages for p in r]
    generator = torch.Generator().manual_seed(int(order_key(prompt.id)[:8], 16) + seed)
    shuffled = torch.tensor(candidates)[torch.randperm(len(candidates), generator=generator)]
    query = query_scores(model, cache, prompt.final, 1)
    attended = max(passages, key=lambda r: float(query[r.start : r.stop].sum()))
    chosen = {"block": []}
    chosen.update({"deviation:0.2" + (f"@{layer}" if layer != 1 else ""): top(score[layer], candidates, RATIO)
                   for layer in CHECK_LAYERS})
    chosen.update({f"deviation:{r}": top(score[1], candidates, r) for r in (0.1, 0.4, 0.6)})
    for spec in ("query:0.2", "first:1", "first:4", "first:16"):
        chosen[spec] = select_positions(model, spec, prompt.lengths, prompt.context, cache, prompt.final)
    chosen["first:4+deviation:0.16"] = sorted(set(top(score[1], candidates, 0.16))
                                              | {p for r in passages for p in r[:FIRST]})
    chosen["heads:0.2"] = [p for r in passages for p in r[: math.ceil(RATIO * len(r))]]
    chosen["tails:0.2"] = [p for r in passages for p in r[len(r) - math.ceil(RATIO * len(r)) :]]
    chosen["random:0.2"] = sorted(shuffled[: math.ceil(RATIO * len(candidates))].tolist())
    chosen["gold"] = list(blocks[prompt.gold])
    chosen["distractors"] = [p for i, r in enumerate(blocks) if i not in (0, prompt.gold) for p in r]
    chosen["deviation:0.2 in gold"] = [p for p in chosen["deviation:0.2"] if p in blocks[prompt.gold]]
    chosen["query passage"] = list(attended)
    return chosen


def kv_profile(deviation: dict[str, Tensor], prompt: Prompt) -> dict[str, list[float]]:
    """Per layer: mean relative key / value deviation over passage tokens; the deviation score's share in the
    first 4 tokens of every passage over their share of tokens; the share held by the top 20% of tokens; gold
    over distractor mean score."""
    passages = spans(prompt.lengths)[1:]
    tokens = torch.tensor([p for r in passages for p in r])
    firsts = torch.tensor([p for r in passages for p in r[:FIRST]])
    gold = torch.tensor(list(spans(prompt.lengths)[prompt.gold]))
    others = torch.tensor([p for i, r in enumerate(passages, 1) if i != prompt.gold for p in r])
    score = deviation["score"]
    mass = score[:, tokens].sum(1).clamp_min(1e-12)
    top_count = math.ceil(RATIO * len(tokens))
    return {"key": deviation["key"][:, tokens].mean(1).tolist(),
            "value": deviation["value"][:, tokens].mean(1).tolist(),
            "first4_lift": ((score[:, firsts].sum(1) / mass) / (len(firsts) / len(tokens))).tolist(),
            "top20_share": (score[:, tokens].topk(top_count, dim=1).values.sum(1) / mass).tolist(),
            "gold_over_distractors": (score[:, gold].mean(1) / score[:, others].mean(1).clamp_min(1e-12)).tolist()}


def measure(model, prompt: Prompt, seed: int, check_all: bool) -> dict:
    """Every variant's answer NLL, recomputed tokens and share in the gold passage, and the KV profiles."""
    n, passage_tokens = len(prompt.context), len(prompt.context) - prompt.lengths[0]
    gold = spans(prompt.lengths)[prompt.gold]
    full_nll, full_kv = full_pass(model, prompt)
    cache, prefixed = block_cache(model, prompt), prefix_cache(model, prompt)
    deviation = kv_deviation(full_kv, stacked_kv(cache), n)
    prefix_deviation = kv_deviation(full_kv, stacked_kv(prefixed), n)
    del full_kv
    chosen = selections(model, prompt, cache, deviation["score"], seed)
    if check_all:  # recomputing every passage token must give full mode's NLL
        chosen["all"] = [p for r in spans(prompt.lengths)[1:] for p in r]
    candidates = [p for r in spans(prompt.lengths)[1:] for p in r]
    on_prefix = {"prefix": [], **{f"prefix+{name}": top(prefix_deviation["score"][layer], candidates, RATIO)
                                  for name, layer in (("deviation:0.2", 1), ("deviation:0.2@16", 16))}}
    nll = {"full": full_nll}
    nll.update({name: prefill_nll(model, cache, prompt, positions) for name, positions in chosen.items()})
    nll.update({name: prefill_nll(model, prefixed, prompt, positions) for name, positions in on_prefix.items()})
    chosen.update(on_prefix)
    engine_choice = set(select_positions(model, "deviation:0.2", prompt.lengths, prompt.context, cache, prompt.final))
    mine = set(chosen["deviation:0.2"])
    return {"source": prompt.source, "id": prompt.id, "group": prompt.group, "passage_tokens": passage_tokens,
            "gold_tokens": len(gold), "answer_tokens": len(prompt.answer), "nll": nll,
            "recomputed": {k: len(v) / passage_tokens for k, v in chosen.items()},
            "in_gold": {k: sum(p in gold for p in v) / max(1, len(v)) for k, v in chosen.items()},
            "engine_deviation_agreement": round(len(mine & engine_choice) / max(1, len(mine | engine_choice)), 4),
            "kv": kv_profile(deviation, prompt), "kv_prefix": kv_profile(prefix_deviation, prompt)}


# --- summary ----------------------------------------------------------------------------------------------------


def gap_closed(rows: Sequence[dict], variant: str) -> float | None:
    """(mean NLL_block - mean NLL_variant) / (mean NLL_block - mean NLL_full) over ``rows``."""
    if not rows:
        return None
    mean = {m: sum(r["nll"][m] for r in rows) / len(rows) for m in ("full", "block", variant)}
    gap = mean["block"] - mean["full"]
    return (mean["block"] - mean[variant]) / gap if gap > 0 else None


def summarize(rows: Sequence[dict], *, replicates: int = 2000, seed: int = 0) -> dict:
    """Per variant and group: mean NLL, gap closed with a 95% bootstrap interval (examples resampled, the same
    resamples for every variant), per set, the median of per-example ratios (examples whose NLL gap is over 0.05
    nats), the paired difference from deviation:0.2; per layer, the mean KV profiles."""
    import numpy as np

    variants = [v for v in rows[0]["nll"] if all(v in r["nll"] for r in rows)]
    rng = np.random.default_rng(seed)

    def ci(values: list[float]) -> list[float] | None:
        return [round(float(x), 3) for x in np.percentile(values, [2.5, 97.5])] if values else None

    out: dict = {"n": {}, "variants": {}}
    for group in ("gap", "control"):
        members = [r for r in rows if r["group"] == group]
        out["n"][group] = {s: sum(r["source"] == s for r in members) for s in SETS}
        if not members:
            continue
        draws = [[members[i] for i in rng.integers(0, len(members), len(members))] for _ in range(replicates)]
        reference = [gap_closed(d, REFERENCE) for d in draws]
        for v in variants:
            closed, boot = gap_closed(members, v), [gap_closed(d, v) for d in draws]
            per_example = [(r["nll"]["block"] - r["nll"][v]) / (r["nll"]["block"] - r["nll"]["full"])
                           for r in members if r["nll"]["block"] - r["nll"]["full"] > 0.05]
            per_set = {s: gap_closed([r for r in members if r["source"] == s], v) for s in SETS}
            out["variants"].setdefault(v, {})[group] = {
                "nll": round(sum(r["nll"][v] for r in members) / len(members), 4),
                "gap_closed": None if closed is None else round(closed, 3),
                "ci": ci([c for c in boot if c is not None]),
                "minus_reference": None if closed is None else round(closed - gap_closed(members, REFERENCE), 3),
                "minus_reference_ci": ci([c - b for c, b in zip(boot, reference) if c is not None and b is not None]),
                "median_per_example": round(float(np.median(per_example)), 3) if per_example else None,
                "per_set": {s: None if c is None else round(c, 3) for s, c in per_set.items()},
                "recomputed": round(sum(r["recomputed"].get(v, 0.0) for r in members) / len(members), 4),
                "in_gold": round(sum(r["in_gold"].get(v, 0.0) for r in members) / len(members), 4)}
    for name in ("kv", "kv_prefix"):
        out[name] = {k: [round(sum(r[name][k][layer] for r in rows) / len(rows), 4)
                         for layer in range(len(rows[0][name][k]))] for k in rows[0][name]}
    gold_share = sum(r["gold_tokens"] / r["passage_tokens"] for r in rows) / len(rows)
    out["gold_share_of_passage_tokens"] = round(gold_share, 4)
    out["engine_deviation_agreement_min"] = min(r["engine_deviation_agreement"] for r in rows)
    return out


def tables(summary: dict) -> str:
    def fmt(x, spec="+.2f"):
        return "-" if x is None else format(x, spec)

    def interval(entry: dict, key: str) -> str:
        bounds = entry.get(f"{key}_ci" if key != "gap_closed" else "ci")
        return fmt(entry.get(key)) + (f" [{bounds[0]:+.2f}, {bounds[1]:+.2f}]" if bounds else "")

    n = summary["n"]
    lines = [f"gap questions (full right, block wrong on the H200): {n['gap']}; control (both right): "
             f"{n['control']}", "",
             "| variant | recomputed | in gold | NLL | gap closed [95% CI] | " + " | ".join(SETS)
             + f" | median per example | minus {REFERENCE} [95% CI] | control: NLL, gap closed |",
             "|---" * (9 + len(SETS)) + "|"]
    for name, entry in summary["variants"].items():
        gap, control = entry.get("gap", {}), entry.get("control")
        lines.append(
            f"| {name} | {100 * gap.get('recomputed', 0):.1f}% | {100 * gap.get('in_gold', 0):.0f}% | "
            f"{gap.get('nll', 0):.3f} | {interval(gap, 'gap_closed')} | "
            + " | ".join(fmt(gap.get("per_set", {}).get(s)) for s in SETS)
            + f" | {fmt(gap.get('median_per_example'))} | {interval(gap, 'minus_reference')} | "
            + (f"{control['nll']:.3f}, {fmt(control['gap_closed'])}" if control else "-") + " |")
    kv, prefix = summary["kv"], summary["kv_prefix"]
    lines += ["", "KV deviation from full attention per layer, over passage tokens (mean over examples; the gold "
              f"passage holds {100 * summary['gold_share_of_passage_tokens']:.0f}% of the passage tokens). "
              "first-4 lift: the deviation score's share in the first 4 tokens of every passage over their share of "
              "tokens; top-20% share: the share held by the 20% most deviating tokens.", "",
              "| layer | key rel. L2 | value rel. L2 | first-4 lift | top-20% share | gold / distractors | "
              "prefix: key rel. L2 | prefix: value rel. L2 | prefix: first-4 lift |", "|---" * 9 + "|"]
    layers = len(kv["key"])
    for layer in sorted({0, 1, 2, 3, 4, 6, 8, 12, 16, 20, 24, layers - 1}):
        lines.append(f"| {layer} | {kv['key'][layer]:.3f} | {kv['value'][layer]:.3f} | "
                     f"{kv['first4_lift'][layer]:.1f}x | {100 * kv['top20_share'][layer]:.0f}% | "
                     f"{kv['gold_over_distractors'][layer]:.2f} | {prefix['key'][layer]:.3f} | "
                     f"{prefix['value'][layer]:.3f} | {prefix['first4_lift'][layer]:.1f}x |")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------------------------


def device_label(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", default=str(ROOT / ".gpu/recovery/eval.jsonl.xz"))
    parser.add_argument("--predictions", default=str(ROOT / "benchmarks/results/recovery_real_h200/predictions.jsonl"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-set", type=int, default=3, help="gap questions per set")
    parser.add_argument("--control-per-set", type=int, default=1, help="control questions per set")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {SETS}")
    parser.add_argument("--seed", type=int, default=0, help="of the random control selection")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/recovery_why_cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    from blockrag.models import load

    loaded = load(args.model, device=args.device, dtype="float32", attn_implementation="sdpa")
    model, tokenizer = loaded.model, loaded.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert eos in eos_ids(model, tokenizer), "expected <|im_end|> to end the chat template's answers"
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    if not sets or any(s not in SETS for s in sets):
        raise SystemExit(f"expected --sets of {SETS}, found {args.sets!r}")
    chosen = choose(read_jsonl(Path(args.examples)), read_jsonl(Path(args.predictions)), args.per_set,
                    args.control_per_set, sets)
    prompts = build_prompts(chosen, get_template("chat", tokenizer), tokenizer, eos)
    log(f"{len(prompts)} examples; mean context {sum(len(p.context) for p in prompts) / len(prompts):.0f} tokens")
    rows = []
    for i, prompt in enumerate(prompts):
        began = time.perf_counter()
        row = measure(model, prompt, args.seed, check_all=i == 0)
        row["seconds"] = round(time.perf_counter() - began, 1)
        rows.append(row)
        log(f"{prompt.source} {prompt.id} ({prompt.group}, {len(prompt.context)} tokens, {row['seconds']} s): "
            f"full {row['nll']['full']:.3f} block {row['nll']['block']:.3f} "
            f"deviation:0.2 {row['nll']['deviation:0.2']:.3f} gold {row['nll']['gold']:.3f}")
    check = abs(rows[0]["nll"]["all"] - rows[0]["nll"]["full"])
    summary = summarize(rows)
    report = {"benchmark": "recovery_why", "model": args.model, "predictions_model": PREDICTIONS_MODEL,
              "device": device_label(args.device), "dtype": "float32", "torch": torch.__version__,
              "python": platform.python_version(), "commit": git_commit(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "settings": {"per_set": args.per_set, "control_per_set": args.control_per_set, "seed": args.seed,
                           "sets": sets, "ratio": RATIO, "check_layers": list(CHECK_LAYERS),
                           "examples": Path(args.examples).name, "predictions": Path(args.predictions).name},
              "all_minus_full_nll_first_example": round(check, 6), "wall_s": round(time.perf_counter() - start, 1),
              "summary": summary, "rows": rows}
    import transformers

    report["transformers"] = transformers.__version__
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    text = tables(summary)
    head = (f"# recovery_why: {report['device']}, {args.model} float32, commit {report['commit']}, "
            f"{report['date']}\n\n")
    out.with_suffix(".md").write_text(head + text + "\n", encoding="utf-8")
    print(text)
    print(json.dumps({"benchmark": "recovery_why", "device": report["device"], "commit": report["commit"],
                      "n": summary["n"], "wall_s": report["wall_s"], "all_minus_full_nll": report[
                          "all_minus_full_nll_first_example"],
                      "gap_closed": {v: e["gap"]["gap_closed"] for v, e in summary["variants"].items() if "gap" in e}}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
