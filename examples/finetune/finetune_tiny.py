"""Block fine-tuning end to end on a CPU in seconds: JSONL -> ``blockrag finetune`` -> BlockEngine in block mode.

The model is a tiny random Llama (``blockrag.testing``), so the answers are noise; every step is the real one.
For a real model replace ``--model`` with its directory (or Hub name) and see the README section
"Make your model block-ready" for settings.

    python examples/finetune/finetune_tiny.py [WORKDIR]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECORDS = [
    {"passages": [{"title": "Paris", "text": "Paris is the capital of France."},
                  "The Seine flows through Paris."],
     "question": "What is the capital of France?", "answer": "Paris."},
    {"instruction": "Answer in one word.",
     "passages": ["Rotary embeddings rotate keys by position.", "The quick brown fox jumps."],
     "question": "What rotates keys?", "answer": "Rotary embeddings."},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Notes:\n\nThe fox jumps.\n\nThe dog sleeps.\n\nWho jumps?"},
                  {"role": "assistant", "content": "The fox."}]},
    {"messages": [{"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
                  {"role": "user", "content": "What did I say?"}, {"role": "assistant", "content": "Hello."}]},
]


def main(workdir: Path) -> None:
    from blockrag import BlockEngine
    from blockrag.testing import tiny_pipeline
    from blockrag.train import load_template

    base, out, data = workdir / "base", workdir / "block-ready", workdir / "train.jsonl"
    model, tokenizer = tiny_pipeline("llama")
    model.save_pretrained(base)  # safetensors
    tokenizer.save_pretrained(base)
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS), encoding="utf-8")

    subprocess.run([sys.executable, "-m", "blockrag.cli", "finetune", "--model", str(base), "--data", str(data),
                    "--output-dir", str(out), "--template", "chat", "--ratio", "1:1", "--max-steps", "8",
                    "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--log-every", "2"], check=True)

    engine = BlockEngine.from_pretrained(str(out), device="cpu", template=load_template(out))
    generation = engine.generate(["Paris is the capital of France."], "What is the capital of France?",
                                 max_new_tokens=8)
    print(f"block mode: {generation.usage.cached_tokens + generation.usage.encoded_tokens} context tokens from "
          f"blocks, {generation.usage.prefilled_tokens} prefilled; text (noise, tiny random model): "
          f"{generation.text!r}")
    log = (out / "train_log.jsonl").read_text().splitlines()
    print("losses:", [round(json.loads(line)["loss"], 3) for line in log])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            main(Path(tmp))
