"""The embedded model (SmolLM2-135M-Instruct) on a GPU in every dtype a user picks.

For bfloat16, float16 and float32 on CUDA: the engine loads (its construction-time RoPE probe passes; the layer-0
re-encoding error is printed), block-mode logits are within the dtype's bound of the independent block-masked
reference (tests/reference.py) in the same dtype while un-rotated cached keys are not (negative control), and the
example knowledge base's questions are answered in block mode, block + recovery (``recompute="recommended"``)
and full mode, with the facts found counted.

Two steps, because the GPU machine has no FAISS or sentence-transformers index of the examples:

    # here, with the example KB: the passages the demo retrieves for each question (k = 4)
    python benchmarks/gpu_real_model.py passages --out passages.json
    # on the GPU machine
    python benchmarks/gpu_real_model.py run --model SmolLM2-135M-Instruct.Q4_1.gguf --passages passages.json \
        --out results.json

Prints a table and ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

# tests/reference.py: the independent block-masked forward; tests/test_real_model.py: its passages and question
# (the answer is in the last passage) and the example KB's questions with the strings that make an answer correct
from reference import reference_logits  # noqa: E402
from test_real_model import FACTS, PASSAGES, QUESTION  # noqa: E402

from blockrag import BlockEngine, Passage  # noqa: E402
from blockrag.rope import reencoding_error  # noqa: E402

# Block logits vs the reference in the same dtype, relative to the largest reference logit (STYLE.md's
# per-dtype tolerances); the negative control must be outside 3x the bound.
RTOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}
MODES = (("block", {}), ("block + recovery", {"recompute": "recommended"}), ("full", {"mode": "full"}))


def passages(args) -> int:
    """Write the passages the example KB retrieves for each question (k = args.k) as JSON."""
    import tempfile

    from blockrag.index import KnowledgeBase

    engine = BlockEngine.from_pretrained(args.model, device="cpu")
    data = ROOT / "examples" / "data" / "calder_fell"
    with tempfile.TemporaryDirectory() as tmp:
        kb = KnowledgeBase.create(Path(tmp) / "kb", engine)
        kb.add_paths([data])
        out = [{"question": q, "facts": list(facts),
                "passages": [{"text": h.text, "title": h.title} for h in kb.search(q, k=args.k)]}
               for q, facts in FACTS]
        kb.close()
    Path(args.out).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {len(out)} questions with {args.k} passages each to {args.out}")
    return 0


def check_dtype(model: str, dtype: torch.dtype, questions: list[dict], max_new_tokens: int, device: str) -> dict:
    start = time.perf_counter()
    engine = BlockEngine.from_pretrained(model, device=device, dtype=dtype)  # the probe runs here
    row: dict = {"dtype": str(dtype).removeprefix("torch."), "load_s": round(time.perf_counter() - start, 1),
                 "probe_error": round(reencoding_error(engine.model, engine.rope).error, 6)}
    result = engine.prefill(PASSAGES, QUESTION)
    blocks = [list(block.token_ids) for block in result.blocks]
    expected = reference_logits(engine.model, blocks, result.final_ids)[-1].float()
    bound = RTOL[dtype] * expected.abs().max().item()
    unrotated = engine.prefill(PASSAGES, QUESTION, reencode=False)
    row.update(bound=round(bound, 5),
               block_vs_reference=round((result.logits.float() - expected).abs().max().item(), 5),
               unrotated_vs_reference=round((unrotated.logits.float() - expected).abs().max().item(), 5),
               same_top_token=int(result.logits.argmax()) == int(expected.argmax()))
    row["logits_ok"] = row["block_vs_reference"] <= bound and row["unrotated_vs_reference"] > 3 * bound
    row["answers"] = {}
    for label, kwargs in MODES:
        found, ttft, answers = 0, [], []
        for item in questions:
            context = [Passage(p["text"], title=p["title"]) for p in item["passages"]]
            for _ in range(2):  # the second run is timed warm (blocks cached, kernels loaded)
                generation = engine.generate(context, item["question"], max_new_tokens=max_new_tokens, **kwargs)
            text = generation.text
            ok = any(f in text.lower() for f in item["facts"])
            found += ok
            ttft.append(generation.usage.ttft_s * 1000)
            answers.append({"question": item["question"], "answer": text, "correct": ok})
        row["answers"][label] = {"correct": found, "of": len(questions),
                                 "ttft_ms_mean": round(sum(ttft) / len(ttft), 2), "items": answers}
    del engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=ROOT).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run(args) -> int:
    import os

    questions = json.loads(Path(args.passages).read_text(encoding="utf-8"))
    rows = [check_dtype(args.model, getattr(torch, name), questions, args.max_new_tokens, args.device)
            for name in args.dtypes.split(",")]
    print("| dtype | probe error | block vs reference | bound | un-rotated (control) | facts: block | "
          "block + recovery | full | TTFT ms block / recovery / full |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        a = r["answers"]
        print(f"| {r['dtype']} | {r['probe_error']:.2e} | {r['block_vs_reference']:.4f} | {r['bound']:.4f} | "
              f"{r['unrotated_vs_reference']:.3f} | {a['block']['correct']}/{a['block']['of']} | "
              f"{a['block + recovery']['correct']}/{a['block']['of']} | {a['full']['correct']}/{a['full']['of']} | "
              + " / ".join(f"{a[m]['ttft_ms_mean']:.1f}" for m, _ in MODES) + " |")
    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    report = {"benchmark": "gpu_real_model", "device": device,
              "commit": os.environ.get("BLOCKRAG_COMMIT") or git_commit(),
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "max_new_tokens": args.max_new_tokens,
              "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}
                     | {"rows": [{k: v for k, v in r.items() if k != "answers"}
                                 | {m: r["answers"][m]["correct"] for m, _ in MODES} for r in rows]}))
    return 0 if all(r["logits_ok"] for r in rows) else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("passages", help="the passages the example KB retrieves per question (CPU)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--out", required=True)
    r = sub.add_parser("run", help="the checks on CUDA")
    r.add_argument("--model", default="smollm2-135m", help="name or GGUF path")
    r.add_argument("--passages", required=True, help="what `passages` wrote")
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtypes", default="bfloat16,float16,float32")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    return {"passages": passages, "run": run}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
