"""The training loop: AdamW with warmup-cosine, gradient clipping and accumulation, held-out evaluation,
checkpoints, exact resume, signals, data parallelism.

Exactness: a step's batch comes from the `BatchStream` position and its noise from a generator seeded by
(seed, step); the learning rate is a function of the step. So N steps straight, and N/2 steps + `--resume` +
N/2 steps, produce the same weights, and so do 1 and 2 processes up to float summation order, with replicated
or sharded (`--fsdp`, `dgemma.train.sharded`) weights.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..api import DiffusionGemma
from ..config import ConfigError
from ..tokenizer import FILL_TOKEN, Tokenizer
from .base import load_base
from .batches import Batch, BatchStream, derive_seed, make_rows
from .checkpoint import OPTIMIZER_FILE, TrainerState, last_checkpoint, save_checkpoint
from .config import RESUME_FIXED, TrainConfig
from .data import DataError, read_records, split_records, tokenize
from .distributed import Distributed
from .lora import adapter_base, add_lora, attach_adapter, load_adapter, merge_lora
from .objective import SUM_KEYS, CanvasPlan, LossTotals, TrainingStep, plan_canvases
from .optim import build_optimizer, set_lr, warmup_cosine
from .report import CURVE_FILE, Reporter
from .sharded import autocast, shard
from .sharded_checkpoint import export, load_sharded, save_sharded

log = logging.getLogger(__name__)

TRAIN_STREAM, EVAL_STREAM = 0, 1


class StopSignals:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and save); a second signal stops at once."""

    def __enter__(self) -> "StopSignals":
        self.requested = False
        self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum: int, frame: object) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)
        self.requested = True
        log.warning("stopping after this step (a checkpoint is saved); signal again to abort at once")

    def __exit__(self, *exc: object) -> None:
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def load_rows(cfg: TrainConfig, tokenizer: Tokenizer) -> tuple[Batch, Batch]:
    """(training rows, held-out rows): `eval_data` is held out whole (and never trained on), and a hashed
    `holdout_frac` of `data` besides."""
    records = list(read_records(cfg.data, cfg.ext, exclude=cfg.eval_data))
    if not records and cfg.eval_data:
        raise DataError("every --data input is also under --eval-data, which is held out whole: nothing is left "
                        "to train on")
    train, held = split_records(records, cfg.holdout_frac)
    held += read_records(cfg.eval_data, cfg.ext)
    if not train:
        raise DataError("every example fell into the held-out split: lower --holdout-frac or add data")
    pad = tokenizer.pad_id
    rows = [make_rows([tokenize(r, tokenizer) for r in part], cfg.seq_len, pad, cfg.pack) for part in (train, held)]
    log.info("data: %d training rows (%d tokens), %d held-out rows", len(rows[0]), rows[0].real_tokens, len(rows[1]))
    return rows[0], rows[1]


@dataclass
class InfillIds:
    """The token ids infill canvases need: the filler, and the tokens whose text begins with a line break."""

    fill: int
    newlines: torch.Tensor  # [N] long

    @classmethod
    def of(cls, tokenizer: Tokenizer, vocab_size: int) -> "InfillIds":
        fill = tokenizer.token_to_id(FILL_TOKEN)
        if fill is None or not 0 <= fill < vocab_size:
            raise ConfigError(f"--infill-prob needs a tokenizer with the filler token {FILL_TOKEN} (dgemma "
                              "tokenizers have it at id 4: `dgemma tokenizer train`, or the byte tokenizer)")
        n = min(tokenizer.vocab_size, vocab_size)
        texts = tokenizer.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        return cls(fill, torch.tensor([i for i, text in enumerate(texts) if text.startswith("\n")], dtype=torch.long))


def _plan(batch: Batch, model: DiffusionGemma, cfg: TrainConfig, infill: InfillIds | None,
          *seed_parts: int) -> CanvasPlan:
    text = model.config.text_config
    g = torch.Generator().manual_seed(derive_seed(cfg.seed, *seed_parts))
    if cfg.infill_prob > 0 and infill is None:
        infill = InfillIds.of(model.tokenizer, text.vocab_size)
    return plan_canvases(batch, model.config.canvas_length, text.vocab_size, text.pad_token_id, g,
                         self_cond_prob=cfg.self_cond_prob, infill_prob=cfg.infill_prob,
                         fill_id=infill.fill if infill else None, newline_ids=infill.newlines if infill else None)


