"""Block fine-tuning: JSONL data, the block-mask collator, the training loop and a synthetic RAG task.

Import explicitly (``import blockrag.train``); ``import blockrag`` never imports training code or peft.
"""

from blockrag.train.collator import IGNORE_INDEX, BlockCollator, CopyRatio, make_copy
from blockrag.train.data import (
    ChatRecord,
    DataError,
    RAGRecord,
    Sample,
    load_jsonl,
    load_template,
    render,
    render_all,
    save_template,
)
from blockrag.train.trainer import LoraSettings, StepLog, TrainConfig, Trainer, TrainResult

__all__ = [
    "IGNORE_INDEX",
    "BlockCollator",
    "ChatRecord",
    "CopyRatio",
    "DataError",
    "LoraSettings",
    "RAGRecord",
    "Sample",
    "StepLog",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "load_jsonl",
    "load_template",
    "make_copy",
    "render",
    "render_all",
    "save_template",
]
