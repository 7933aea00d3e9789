"""Block fine-tuning loop: full fine-tuning or LoRA, on a CPU with tiny models or on a GPU.

Each step draws ``batch_size`` samples; the collator turns each into block and full copies (the paper: one
of each). Objectives: ``answer`` (the paper's), the mean cross-entropy over response tokens; ``distill``
(label-free), the mean KL divergence from a frozen teacher's full-attention next-token distributions (the
model before training: for LoRA the base without its adapter, else a frozen copy) to the student's, on the
final block and response positions of every copy -- block copies learn to predict as full attention does,
full copies are held where they were. Checkpoints hold what resuming needs
(trainable weights, optimizer state, RNG state, step) in safetensors and JSON; the final model is written
with ``save_pretrained`` (safetensors) together with its tokenizer and block template, ready for
``BlockEngine.from_pretrained``. LoRA adapters are merged into the final model (the adapter is kept beside it);
a LoRA run starts from a fresh adapter or from a saved one (``LoraSettings.init``).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blockrag.atomic import atomic_write
from blockrag.errors import InvalidInputError
from blockrag.hf import enable_activation_checkpointing
from blockrag.template import BlockTemplate
from blockrag.train.collator import IGNORE_INDEX, BlockCollator, CopyRatio, check_backend
from blockrag.train.data import Sample, save_template

SCHEDULES = ("cosine", "linear", "constant")
OBJECTIVES = ("answer", "distill")
TRAINING_FILE = "training.json"


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter settings (peft).

    Attributes:
        r: adapter rank.
        alpha: scaling numerator (effective scale alpha / r).
        dropout: dropout on the adapter input.
        target_modules: module names to adapt, or "all-linear".
        init: a peft adapter directory (adapter_config.json, adapter_model.safetensors; e.g. an earlier run's
            ``adapter/``) to start from instead of a fresh adapter. Its rank and alpha must be ``r`` and
            ``alpha``; its own target modules are used, ``dropout`` is this run's. The ``distill`` teacher
            stays the base model without any adapter.
    """

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str | tuple[str, ...] = "all-linear"
    init: str | None = None


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run.

    Attributes:
        output_dir: where checkpoints, the log and the final model go.
        lr: peak learning rate (AdamW).
        epochs: passes over the samples (ignored when max_steps is set).
        max_steps: optimizer steps; None derives them from epochs.
        batch_size: samples per micro-batch (each yields ``ratio.block + ratio.full`` sequences).
        grad_accum: micro-batches per optimizer step.
        warmup_ratio: fraction of steps with a linear warm-up.
        schedule: "cosine", "linear" (decay to 0) or "constant" after warm-up.
        min_lr_ratio: the decay ends at lr * min_lr_ratio.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping (0 disables).
        ratio: block:full copies per sample.
        objective: "answer" (cross-entropy on the response) or "distill" (KL to the frozen model's
            full-attention distributions on the final block and response; no labels needed).
        lora: LoRA settings, or None for full fine-tuning.
        bf16: autocast the forward to bfloat16 (CUDA); the weights stay in their dtype.
        gradient_checkpointing: recompute activations in the backward pass.
        shuffle: reshuffle samples every epoch (seeded); False keeps dataset order (curricula).
        seed: seeds data order, initialisation of adapters and dropout.
        log_every: steps between log lines.
        save_every: steps between checkpoints (0: only the final model).
        num_workers: DataLoader worker processes (rendering / generating samples).
        progress: show a progress bar.
    """

    output_dir: str
    lr: float = 2e-5
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ratio: CopyRatio = field(default_factory=CopyRatio)
    objective: str = "answer"
    lora: LoraSettings | None = None
    bf16: bool = False
    gradient_checkpointing: bool = False
    shuffle: bool = True
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (self.lr > 0, "lr > 0", self.lr),
            (self.batch_size >= 1, "batch_size >= 1", self.batch_size),
            (self.grad_accum >= 1, "grad_accum >= 1", self.grad_accum),
            (self.max_steps is None or self.max_steps >= 1, "max_steps >= 1", self.max_steps),
            (self.epochs > 0, "epochs > 0", self.epochs),
            (0 <= self.warmup_ratio < 1, "0 <= warmup_ratio < 1", self.warmup_ratio),
            (self.schedule in SCHEDULES, f"schedule in {SCHEDULES}", self.schedule),
            (self.objective in OBJECTIVES, f"objective in {OBJECTIVES}", self.objective),
            (0 <= self.min_lr_ratio <= 1, "0 <= min_lr_ratio <= 1", self.min_lr_ratio),
        ]
        for ok, rule, value in checks:
            if not ok:
                raise InvalidInputError(f"expected {rule}, found {value!r}")

    def to_json(self) -> dict:
        obj = asdict(self)
        obj["ratio"] = str(self.ratio)
        return obj


@dataclass(frozen=True)
class StepLog:
    """One logged step: mean losses over the logging window (block/full: NaN when no such copies)."""

    step: int
    loss: float
    block_loss: float
    full_loss: float
    lr: float
    elapsed_s: float


@dataclass(frozen=True)
class TrainResult:
    steps: int
    logs: tuple[StepLog, ...]
    wall_s: float
    output_dir: str

    @property
    def final_loss(self) -> float:
        return self.logs[-1].loss if self.logs else float("nan")


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """LR of optimizer step ``step`` (0-based): linear warm-up, then the configured decay."""
    warmup = int(config.warmup_ratio * total)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.schedule == "constant" or total <= warmup:
        return config.lr
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = config.min_lr_ratio
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if config.schedule == "cosine" else 1 - progress
    return config.lr * (floor + (1 - floor) * shape)


def response_loss(logits: Tensor, labels: Tensor, columns: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-row summed cross-entropy of next-token predictions and per-row token counts.

    Args:
        logits: (B, N, V) logits, or (B, K, V) logits of the positions ``columns`` only.
        labels: (B, N) target ids, IGNORE_INDEX where there is no loss; position i is predicted at i - 1.
        columns: (K,) positions the logits were kept at (see ``predicting_columns``); None: all positions.
    """
    if columns is None:
        logits, targets = logits[:, :-1], labels[:, 1:]
    else:
        targets = labels[:, columns + 1]
    ce = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return ce.sum(1), (targets != IGNORE_INDEX).sum(1)