def _run_batch(step: TrainingStep, batch: Batch, plan: CanvasPlan, cfg: TrainConfig, dist: Distributed,
               backward: bool) -> dict[str, float]:
    """This process's rows of a global batch, `cfg.accum` micro-batches at a time (gradients accumulate when
    `backward`); returns the global batch's losses.

    Sharded, every process runs every pass (each gathers the weights from all of them): whether the
    self-conditioning pass runs is the global batch's choice, and a process without rows in a micro-batch (the
    last held-out batch may be short; training batches are divided evenly) runs one stand-in row, not counted."""
    totals = LossTotals.of(batch, plan)
    sums = {k: torch.zeros((), dtype=torch.float64) for k in SUM_KEYS}
    first_pass = bool(plan.self_cond.any()) if dist.sharded else None
    for rows in dist.my_rows(len(batch)).tensor_split(cfg.accum):
        counted = rows.numel() > 0
        if not counted:
            if not dist.sharded:
                continue
            if backward:
                raise AssertionError("sharded training needs rows on every process (TrainConfig.validate)")
            rows = torch.zeros(1, dtype=torch.long)
        precision = (autocast(cfg, dist.device) if dist.sharded else
                     torch.autocast(dist.device.type, dtype=torch.bfloat16, enabled=dist.device.type == "cuda"))
        with precision:
            loss, part = step(batch.rows(rows).to(dist.device), plan.rows(rows).to(dist.device), totals, first_pass)
        if backward:
            loss.backward()
        if counted:
            for k, v in part.items():
                sums[k] += v.double().cpu()
    totals_all = dist.sum(sums)
    diffusion = totals_all["diffusion_sum"] / max(totals_all["canvas_tokens"], 1)
    ar = totals_all["ar_sum"] / max(totals_all["ar_tokens"], 1)
    metrics = {"loss": cfg.diffusion_weight * diffusion + cfg.ar_weight * ar, "diffusion_loss": diffusion,
               "ar_loss": ar}
    if cfg.diffusion_weight == 0:  # AR only: the decoder never ran, there is no diffusion loss to report
        del metrics["diffusion_loss"]
    return metrics


def train_step(step: TrainingStep, batch: Batch, plan: CanvasPlan, optimizer: torch.optim.Optimizer,
               params: list[torch.nn.Parameter], lr: float, cfg: TrainConfig, dist: Distributed) -> dict[str, float]:
    metrics = _run_batch(step, batch, plan, cfg, dist, backward=True)
    dist.sum_gradients(params)
    grad_norm = dist.clip_gradients(params, cfg.clip)
    set_lr(optimizer, lr)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**metrics, "grad_norm": grad_norm, "lr": lr}


@torch.no_grad()
def evaluate(model: DiffusionGemma, step: TrainingStep, rows: Batch, cfg: TrainConfig, dist: Distributed,
             infill: InfillIds | None = None) -> dict[str, float]:
    """Mean loss over the first `eval_batches` batches of held-out rows, with the same noise every time (and the
    same mix of plain and infill canvases as training)."""
    totals: dict[str, float] = {}
    n_batches = 0
    for i, start in enumerate(range(0, min(len(rows), cfg.eval_batches * cfg.batch_size), cfg.batch_size)):
        batch = rows.rows(torch.arange(start, min(start + cfg.batch_size, len(rows))))
        plan = _plan(batch, model, cfg, infill, EVAL_STREAM, i)
        for k, v in _run_batch(step, batch, plan, cfg, dist, backward=False).items():
            totals[k] = totals.get(k, 0.0) + v
        n_batches += 1
    return {f"eval_{k}": v / n_batches for k, v in totals.items()}


def _check_resume(state: TrainerState, cfg: TrainConfig, checkpoint: Path) -> None:
    saved = state.config
    changed = [k for k in RESUME_FIXED if k in saved and saved[k] != _jsonable(getattr(cfg, k))]
    if changed:
        details = ", ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" for k in changed)
        raise ConfigError(f"{checkpoint}: cannot resume with different settings ({details})")


