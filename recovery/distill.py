"""Distillation of a pruned model from its dense original: the student learns the teacher's
next-token distributions instead of the text's single next token.

    >>> result = distill(pruned, dense, train_tokens, val_tokens,
    ...                  DistillSettings(params="lora", tokens=30_000))     # doctest: +SKIP

The loss is the forward KL of the student's distribution to the teacher's at a temperature,
optionally mixed with the language-model loss (:func:`recovery.teacher.distill_loss`). The
teacher is the dense model run in the same process, or its top-k logits read back from a
disk cache written in a first streamed pass (:mod:`recovery.teacher`, for models that do not
fit twice). The student trains either every parameter of its blocks (``params="full"``; the
embeddings and the head stay as they are) or LoRA adapters on the blocks' linear layers
(``"lora"``, merged at the end).

Guards, as the LoRA recovery has them and more:

* a token budget (``tokens``): windows are drawn without repetition, in a seeded order;
* optionally a time budget (``seconds``, the whole call): after the warm-up steps the step
  count is set, once, from their measured rate and the measured cost of a held-out
  evaluation, to the most that ends within it (never more than ``tokens`` buys); the
  learning-rate schedule decays over that count. Where the machine is slow the model sees
  fewer tokens instead of the job running late; ``stats["steps_planned"]`` says how many;
* a held-out KL (teacher vs student on validation windows of other text, temperature 1)
  every ``eval_steps``; the best weights are kept and training stops after ``patience``
  evaluations without improvement;
* a non-finite loss stops at once with :class:`DistillDivergedError` (weights untouched by
  that step);
* a checkpoint every ``checkpoint_steps`` (:mod:`recovery.checkpoint`): a job that dies
  continues where it stopped with ``resume=True``, to the same result;
* a progress bar with tokens/s and ETA, and one line per evaluation through ``progress``;
* ``accelerate launch`` runs it on several processes (each takes its share of every batch;
  gradients are averaged by the prepared model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from depgraph.errors import NonFiniteError
from depgraph.progress import progress_bar
from pruning.checks import check_int, check_positive

from .blocks import find_blocks
from .checkpoint import checkpoint_exists, load_checkpoint, save_checkpoint
from .lora import lora_targets
from .precision import check_precision, compute_autocast, fused_adamw_ok, resolve_precision
from .teacher import LiveTeacher, Targets, distill_loss

__all__ = ["DistillSettings", "DistillResult", "DistillDivergedError", "distill", "PARAMS"]

PARAMS = ("full", "lora")


class DistillDivergedError(NonFiniteError):
    """The distillation loss became NaN or infinite."""


@dataclass(frozen=True)
class DistillSettings:
    """What :func:`distill` trains and how (checked here, before any work)."""

    params: str = "full"  # "full": every block parameter; "lora": adapters, merged at the end
    temperature: float = 1.0
    lm_weight: float = 0.0  # share of the language-model loss in the mix, in [0, 1]
    learning_rate: float = 2e-4  # SmolLM2-135M at 20%, 204800 tokens: 87.6 ppl against 91.5 at 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 10
    batch_size: int = 4
    seq_len: int = 128
    tokens: int = 30_000  # training budget: ceil(tokens / (batch_size * seq_len)) steps
    val_windows: int = 16
    eval_steps: int = 25
    patience: int = 3
    checkpoint_steps: int = 50
    max_grad_norm: float = 1.0
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    seed: int = 0
    precision: str = "auto"  # training forward: bf16 autocast where native (recovery.precision)
    seconds: float | None = None  # time budget of the whole call; None: the token budget only

    def __post_init__(self) -> None:
        if self.params not in PARAMS:
            raise ValueError(f"params must be one of {PARAMS}, got {self.params!r}")
        check_precision(self.precision)
        check_int("warmup_steps", self.warmup_steps, 0)
        for name in ("batch_size", "tokens", "val_windows", "eval_steps", "patience",
                     "checkpoint_steps", "r", "alpha"):
            check_int(name, getattr(self, name))
        check_int("seq_len", self.seq_len, 2)
        for name in ("temperature", "learning_rate", "max_grad_norm"):
            check_positive(name, getattr(self, name))
        if self.seconds is not None:
            check_positive("seconds", self.seconds)
        if not 0 <= self.lm_weight <= 1:
            raise ValueError(f"lm_weight must be in [0, 1], got {self.lm_weight!r}")
        if not 0 <= self.dropout < 1 or not 0 <= self.weight_decay:
            raise ValueError(f"dropout must be in [0, 1) and weight_decay >= 0, got "
                             f"{self.dropout!r} and {self.weight_decay!r}")

    @property
    def steps(self) -> int:
        """Optimizer steps the token budget buys."""
        return math.ceil(self.tokens / (self.batch_size * self.seq_len))

    @property
    def train_windows(self) -> int:
        """Training windows of ``seq_len`` tokens the budget needs (each seen once)."""
        return self.steps * self.batch_size


@dataclass
class DistillResult:
    model: nn.Module  # the student, LoRA merged, with the best held-out weights
    history: list[dict]
    stats: dict


# ------------------------------------------------------------------------------ pieces
def _student(model: nn.Module, settings: DistillSettings) -> nn.Module:
    """The model to train: LoRA-wrapped, or with only its blocks' parameters trainable."""
    if settings.params == "lora":
        from peft import LoraConfig, get_peft_model

        for param in model.parameters():
            param.requires_grad_(False)
        config = LoraConfig(r=settings.r, lora_alpha=settings.alpha,
                            lora_dropout=settings.dropout, target_modules=lora_targets(model),
                            bias="none", task_type="CAUSAL_LM")
        return get_peft_model(model, config)
    _, blocks = find_blocks(model)
    inside = {id(p) for p in blocks.parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in inside)
    return model