def predicting_columns(labels: Tensor) -> Tensor:
    """(K,) positions whose next token carries a label in any row of a (B, N) label batch.

    NOTE: the loss needs logits only there (the response: tens of tokens of a ~2K-token RAG prompt), so the
    forward keeps only these columns (``logits_to_keep``) instead of a (B, N, V) tensor of vocabulary logits.
    """
    return (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)


def distill_loss(student: Tensor, teacher: Tensor, mask: Tensor, teacher_row: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row summed KL(teacher || student) of next-token distributions over masked positions, and counts.

    Args:
        student: (B, N, V) student logits.
        teacher: (S, N, V) teacher logits, one row per sample.
        mask: (B, N) positions to compare.
        teacher_row: (B,) the teacher row of every student row.
    """
    rows, cols = mask.nonzero(as_tuple=True)
    log_p = F.log_softmax(teacher[teacher_row[rows], cols].float(), dim=-1)
    log_q = F.log_softmax(student[rows, cols].float(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    sums = torch.zeros(mask.shape[0], dtype=kl.dtype, device=kl.device).index_add(0, rows, kl)
    return sums, mask.sum(1)


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Atomic, durable safetensors write (temp file, fsync, rename, fsync the directory)."""
    from safetensors.torch import save

    atomic_write(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, str]]:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": json.dumps(state["param_groups"])}