def _jsonable(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


def _setup_model(cfg: TrainConfig, resume_from: Path | None, out: Path, dist: Distributed,
                 device: torch.device | None = None) -> DiffusionGemma:
    """The model to train: base weights (or a full checkpoint to resume), LoRA layers when asked; on `device`
    (default: the run's), where "meta" builds the structure only (`load_base`)."""
    device = dist.device if device is None else device
    if resume_from is not None and not cfg.lora:
        model = load_base(str(resume_from), tokenizer_dir=cfg.tokenizer, device=device)
    else:
        model = load_base(cfg.model, cfg.config_json, cfg.tokenizer, cfg.seed, cfg.dtype, device)
    if model.config.text_config.pad_token_id is None:
        raise ConfigError(f"{cfg.model}: its config has no pad_token_id, which training needs (the target of canvas "
                          "places past the end of a text, and the filler of short rows)")
    if cfg.seq_len > model.config.text_config.max_position_embeddings:
        raise ConfigError(f"--seq-len {cfg.seq_len} exceeds the model context "
                          f"({model.config.text_config.max_position_embeddings})")
    with torch.no_grad():  # own, aligned storage: loaded tensors are views into the checkpoint file at arbitrary
        for t in [*model.model.parameters(), *model.model.buffers()]:  # offsets, where CPU kernels round
            t.data = t.data.clone()  # differently, so a resumed run would drift from an uninterrupted one
    if not cfg.lora:  # the text model; a vision tower stays frozen (text data never reaches it)
        model.model.requires_grad_(True)
        for tower in (model.model.vision_tower, model.model.embed_vision):
            if tower is not None:
                tower.requires_grad_(False)
    else:
        base = Path(cfg.model)
        if cfg.config_json is not None or not base.is_dir():  # random base weights: keep them for merging
            base = out / "base"
            if dist.is_main and device.type != "meta" and not base.is_dir():
                model.save_pretrained(base)
        add_lora(model.model, cfg.lora, cfg.lora_alpha, str(base.resolve()), cfg.seed)
        if resume_from is not None:
            load_adapter(model.model, resume_from)
    model.model.gradient_checkpointing = cfg.grad_checkpoint
    model.model.to(device).train()
    return model


def _setup_sharded(cfg: TrainConfig, out: Path, dist: Distributed) -> tuple[DiffusionGemma, TrainingStep]:
    """The model and its sharded training step: every process builds the structure on the meta device; the main
    process makes the weights on the CPU, as one process would (from --model, or drawn from the seed), and
    sends each process its shards."""
    model = _setup_model(cfg, None, out, dist, torch.device("meta"))
    step = _training_step(model, cfg)
    full = None
    if dist.is_main:
        source = _setup_model(cfg, None, out, dist, torch.device("cpu"))
        full = _training_step(source, cfg).state_dict()
    shard(step, full, cfg, dist)
    return model, step


def _training_step(model: DiffusionGemma, cfg: TrainConfig) -> TrainingStep:
    return TrainingStep(model.model, cfg.weighting, cfg.diffusion_weight, cfg.ar_weight)


def _merge_sharded(cfg: TrainConfig, checkpoint: Path) -> DiffusionGemma:
    """The base with a sharded run's adapter (the peft files of its last checkpoint) merged in, on the CPU."""
    model = load_base(adapter_base(checkpoint), tokenizer_dir=str(checkpoint), dtype=cfg.dtype)
    attach_adapter(model.model, checkpoint)
    return model


def train(cfg: TrainConfig) -> Path:
    """Run (or, with `cfg.resume`, continue) a training run; returns the last checkpoint directory.
    Raises KeyboardInterrupt after saving a checkpoint when stopped by SIGINT/SIGTERM."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = Distributed.start(device, sharded=cfg.fsdp)
    try:
        return _train(cfg, dist)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Distributed) -> Path:
    cfg.validate(dist.world_size)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    resume_from = last_checkpoint(out)
    if resume_from is not None and not cfg.resume:
        raise ConfigError(f"{out} already holds {resume_from.name}: pass --resume to continue it, "
                          "or choose another --out")
    state = TrainerState(config={k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()})
    if resume_from is not None:
        saved = TrainerState.load(resume_from)
        _check_resume(saved, cfg, resume_from)
        state = dataclasses.replace(saved, config=state.config)
        log.info("resuming from %s", resume_from)

    if cfg.fsdp:
        model, step = _setup_sharded(cfg, out, dist)
    else:
        model = _setup_model(cfg, resume_from, out, dist)
        step = _training_step(model, cfg)
    infill = InfillIds.of(model.tokenizer, model.config.text_config.vocab_size) if cfg.infill_prob > 0 else None
    params = [p for p in step.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, cfg.lr, cfg.betas, cfg.weight_decay)
    if resume_from is not None and cfg.fsdp:
        load_sharded(resume_from, model, step, optimizer, lora=bool(cfg.lora))
    elif resume_from is not None:
        optimizer.load_state_dict(torch.load(resume_from / OPTIMIZER_FILE, map_location=dist.device))
    train_rows, eval_rows = load_rows(cfg, model.tokenizer)
    if not len(eval_rows) and cfg.holdout_frac > 0 and dist.is_main:
        log.warning("0 held-out rows (--holdout-frac %g of this data holds none out): --eval-every will not "
                    "evaluate; use a larger --holdout-frac or --eval-data", cfg.holdout_frac)
    stream = BatchStream(train_rows, cfg.batch_size, cfg.seed, state.epoch, state.position)
    reporter = Reporter(out, state.step, cfg.steps, cfg.log_every) if dist.is_main else None

    try:
        Run(cfg, model, step, optimizer, params, stream, eval_rows, state, out, dist, reporter, infill).loop()
    finally:
        if reporter:
            curve = reporter.close()
            if curve:
                log.info("loss curve: %s", curve)
            else:
                log.warning("%s not drawn: it needs matplotlib (pip install 'dgemma[train]')", CURVE_FILE)
    last = out / f"checkpoint-{state.step}"
    if cfg.merge and dist.is_main:
        if cfg.fsdp:
            model = _merge_sharded(cfg, last)
        merge_lora(model.model)
        model.model.requires_grad_(False).eval().cpu()
        model.save_pretrained(out / "merged")
        log.info("merged model: %s", out / "merged")
    if cfg.export and dist.is_main:
        log.info("exported model: %s", export(last, out / "export"))
    return last


@dataclass
class Run:
    """What a training run holds between steps."""

    cfg: TrainConfig
    model: DiffusionGemma
    objective: TrainingStep  # the model's loss as one module (sharded, with `--fsdp`)
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    stream: BatchStream
    eval_rows: Batch
    state: TrainerState
    out: Path
    dist: Distributed
    reporter: Reporter | None
    infill: InfillIds | None = None

    def loop(self) -> None:
        """Steps until `cfg.steps`, evaluating and saving on schedule; on a signal, saves and raises
        KeyboardInterrupt."""
        cfg, state = self.cfg, self.state
        with StopSignals() as stop:
            while state.step < cfg.steps:
                self.step()
                if len(self.eval_rows) and (state.step % cfg.eval_every == 0 or state.step == cfg.steps):
                    record = {"step": state.step,
                              **evaluate(self.model, self.objective, self.eval_rows, cfg, self.dist, self.infill)}
                    if self.reporter:
                        self.reporter.eval(record)
                stopping = self.dist.any(stop.requested)
                if state.step % cfg.save_every == 0 or state.step == cfg.steps or stopping:
                    if self.dist.sharded:
                        save_sharded(self.out, self.model, self.objective, self.optimizer, state, bool(cfg.lora),
                                     self.dist)
                    elif self.dist.is_main:
                        save_checkpoint(self.out, self.model, self.optimizer, state, lora=bool(cfg.lora))
                    self.dist.barrier()
                if stopping:
                    raise KeyboardInterrupt

    def step(self) -> None:
        cfg, state = self.cfg, self.state
        t0 = time.perf_counter()
        batch = self.stream.next()
        plan = _plan(batch, self.model, cfg, self.infill, TRAIN_STREAM, state.step)
        lr = warmup_cosine(state.step, cfg.lr, cfg.warmup, cfg.steps, cfg.min_lr_ratio)
        metrics = train_step(self.objective, batch, plan, self.optimizer, self.params, lr, cfg, self.dist)
        state.step += 1
        state.epoch, state.position = self.stream.epoch, self.stream.position
        if self.reporter:
            self.reporter.step({"step": state.step, **metrics, "tokens": batch.real_tokens,
                                "tokens_per_s": batch.real_tokens / (time.perf_counter() - t0)})