def _schedule(settings: DistillSettings, total: Callable[[], int]) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to a tenth of the learning rate at step ``total()``
    (read at every step: a time budget sets it after the warm-up)."""
    warm = min(settings.warmup_steps, settings.steps - 1)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total() - warm)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value.to(params[name].device))


class _Loop:
    """One distillation run (see :func:`distill`); state that a checkpoint carries."""

    def __init__(self, student, teacher, tokens: torch.Tensor, n_train: int,
                 settings: DistillSettings, accelerator):
        self.settings, self.accelerator, self.teacher = settings, accelerator, teacher
        self.tokens, self.n_train = tokens, n_train
        params = [p for p in student.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.learning_rate,
                                      weight_decay=settings.weight_decay,
                                      fused=fused_adamw_ok(params) or None)
        self.precision = resolve_precision(settings.precision, accelerator.device)
        # the scheduler steps once per optimizer step, whatever the number of processes
        self.total = settings.steps  # steps to train; a time budget may lower it once
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _schedule(settings, lambda: self.total))
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        generator = torch.Generator().manual_seed(settings.seed)
        self.order = torch.randperm(n_train, generator=generator)
        self.step, self.best_kl, self.best, self.bad_evals = 0, math.inf, None, 0
        self.before, self.stopped, self.eval_seconds = None, None, 0.0
        self.planned = False  # whether the time budget has set self.total
        self.history: list[dict] = []

    @property
    def model(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def _share(self, rows: torch.Tensor) -> torch.Tensor:
        """This process's rows of a batch (all of them in a single process)."""
        return rows[self.accelerator.process_index::self.accelerator.num_processes]

    def _targets(self, rows: torch.Tensor, ids: torch.Tensor) -> Targets:
        return self.teacher.targets(rows, ids)

    def train_step(self) -> dict[str, float]:
        settings = self.settings
        rows = self._share(self.order[self.step * settings.batch_size:
                                      (self.step + 1) * settings.batch_size])
        ids = self.tokens[rows].to(self.accelerator.device)
        self.student.train()
        with compute_autocast(self.precision, self.accelerator.device):
            loss, parts = distill_loss(_logits(self.student, ids), ids, self._targets(rows, ids),
                                       settings.temperature, settings.lm_weight)
        if not torch.isfinite(loss.detach()).all():
            raise DistillDivergedError(f"distillation loss became {loss.item()} at step "
                                       f"{self.step + 1}; lower the learning rate or check the "
                                       "data (the last checkpoint is kept)")
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.student.parameters(), settings.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return {"loss": float(loss.detach()), **parts}

    @torch.no_grad()
    def held_out_kl(self) -> float:
        """Mean KL (temperature 1) of teacher to student over the validation windows, in the
        models' own precision (not the training autocast)."""
        self.student.eval()
        rows = self._share(torch.arange(self.n_train, self.tokens.shape[0]))
        total = torch.zeros(2, device=self.accelerator.device)
        for start in range(0, rows.numel(), self.settings.batch_size):
            batch = rows[start:start + self.settings.batch_size]
            ids = self.tokens[batch].to(self.accelerator.device)
            kl, _ = distill_loss(_logits(self.student, ids), ids, self._targets(batch, ids))
            total += torch.tensor([float(kl) * len(batch), len(batch)], device=total.device)
        total = self.accelerator.reduce(total, reduction="sum")
        return float(total[0] / total[1])

    def evaluate(self) -> bool:
        """Record the held-out KL; keep the best weights; whether to stop early."""
        kl = self.held_out_kl()
        improved = kl < self.best_kl
        if improved:
            self.best_kl, self.best, self.bad_evals = kl, _trainable(self.model), 0
        else:
            self.bad_evals += 1
        self.history.append({"step": self.step, "val_kl": kl, "best": improved})
        return self.bad_evals >= self.settings.patience

    def state(self) -> dict:
        return {"step": self.step, "trainable": _trainable(self.model),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "best_kl": self.best_kl, "best": self.best, "bad_evals": self.bad_evals,
                "history": self.history, "before": self.before, "stopped": self.stopped,
                "total": self.total, "planned": self.planned, "eval_seconds": self.eval_seconds,
                "settings": asdict(self.settings)}

    def restore(self, state: dict) -> None:
        _load_trainable(self.model, state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.best_kl, self.best = state["step"], state["best_kl"], state["best"]
        self.bad_evals, self.history = state["bad_evals"], state["history"]
        self.before, self.stopped = state["before"], state["stopped"]
        self.total, self.planned = state["total"], state["planned"]
        self.eval_seconds = state["eval_seconds"]

    def plan(self, elapsed: float, per_step: float) -> None:
        """Set :attr:`total` to the most steps that end within the time budget, ``elapsed``
        seconds of it spent and a step taking ``per_step`` (evaluations counted)."""
        settings = self.settings
        evals = self.eval_seconds / settings.eval_steps
        left = settings.seconds - elapsed - self.eval_seconds  # the last evaluation
        more = max(0, math.floor(left / (per_step + evals)))
        self.total, self.planned = max(self.step, min(settings.steps, self.step + more)), True


def _check_tokens(train: torch.Tensor, val: torch.Tensor, settings: DistillSettings) -> None:
    for name, tokens in (("train_tokens", train), ("val_tokens", val)):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.shape[0] == 0:
            raise ValueError(f"{name} must be a non-empty (windows, seq_len) tensor, got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
    if train.shape[0] < settings.train_windows:
        raise ValueError(f"the token budget needs {settings.train_windows} training windows, "
                         f"got {train.shape[0]}")
    if train.shape[1] != val.shape[1]:
        raise ValueError(f"training and validation windows differ in length "
                         f"({train.shape[1]} and {val.shape[1]})")


# ------------------------------------------------------------------------------ entry point
def distill(model: nn.Module, teacher, train_tokens: torch.Tensor, val_tokens: torch.Tensor,
            settings: DistillSettings = DistillSettings(), *, checkpoint=None,
            resume: bool = False, progress: Callable[[str], None] | None = print,
            bar: bool | None = None) -> DistillResult:
    """Distil ``teacher`` (the dense model, or a :class:`recovery.teacher.CachedTeacher`
    written for ``cat([train_tokens, val_tokens])``) into ``model`` (changed in place).

    ``train_tokens`` / ``val_tokens`` are (windows, seq_len) ids of different text; the first
    ``settings.train_windows`` training windows are used, each once. ``checkpoint`` is a
    folder for checkpoints; with ``resume`` an existing one is continued (otherwise an
    existing checkpoint is an error: nothing is overwritten or silently reused). Returns the
    model (LoRA merged) at its best held-out KL, the evaluation history and numbers.
    """
    from accelerate import Accelerator

    _check_tokens(train_tokens, val_tokens, settings)
    if checkpoint_exists(checkpoint) and not resume:
        raise ValueError(f"{str(checkpoint)!r} holds a checkpoint of an earlier run: resume it "
                         "(resume=True, --resume) or remove it")
    start = time.perf_counter()
    torch.manual_seed(settings.seed)
    n_train = settings.train_windows
    tokens = torch.cat([train_tokens[:n_train], val_tokens]).long()
    accelerator = Accelerator()
    if not hasattr(teacher, "targets"):
        teacher = LiveTeacher(teacher.to(accelerator.device))
    loop = _Loop(_student(model, settings), teacher, tokens, n_train, settings, accelerator)
    resumed = 0
    if resume and checkpoint_exists(checkpoint):
        loop.restore(load_checkpoint(checkpoint, asdict(settings)))
        resumed = loop.step
    if loop.before is None:
        clock = time.perf_counter()
        loop.before = loop.held_out_kl()
        loop.eval_seconds = time.perf_counter() - clock
    if loop.stopped is None:
        loop.stopped = _run(loop, settings, checkpoint, progress, bar, resumed, start)
    if loop.best is not None:
        _load_trainable(loop.model, loop.best)
    student = loop.model
    merged = student.merge_and_unload() if settings.params == "lora" else student
    for param in merged.parameters():
        param.requires_grad_(True)
    seconds = time.perf_counter() - start
    trained = (loop.step - resumed) * settings.batch_size * settings.seq_len
    stats = {"method": "distill", **asdict(settings), "seconds_budget": settings.seconds,
             "steps": loop.step, "steps_planned": loop.total, "resumed_at": resumed,
             "stopped": loop.stopped, "val_kl_before": loop.before, "val_kl_best": loop.best_kl,
             "train_tokens": loop.step * settings.batch_size * settings.seq_len,
             "tokens_per_second": trained / seconds if seconds > 0 else None,
             "seconds": round(seconds, 2), "teacher": type(teacher).__name__,
             "precision_used": loop.precision,
             "world_size": loop.accelerator.num_processes,
             "is_main_process": loop.accelerator.is_main_process}
    return DistillResult(merged.eval(), loop.history, stats)


def _run(loop: _Loop, settings: DistillSettings, checkpoint, progress, bar_enabled,
         resumed: int, began: float) -> str:
    """Train to the budget or an early stop; returns why it ended. ``began``: when the call
    started (``time.perf_counter``), for the time budget."""
    bar = progress_bar(total=loop.total, desc="distill", enabled=bar_enabled)
    bar.update(loop.step)
    tokens_per_step = settings.batch_size * settings.seq_len
    # the rate is measured over the second half of the warm-up: the first steps run slower
    # (kernels and allocator warming up), and a plan on them leaves time unused
    plan_at = max(settings.warmup_steps, 3)
    clock, stopped, first_done = time.perf_counter(), None, None
    try:
        while loop.step < loop.total:
            parts = loop.train_step()
            now = time.perf_counter()
            if first_done is None and loop.step >= plan_at // 2:
                first_done = (now, loop.step)
            rate = (loop.step - resumed) * tokens_per_step / (now - clock)
            if (settings.seconds is not None and not loop.planned and loop.step >= plan_at
                    and first_done is not None and loop.step - first_done[1] >= 2):
                loop.plan(now - began, (now - first_done[0]) / max(1, loop.step - first_done[1]))
                bar.total = loop.total
            bar.set_postfix(tok_s=f"{rate:.0f}", kl=f"{parts['kl']:.3f}", refresh=False)
            bar.update(1)
            last = loop.step == loop.total
            if loop.step % settings.eval_steps == 0 or last:
                stop = loop.evaluate()
                _report(progress, loop, rate, settings)
                stopped = "early stop" if stop else "budget" if last else None
            if checkpoint is not None and (loop.step % settings.checkpoint_steps == 0 or stopped):
                loop.stopped = stopped
                if loop.accelerator.is_main_process:
                    save_checkpoint(checkpoint, loop.state())
            if stopped:
                break
    finally:
        bar.close()
    return stopped or "budget"


def _report(progress, loop: _Loop, rate: float, settings: DistillSettings) -> None:
    if progress is None or not loop.accelerator.is_main_process:
        return
    row = loop.history[-1]
    left = (loop.total - loop.step) * settings.batch_size * settings.seq_len / max(rate, 1e-9)
    progress(f"step {loop.step}/{loop.total}: held-out KL {row['val_kl']:.4f}"
             f"{' (best)' if row['best'] else ''}, {rate:.0f} tokens/s, ETA {left / 60:.1f} min")