def _load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    state: dict[int, dict[str, Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        groups = json.loads(f.metadata()["param_groups"])
        for key in f.keys():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = f.get_tensor(key)
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class Trainer:
    """Fine-tunes a causal LM on samples with block and full copies.

    Args:
        model: a transformers causal LM with rotary position embeddings, loaded with attn_implementation
            "sdpa" or "eager", on the device to train on.
        tokenizer: its tokenizer (saved with the final model).
        config: the run's settings.
        template: the BlockTemplate the samples were rendered with (saved with the final model).
    """

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig, *, template: BlockTemplate | None = None
                 ) -> None:
        check_backend(model)
        self.config = config
        self.tokenizer = tokenizer
        self.template = template
        self.output_dir = Path(config.output_dir)
        torch.manual_seed(config.seed)
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.teacher: nn.Module | None = None
        if config.objective == "distill" and config.lora is None:
            import copy

            self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        self.model = self._wrap_lora(model) if config.lora is not None else model
        self.collator = BlockCollator.for_model(model, tokenizer, config.ratio,
                                                teacher=config.objective == "distill")
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise InvalidInputError("expected trainable parameters, found none")
        fused = {"fused": True} if params[0].device.type == "cuda" else {}
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, **fused)
        self.step = 0

    def _wrap_lora(self, model: nn.Module) -> nn.Module:
        try:
            from peft import LoraConfig, PeftModel, get_peft_model
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("LoRA needs peft: pip install 'blockrag[train]'") from e
        lora = self.config.lora
        if lora.init is not None:
            check_adapter(lora)
            config = LoraConfig.from_pretrained(lora.init)
            config.lora_dropout = lora.dropout  # a training setting: this run's, not the saved run's
            # NOTE: peft copies the saved weights into adapter parameters of the model's dtype (float32 for a
            # float32 model), so a float16 export trains like the float32 original.
            return PeftModel.from_pretrained(model, lora.init, is_trainable=True, config=config)
        targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
        return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=targets, task_type="CAUSAL_LM"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # --- one step ----------------------------------------------------------------------------------

    def _teacher_logits(self, inputs: dict[str, Tensor], columns: Tensor) -> Tensor:
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.config.bf16):
            if self.teacher is not None:
                return self.teacher(**inputs, use_cache=False, logits_to_keep=columns).logits
            with self.model.disable_adapter():  # LoRA: the base model is the teacher
                return self.model(**inputs, use_cache=False, logits_to_keep=columns).logits

    def loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        """Mean loss of a collated batch (see ``objective``), with block-copy and full-copy means."""
        device = self.device
        names = ("input_ids", "attention_mask", "position_ids")
        inputs = {k: batch[k].to(device, non_blocking=True) for k in names}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.config.bf16)
        if self.config.objective == "distill":
            mask = batch["tail_mask"].to(device)
            columns = mask.any(0).nonzero().squeeze(1)  # logits only where the KL compares them
            teacher = self._teacher_logits({k: batch["teacher"][k].to(device, non_blocking=True) for k in names},
                                           columns)
            with autocast:
                logits = self.model(**inputs, use_cache=False, logits_to_keep=columns).logits
            sums, counts = distill_loss(logits, teacher, mask[:, columns], batch["teacher_row"].to(device))
        else:
            labels = batch["labels"].to(device, non_blocking=True)
            columns = predicting_columns(labels)
            with autocast:
                logits = self.model(**inputs, use_cache=False, logits_to_keep=columns).logits
            sums, counts = response_loss(logits, labels, columns)
        loss = sums.sum() / counts.sum().clamp_min(1)
        parts = {}
        block = batch["block_copy"].to(device)
        for name, rows in (("block", block), ("full", ~block)):
            n = counts[rows].sum()
            parts[name] = float(sums[rows].sum().detach() / n) if n > 0 else float("nan")
        return loss, parts

    def train_step(self, micro_batches: Sequence[dict[str, Tensor]], lr: float) -> dict[str, float]:
        """One optimizer step over micro-batches (gradients averaged)."""
        self.model.train()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        totals = {"loss": 0.0, "block": 0.0, "full": 0.0}
        for batch in micro_batches:
            loss, parts = self.loss(batch)
            (loss / len(micro_batches)).backward()
            totals["loss"] += float(loss.detach()) / len(micro_batches)
            for name in ("block", "full"):
                totals[name] += parts[name] / len(micro_batches)
        if self.config.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return totals

    # --- the loop ----------------------------------------------------------------------------------

    def total_steps(self, num_samples: int) -> int:
        if self.config.max_steps is not None:
            return self.config.max_steps
        per_epoch = math.ceil(num_samples / (self.config.batch_size * self.config.grad_accum))
        return max(1, math.ceil(self.config.epochs * per_epoch))

    def _order(self, num_samples: int, epoch: int) -> list[int]:
        if not self.config.shuffle:
            return list(range(num_samples))
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(num_samples, generator=generator).tolist()

    def _batch_indices(self, num_samples: int, first: int, count: int):
        """Index lists of micro-batches first..first+count-1; each epoch is one seeded permutation."""
        size = self.config.batch_size
        per_epoch = num_samples // size  # the last partial batch of an epoch is dropped
        epoch, order = -1, []
        for b in range(first, first + count):
            e, within = divmod(b, per_epoch)
            if e != epoch:
                epoch, order = e, self._order(num_samples, e)
            yield order[within * size : (within + 1) * size]

    def _micro_batches(self, dataset, start_step: int, total: int):
        """Collated micro-batches from optimizer step ``start_step`` on, in a fixed (seeded) order."""
        n = len(dataset)
        if n < self.config.batch_size:
            raise InvalidInputError(f"expected at least batch_size={self.config.batch_size} samples, found {n}")
        accum = self.config.grad_accum
        indices = list(self._batch_indices(n, start_step * accum, (total - start_step) * accum))
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=indices, collate_fn=self.collator, num_workers=self.config.num_workers,
            pin_memory=self.device.type == "cuda", worker_init_fn=_seed_worker if self.config.num_workers else None,
        )
        return iter(loader)

    def fit(self, dataset: Sequence[Sample], *, resume_from: str | Path | None = None,
            on_log: Callable[[StepLog], None] | None = None, save_final: bool = True) -> TrainResult:
        """Train on ``dataset`` (a sequence of Samples, e.g. a list or a map-style torch Dataset).

        Args:
            resume_from: a checkpoint directory (or an output directory: its latest checkpoint); training
                continues at the checkpoint's step with the same data order.
            on_log: called with every StepLog.
            save_final: write the servable model to ``output_dir`` at the end.
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        total = self.total_steps(len(dataset))
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        if self.step >= total:
            raise InvalidInputError(f"expected a checkpoint before the last step {total}, found step {self.step}")
        batches = self._micro_batches(dataset, self.step, total)
        logs: list[StepLog] = []
        window: list[dict[str, float]] = []
        start = time.perf_counter()
        bar = _progress(total, self.step, self.config.progress)
        log_path = self.output_dir / "train_log.jsonl"
        with log_path.open("a", encoding="utf-8") as log_file:
            while self.step < total:
                lr = learning_rate(self.step, total, self.config)
                micro = [next(batches) for _ in range(self.config.grad_accum)]
                window.append(self.train_step(micro, lr))
                bar.update(1)
                if self.step % self.config.log_every == 0 or self.step == total:
                    entry = _summarise(window, self.step, lr, time.perf_counter() - start)
                    window = []
                    logs.append(entry)
                    log_file.write(json.dumps(asdict(entry)) + "\n")
                    log_file.flush()
                    bar.set_postfix(loss=f"{entry.loss:.4f}", lr=f"{lr:.2e}")
                    if on_log is not None:
                        on_log(entry)
                if self.config.save_every and self.step % self.config.save_every == 0 and self.step < total:
                    self.save_checkpoint()
        bar.close()
        if save_final:
            self.save_final()
        return TrainResult(steps=self.step, logs=tuple(logs), wall_s=time.perf_counter() - start,
                           output_dir=str(self.output_dir))

    # --- saving --------------------------------------------------------------------------------------

    def checkpoint_dir(self, step: int | None = None) -> Path:
        return self.output_dir / "checkpoints" / f"step-{self.step if step is None else step:08d}"

    def save_checkpoint(self) -> Path:
        """Trainable weights, optimizer and RNG state, and the step: what ``fit(resume_from=...)`` needs."""
        path = self.checkpoint_dir()
        path.mkdir(parents=True, exist_ok=True)
        weights = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        save_safetensors(weights, path / "trainable.safetensors")
        tensors, metadata = _optimizer_tensors(self.optimizer)
        save_safetensors(tensors, path / "optimizer.safetensors", metadata)
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_safetensors(rng, path / "rng.safetensors")
        state = {"step": self.step, "config": self.config.to_json()}
        atomic_write(path / "trainer_state.json", (json.dumps(state, indent=2) + "\n").encode())
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        path = latest_checkpoint(path)
        state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        saved = load_file(str(path / "trainable.safetensors"))
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        if set(saved) != set(params):
            missing, extra = sorted(set(params) - set(saved))[:3], sorted(set(saved) - set(params))[:3]
            raise InvalidInputError(f"expected the checkpoint at {path} to hold this model's trainable weights, "
                                    f"found missing {missing} and unexpected {extra}; resume with the same "
                                    "model and --lora settings")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name].to(p.device, p.dtype))
        _load_optimizer(self.optimizer, path / "optimizer.safetensors")
        rng = load_file(str(path / "rng.safetensors"))
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        self.step = int(state["step"])

    def servable_model(self) -> nn.Module:
        """The plain transformers model to serve (LoRA merged in)."""
        if self.config.lora is None:
            return self.model
        return self.model.merge_and_unload()

    def save_final(self) -> Path:
        """Write the servable model (safetensors), tokenizer, template and training settings to output_dir."""
        out = self.output_dir
        if self.config.lora is not None:
            self.model.save_pretrained(str(out / "adapter"))
            self.model = self.servable_model()
        self.model.save_pretrained(str(out))
        self.tokenizer.save_pretrained(str(out))
        if self.template is not None:
            save_template(self.template, out)
        info = {"steps": self.step, "config": self.config.to_json()}
        (out / TRAINING_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        return out


def check_adapter(lora: LoraSettings) -> None:
    """Refuse ``lora.init`` unless it is a saved LoRA adapter with ``lora``'s rank and alpha."""
    folder = Path(lora.init)
    missing = [name for name in ("adapter_config.json", "adapter_model.safetensors") if not (folder / name).is_file()]
    if missing:
        raise InvalidInputError(f"expected a peft adapter directory (adapter_config.json, adapter_model.safetensors) "
                                f"at {folder}, found no {' or '.join(missing)}; pass the folder that the adapter's "
                                "save_pretrained wrote")
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    found = (saved.get("peft_type"), saved.get("r"), saved.get("lora_alpha"))
    if found != ("LORA", lora.r, lora.alpha):
        raise InvalidInputError(f"expected the adapter at {folder} to be LoRA with r={lora.r}, alpha={lora.alpha} "
                                f"(the LoRA settings), found peft_type={found[0]}, r={found[1]}, alpha={found[2]}; "
                                "set the LoRA rank and alpha to the adapter's")


def latest_checkpoint(path: str | Path) -> Path:
    """``path`` itself if it is a checkpoint, else the newest ``checkpoints/step-*`` under it."""
    path = Path(path)
    if (path / "trainer_state.json").is_file():
        return path
    found = sorted((path / "checkpoints").glob("step-*"))
    found = [p for p in found if (p / "trainer_state.json").is_file()]
    if not found:
        raise InvalidInputError(f"expected a checkpoint (trainer_state.json) at {path} or under "
                                f"{path / 'checkpoints'}, found none")
    return found[-1]


def _summarise(window: list[dict[str, float]], step: int, lr: float, elapsed: float) -> StepLog:
    def mean(key: str) -> float:
        values = [w[key] for w in window if not math.isnan(w[key])]
        return sum(values) / len(values) if values else float("nan")

    return StepLog(step=step, loss=mean("loss"), block_loss=mean("block"), full_loss=mean("full"), lr=lr,
                   elapsed_s=round(elapsed, 3))


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    random.seed(seed)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="finetune", unit="step", dynamic_ncols=True)
