"""`Trainer` and `TrainingConfig`: LoRA / DoRA / full fine-tuning on MLX.

One optimizer step sees `gradient_accumulation_steps` micro-batches. Their
loss is token-weighted over the whole window: each micro-batch contributes
the gradient of (its summed float32 cross-entropy) / (trained tokens in the
whole window), the token count being known on the host before the step. So
accumulating 2 batches of 2 equals one batch of 4, whatever the lengths.

Full fine-tuning of a bf16/fp16 model keeps float32 master weights and
float32 optimizer state: updates too small for bf16 still accumulate, and the
model's weights are refreshed from the masters after every update.

Training runs inside `precision.training_precision`: float32 norms whose
outputs are cast back to the activation dtype, undone when `train()` ends.

The loop's position (step, epoch, batch within the epoch's plan) lives in
`Trainer.state`, so that a checkpoint can resume it exactly.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import distributed as dist
from . import optim as opt
from .compute import CHOICES as COMPUTE_DTYPES
from .compute import compute_dtype, resolve_compute_dtype
from .errors import BurnishError

# optim names from transformers / Unsloth notebooks that map onto ours
_OPTIM_ALIASES = {
    "adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw_hf": "adamw",
    "adamw_8bit": "adamw", "paged_adamw_8bit": "adamw", "adamw_bnb_8bit": "adamw",
    "paged_adamw_32bit": "adamw",
}


@dataclass
class TrainingConfig:
    """Training settings, with the names Hugging Face / TRL users know."""

    output_dir: str = "outputs"
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 1
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1
    learning_rate: float = 2e-4
    lr_scheduler_type: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    optim: str = "adamw"  # adamw | adam | sgd | adafactor
    max_grad_norm: float | None = 1.0  # global norm; None or 0 = no clipping
    logging_steps: int = 10
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int | None = None
    seed: int = 3407
    max_seq_length: int = 2048
    packing: bool = False
    completion_only_loss: bool | None = None
    dataset_text_field: str = "text"
    cast_norm_output_to_input_dtype: bool = True
    gradient_checkpointing: bool = False
    # "auto": float32 on a CPU with an optimised BLAS routed, where bf16
    # matmuls are emulated, else the model's dtypes (every GPU); None: the
    # model's dtypes; "float32": cast bf16/fp16 weights to float32 while
    # training. Cast weights go back to their own dtypes on exit (compute.py).
    compute_dtype: str | None = "auto"

    def __post_init__(self):
        def bad(name, expected):
            raise BurnishError(
                f"TrainingConfig.{name}={getattr(self, name)!r}: expected {expected}"
            )

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v):
            return isinstance(v, (int, float)) and not isinstance(v, bool)

        for name in ("per_device_train_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "max_seq_length"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "an integer >= 1")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            v = getattr(self, name)
            if v is not None and (not is_int(v) or v < 1):
                bad(name, "None or an integer >= 1")
        if not is_int(self.max_steps):
            bad("max_steps", "an integer (-1: train for num_train_epochs)")
        if self.max_steps <= 0 and (not is_num(self.num_train_epochs) or self.num_train_epochs <= 0):
            bad("num_train_epochs", "a number > 0 (or set max_steps)")
        if not is_num(self.learning_rate) or self.learning_rate < 0:
            bad("learning_rate", "a number >= 0")
        if not is_int(self.warmup_steps) or self.warmup_steps < 0:
            bad("warmup_steps", "an integer >= 0")
        if not is_num(self.warmup_ratio) or not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "a number in [0, 1)")
        if not is_num(self.weight_decay) or self.weight_decay < 0:
            bad("weight_decay", "a number >= 0")
        if self.max_grad_norm is not None and (not is_num(self.max_grad_norm) or self.max_grad_norm < 0):
            bad("max_grad_norm", "None or a number >= 0")
        if self.lr_scheduler_type not in opt.SCHEDULERS:
            bad("lr_scheduler_type", "one of " + ", ".join(opt.SCHEDULERS))
        if self.optim in _OPTIM_ALIASES:
            if "8bit" in self.optim:
                warnings.warn(
                    f"TrainingConfig.optim={self.optim!r}: 8-bit optimizer state is "
                    "not available on MLX; using adamw with float32 state",
                    stacklevel=3,
                )
            self.optim = _OPTIM_ALIASES[self.optim]
        if self.optim not in opt.OPTIMIZERS:
            bad("optim", "one of " + ", ".join(opt.OPTIMIZERS))
        if not isinstance(self.seed, int):
            bad("seed", "an integer")
        if self.completion_only_loss not in (None, True, False):
            bad("completion_only_loss", "None, True or False")
        if not isinstance(self.dataset_text_field, str):
            bad("dataset_text_field", "a string")
        for name in ("packing", "cast_norm_output_to_input_dtype", "gradient_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "True or False")
        if self.compute_dtype not in COMPUTE_DTYPES:
            bad("compute_dtype", "None, 'auto' or 'float32'")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainerState:
    """Where the loop is; everything needed (with weights, optimizer state
    and masters) to continue exactly."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # epoch of the next micro-batch
    batch_in_epoch: int = 0  # index of the next micro-batch in that epoch's plan
    tokens: int = 0  # trained (loss-weighted) tokens seen
    train_time: float = 0.0  # seconds spent in training steps
    loss_sum: float = 0.0  # summed token losses up to the last log
    loss_tokens: int = 0  # tokens in loss_sum
    pending_loss_sum: float = 0.0  # loss since the last log (kept by checkpoints)
    pending_loss_tokens: int = 0
    rng_key: int | None = None  # MLX's random key when the checkpoint was taken
    log_history: list = field(default_factory=list)


class TrainingInterrupted(BurnishError):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint."""

    def __init__(self, signum: int, checkpoint):
        import signal as _signal

        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = 128 + signum
        super().__init__(f"training stopped by {_signal.Signals(signum).name}; "
                         f"checkpoint saved to {checkpoint} (resume with "
                         "`burnish train ... --resume` or "
                         "train(resume_from_checkpoint=True))")


def _assign(dst, src):
    """Copy the leaves of `src` into the containers of `dst`, in place (the
    containers are what `mx.compile` reads and writes as state)."""
    if isinstance(dst, dict):
        for k, v in src.items():
            if isinstance(v, (dict, list)) and k in dst:
                _assign(dst[k], v)
            else:
                dst[k] = v
    elif isinstance(dst, list):
        for i, v in enumerate(src):
            if isinstance(v, (dict, list)):
                _assign(dst[i], v)
            else:
                dst[i] = v


def rng_key() -> int:
    """MLX's global random key as one integer (for checkpoints)."""
    hi, lo = mx.random.state[0].tolist()
    return (hi << 32) | lo


def set_rng_key(key: int) -> None:
    """Restore a key from `rng_key` (`mx.random.state` cannot be assigned;
    `mx.random.seed(s)` sets the key to (s >> 32, s & 0xffffffff))."""
    mx.random.seed(int(key))


def _memory(gb: float) -> str:
    return f"{gb:.2f}GB" if gb >= 1 else f"{gb * 1e3:.0f}MB"


def _global_norm(grads):
    return mx.sqrt(sum(g.astype(mx.float32).square().sum() for _, g in tree_flatten(grads)))


def _is_examples(data) -> bool:
    from .data import Example

    return isinstance(data, (list, tuple)) and bool(data) and all(isinstance(e, Example) for e in data)


class Trainer:
    """Fine-tune `model` on `train_dataset` (rows or a .jsonl/.json path).

    `callbacks`: objects with any of `on_train_begin(trainer)`,
    `on_step_end(trainer, step)`, `on_log(trainer, logs)`,
    `on_train_end(trainer, metrics)`.
    `master_weights=False` turns off the float32 master weights of full
    fine-tuning (updates then happen in the weights' own dtype, as stock
    mlx-lm does; for comparisons).

    `compile`: run the step through `mx.compile` (falling back to eager if
    tracing fails). The default, None, compiles on GPUs only: MLX's CPU
    backend builds every fused kernel with a C++ compiler on first use
    (measured: a 2-step LoRA run of a 2-layer tiny model took 85 s with a
    cold kernel cache, under 1 s eagerly; the cache lives in $TMPDIR/mlx).
    """

    def __init__(self, model, tokenizer, train_dataset, eval_dataset=None,
                 config: TrainingConfig | None = None, *, args: TrainingConfig | None = None,
                 callbacks=(), compile: bool | None = None, master_weights: bool = True,
                 progress: bool | None = None):
        if config is not None and args is not None:
            raise BurnishError("Trainer: pass config= or args=, not both")
        config = config or args or TrainingConfig()
        if not isinstance(config, TrainingConfig):
            raise BurnishError(f"Trainer: config must be a TrainingConfig, got {type(config).__name__}")
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.callbacks = list(callbacks)
        self.compile = (mx.default_device() == mx.gpu) if compile is None else bool(compile)
        # Run the output head on trained positions only (prompt and padding
        # skipped), listed in multiples of this; each new count is a new
        # shape for mx.compile, so the compiled step does without.
        self.gather_multiple = 0 if self.compile else 32
        self.master_weights = master_weights
        self.progress = progress
        # the mx.distributed group when launched as ranks (mlx.launch); size 1 otherwise
        self.world = dist.world()
        self.train_examples = self._examples(train_dataset, "train")
        self.eval_examples = (self._examples(eval_dataset, "eval")
                              if eval_dataset is not None else None)
        self.state = TrainerState()
        self.optimizer = None
        self.master = None  # float32 master weights (trainable tree) or None
        self._in_scope = False
        n = len(self._plan(epoch=0))
        if n == 0:
            raise BurnishError("train_dataset: no batches (is it empty?)")
        self.batches_per_epoch = n

    # --- data ----------------------------------------------------------------

    def _examples(self, dataset, split):
        from .data import format_examples, load_rows
        from .vision import is_vlm

        if _is_examples(dataset):
            return list(dataset)
        if is_vlm(self.model):  # rows of chat messages with images
            from .vision_train import trainer_examples

            return trainer_examples(self, dataset, split)
        c = self.config
        rows = load_rows(dataset, split_name=split)
        return format_examples(rows, self.tokenizer, max_seq_length=c.max_seq_length,
                               completion_only_loss=c.completion_only_loss,
                               dataset_text_field=c.dataset_text_field,
                               source_name=f"{split}_dataset")

    def _plan(self, epoch, examples=None, shuffle=True):
        from .data import batch_plan

        c = self.config
        # several ranks: plan global batches; each rank trains on its slice of each
        return batch_plan(examples or self.train_examples,
                          c.per_device_train_batch_size * self.world.size,
                          seed=c.seed, packing=c.packing, max_seq_length=c.max_seq_length,
                          shuffle=shuffle, epoch=epoch)

    def _micro_batches(self):
        """Training micro-batches from `state` on, across epochs, forever.

        Yields (batch, epoch, index); the caller advances `state`.
        """
        c = self.config
        epoch, start = self.state.epoch, self.state.batch_in_epoch
        while True:
            for i, batch in enumerate(self._iterate(
                    self.train_examples, c.per_device_train_batch_size, seed=c.seed,
                    epoch=epoch, start=start, packing=c.packing,
                    max_seq_length=c.max_seq_length, pad_id=self._pad_id(),
                    gather_multiple=self.gather_multiple), start=start):
                yield batch, epoch, i
            epoch, start = epoch + 1, 0

    def _iterate(self, examples, batch_size, **kwargs):
        """One epoch's batches; with several ranks, this rank's slice of each
        global batch (whose n_tokens is the global batch's token count)."""
        from .data import iterate_batches
        from .vision_train import is_vlm_examples, trainer_batches

        if self.world.size > 1:  # text examples only (VLM ones are refused there)
            return dist.iterate_shards(examples, batch_size, self.world, **kwargs)
        if is_vlm_examples(examples):  # whole VLM examples, one forward pass each
            return trainer_batches(self, examples, batch_size, **kwargs)
        return iterate_batches(examples, batch_size, **kwargs)

    def _pad_id(self):
        pad = getattr(self.tokenizer, "pad_token_id", None)
        return int(pad) if isinstance(pad, int) else 0

    @property
    def total_steps(self) -> int:
        c = self.config
        if c.max_steps > 0:
            return c.max_steps
        batches = math.ceil(c.num_train_epochs * self.batches_per_epoch)
        return max(1, math.ceil(batches / c.gradient_accumulation_steps))

    # --- the step ------------------------------------------------------------

    def _loss(self, model, batch, scale):
        from .losses import loss_and_count

        total, count = loss_and_count(model, batch)
        return total * scale, (total, count)

    def _setup(self):
        """Optimizer, schedule, master weights and the (compiled) step."""
        c = self.config
        model = self.model
        params = model.trainable_parameters()
        if not tree_flatten(params):
            raise BurnishError(
                "Trainer: the model has no trainable parameters (call "
                "get_peft_model, or load with full_finetuning=True)"
            )
        total = self.total_steps
        warm = opt.warmup_steps(total, c.warmup_steps, c.warmup_ratio)
        self.schedule = opt.build_schedule(c.lr_scheduler_type, c.learning_rate, total, warm)
        self.optimizer = opt.build_optimizer(c.optim, self.schedule)
        low = [k for k, v in tree_flatten(params) if v.dtype != mx.float32]
        self.master = None
        if low and self.master_weights:
            self.master = tree_map(lambda p: p.astype(mx.float32), params)
            mx.eval(self.master)
        target = self.master if self.master is not None else params
        self._decay = opt.decay_mask(model, target)
        self.optimizer.init(target)
        self._grad_dtype = mx.float32 if (self.master is not None or not low) else None
        self._value_and_grad = nn.value_and_grad(model, self._loss)
        self._state = [model.state, self.optimizer.state]
        if self.master is not None:
            self._state.append(self.master)
        self._state.append(mx.random.state)
        self._compile_ok = False
        self._compiled_step = (mx.compile(self._step, inputs=self._state, outputs=self._state)
                               if self.compile else None)

    def _step(self, inputs, targets, weights, segments, index, scale, acc, update):
        from .data import Batch

        batch = Batch(inputs, targets, weights, segments, 0, index=index)
        (_, (total, count)), grads = self._value_and_grad(self.model, batch, scale)
        if self._grad_dtype is not None:
            grads = tree_map(lambda g: g.astype(self._grad_dtype), grads)
        if acc is not None:
            grads = tree_map(mx.add, acc, grads)
        if not update:
            return total, count, grads, None
        return total, count, None, self._apply(grads)

    def _apply(self, grads):
        c = self.config
        grads = dist.reduce_gradients(self.world, grads)  # several ranks: before clipping
        if c.max_grad_norm:
            grads, norm = opt.optim.clip_grad_norm(grads, c.max_grad_norm)
        else:
            norm = _global_norm(grads)
        params = self.master if self.master is not None else self.model.trainable_parameters()
        new = opt.apply_update(self.optimizer, grads, params, self._decay,
                               c.weight_decay, opt.DECOUPLED[c.optim])
        if self.master is not None:
            _assign(self.master, new)
            new = tree_map(lambda m, p: m.astype(p.dtype), new, self.model.trainable_parameters())
        self.model.update(new)
        return norm

    def _run_step(self, batch, scale, acc, update):
        from .vision_train import VLMBatch, trainer_step

        if isinstance(batch, VLMBatch):  # eager: image shapes vary per batch
            return trainer_step(self, batch, scale, acc, update)
        args = (batch.inputs, batch.targets, batch.weights, batch.segments,
                batch.index, scale, acc, update)
        if self._compiled_step is None:
            return self._step(*args)
        snapshot = self._snapshot() if not self._compile_ok else None
        try:
            out = self._compiled_step(*args)
            if snapshot is not None:  # surface trace failures here, not later
                mx.eval(out, self._state)
            self._compile_ok = True
            return out
        except Exception as exc:  # noqa: BLE001 - fall back once, then re-raise
            if snapshot is None:
                raise
            self._restore(snapshot)
            warnings.warn(f"Trainer: mx.compile failed on the training step ({exc}); "
                          "running it eagerly", stacklevel=2)
            self._compiled_step = None
            return self._step(*args)

    def _snapshot(self):
        # model parameters, optimizer state, masters (not the random state)
        return [tree_flatten(self.model.parameters()), tree_flatten(self.optimizer.state),
                tree_flatten(self.master) if self.master is not None else [], rng_key()]

    def _restore(self, snapshot):
        """Undo a failed trace: it may leave placeholders in the state."""
        self.model.update(tree_unflatten(snapshot[0]))
        _assign(self.optimizer.state, tree_unflatten(snapshot[1]))
        if self.master is not None:
            _assign(self.master, tree_unflatten(snapshot[2]))
        set_rng_key(snapshot[3])

    # --- the loop ------------------------------------------------------------

    def train(self, resume_from_checkpoint=None) -> dict:
        """Train for `max_steps` (or `num_train_epochs`); return final metrics.

        `resume_from_checkpoint`: True (the latest `checkpoint-*` in
        `output_dir`, if any) or a checkpoint folder; training then continues
        exactly where that checkpoint was taken. SIGINT / SIGTERM save a
        checkpoint and raise `TrainingInterrupted`.
        """
        from .checkpoint import resolve_resume
        from .peft import disable_gradient_checkpointing, enable_gradient_checkpointing
        from .precision import training_precision

        c = self.config
        model = self.model
        was_training = model.training
        added = []
        self.state = TrainerState()
        self._stop = None
        mx.random.seed(c.seed)
        resume = dist.agree_resume(self.world, resolve_resume(resume_from_checkpoint,
                                                              c.output_dir))
        monitor = dist.Monitor(self.world, c.output_dir).start()  # no-op on one rank
        previous = self._install_signal_handlers()
        try:
            if c.gradient_checkpointing:
                added = enable_gradient_checkpointing(model)
            dtype = resolve_compute_dtype(c.compute_dtype)
            self.compute_dtype_used = str(dtype or "model").split(".")[-1]
            with compute_dtype(model, dtype), \
                    training_precision(model, cast_outputs=c.cast_norm_output_to_input_dtype):
                self._in_scope = True
                model.train()
                dist.sync_trainable(self.world, model)  # several ranks: start from rank 0's weights
                self._setup()
                if resume is not None:
                    self._load_checkpoint(resume)
                return self._loop()
        except BaseException as exc:
            monitor.failed(exc)  # raises RankFailed when another rank's failure caused it
            raise
        finally:
            monitor.stop()
            self._restore_signal_handlers(previous)
            self._in_scope = False
            disable_gradient_checkpointing(model, added)
            model.train(was_training)

    def request_stop(self) -> None:
        """Stop after the current step, writing a checkpoint first (for callbacks)."""
        self._stop = "request"

    # --- checkpoints and signals ---------------------------------------------

    def _install_signal_handlers(self):
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return None  # signal handlers can only be set from the main thread

        def handler(signum, frame):
            self._stop = signum

        return {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signal_handlers(previous):
        import signal

        for sig, old in (previous or {}).items():
            signal.signal(sig, old)

    def save_checkpoint(self, log_sum=None, log_tokens: int = 0):
        """Write `output_dir/checkpoint-<step>/` atomically; returns its path."""
        from .checkpoint import save_checkpoint
        from .export import adapter_weights
        from .peft import peft_config

        st = self.state
        st.pending_loss_sum = float(log_sum.item()) if log_sum is not None else 0.0
        st.pending_loss_tokens = log_tokens
        st.rng_key = rng_key()
        if not self.world.is_main:  # rank 0 writes it; wait until it is complete
            dist.barrier(self.world)
            return Path(self.config.output_dir) / f"checkpoint-{st.step}"
        peft = peft_config(self.model)
        try:
            return save_checkpoint(
                self.config.output_dir, step=st.step,
                trainable=self.model.trainable_parameters(),
                optimizer_state=self.optimizer.state, master=self.master,
                trainer_state=asdict(st), config=self.config.to_dict(),
                adapter_config=peft.adapter_config() if peft else None,
                adapter_weights=adapter_weights(self.model) if peft else None,
                save_total_limit=self.config.save_total_limit)
        finally:
            dist.barrier(self.world)

    def _load_checkpoint(self, path):
        from .checkpoint import read_checkpoint

        saved = read_checkpoint(path)
        trainable = dict(tree_flatten(self.model.trainable_parameters()))
        loaded = dict(tree_flatten(saved["trainable"]))
        if set(loaded) != set(trainable):
            missing = sorted(set(trainable) ^ set(loaded))[:3]
            raise BurnishError(f"{path}: checkpoint does not match the model's "
                               f"trainable parameters (e.g. {', '.join(missing)})")
        self.model.update(tree_unflatten(list(loaded.items())))
        _assign(self.optimizer.state, saved["optimizer"])
        if self.master is not None:
            if saved["master"] is None:
                raise BurnishError(f"{path}: checkpoint has no float32 master weights")
            _assign(self.master, saved["master"])
        known = {f.name for f in fields(TrainerState)}
        self.state = TrainerState(**{k: v for k, v in saved["state"].items() if k in known})
        if self.state.rng_key is not None:
            set_rng_key(self.state.rng_key)
        mx.eval(self._state)

    def _loop(self) -> dict:
        c = self.config
        st = self.state
        out_dir = Path(c.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        # a fresh run starts the file; a resumed one (step > 0) appends to it
        metrics_file = open(out_dir / "metrics.jsonl" if self.world.is_main else os.devnull,
                            "a" if st.step else "w")
        total = self.total_steps
        mx.reset_peak_memory()
        stream = self._micro_batches()
        bar = self._bar(total)
        self._call("on_train_begin", self)
        log_sum = mx.array(st.pending_loss_sum, mx.float32)
        log_tokens, norm = st.pending_loss_tokens, None
        tic = time.perf_counter()
        try:
            while st.step < total:
                window = []
                for _ in range(c.gradient_accumulation_steps):
                    batch, epoch, index = next(stream)
                    window.append(batch)
                    st.epoch, st.batch_in_epoch = epoch, index + 1
                n_window = sum(b.n_tokens for b in window)
                # n_window counts all ranks' tokens; gradients are averaged over ranks
                scale = mx.array(self.world.size / max(n_window, 1), mx.float32)
                acc, window_start = None, log_sum
                for i, batch in enumerate(window):
                    last = i == len(window) - 1
                    loss_sum, _, acc, step_norm = self._run_step(batch, scale, acc, last)
                    log_sum = log_sum + loss_sum
                    mx.eval(self._state, log_sum, acc)
                norm = step_norm
                st.step += 1
                st.tokens += n_window
                log_tokens += n_window
                self._call("on_step_end", self, st.step)
                # several ranks: the window's loss summed over ranks, and one stop decision
                log_sum, agreed = dist.sync_step(self.world, window_start, log_sum, self._stop)
                logging = st.step % c.logging_steps == 0 or st.step == total
                evaluating = bool(c.eval_steps and self.eval_examples
                                  and st.step % c.eval_steps == 0)
                if logging or evaluating:  # logs and evals are not training time
                    st.train_time += time.perf_counter() - tic
                if logging:
                    logs = self._log_train(log_sum, log_tokens, norm)
                    log_sum, log_tokens = mx.array(0.0, mx.float32), 0
                    self._write(metrics_file, logs)
                    bar.set_postfix(loss=f"{logs['loss']:.4f}", lr=f"{logs['learning_rate']:.2e}",
                                    tok_s=f"{logs['tokens_per_sec']:.0f}",
                                    mem=_memory(logs["peak_memory_gb"]), refresh=False)
                    self._call("on_log", self, logs)
                if evaluating:
                    self._write(metrics_file, {"step": st.step, **self.evaluate()})
                if logging or evaluating:
                    tic = time.perf_counter()
                bar.update(1)
                stop = self._stop if self.world.size == 1 else agreed
                if stop is not None or (c.save_steps and st.step % c.save_steps == 0):
                    saved = self.save_checkpoint(log_sum, log_tokens)
                    if isinstance(stop, int):
                        raise TrainingInterrupted(stop, saved)
                    if stop is not None:
                        break
        finally:
            bar.close()
            metrics_file.close()
        metrics = self._final_metrics()
        if self.eval_examples:
            metrics.update(self.evaluate())
        if self.world.is_main:
            self._plot(out_dir / "loss.png")
        self._call("on_train_end", self, metrics)
        return metrics

    def _log_train(self, log_sum, log_tokens, norm) -> dict:
        st = self.state
        loss_sum = log_sum.item()
        st.loss_sum += loss_sum
        st.loss_tokens += log_tokens
        logs = {
            "step": st.step,
            "epoch": round(st.epoch + st.batch_in_epoch / self.batches_per_epoch, 4),
            "loss": loss_sum / max(log_tokens, 1),
            "learning_rate": float(self.schedule(mx.array(st.step - 1)).item()),
            "grad_norm": float(norm.item()) if norm is not None else None,
            "tokens": st.tokens,
            "tokens_per_sec": st.tokens / max(st.train_time, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }
        st.log_history.append(logs)
        return logs

    def _final_metrics(self) -> dict:
        st = self.state
        return {
            "train_loss": st.loss_sum / max(st.loss_tokens, 1),
            "steps": st.step,
            "epochs": round(st.epoch + st.batch_in_epoch / self.batches_per_epoch, 4),
            "tokens": st.tokens,
            "train_runtime": st.train_time,
            "compute_dtype": getattr(self, "compute_dtype_used", "model"),
            "tokens_per_sec": st.tokens / max(st.train_time, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9,
        }

    # --- evaluation ----------------------------------------------------------

    def evaluate(self) -> dict:
        """Token-weighted loss and perplexity on `eval_dataset`."""
        from .losses import loss_and_count
        from .precision import training_precision
        from .vision_train import VLMBatch, batch_loss

        if not self.eval_examples:
            raise BurnishError("Trainer.evaluate: no eval_dataset was given")
        c = self.config
        model = self.model
        scope = (nullcontext() if self._in_scope else
                 training_precision(model, cast_outputs=c.cast_norm_output_to_input_dtype))
        was_training = model.training
        total, count = mx.array(0.0, mx.float32), 0
        with scope:
            model.eval()
            try:
                for batch in self._iterate(self.eval_examples, c.per_device_train_batch_size,
                                           seed=c.seed, epoch=0, packing=c.packing,
                                           max_seq_length=c.max_seq_length, shuffle=False,
                                           pad_id=self._pad_id(),
                                           gather_multiple=self.gather_multiple):
                    loss_sum, _ = (batch_loss(model, batch) if isinstance(batch, VLMBatch)
                                   else loss_and_count(model, batch, training=False))
                    total = total + loss_sum
                    count += batch.n_tokens
                    mx.eval(total)
            finally:
                model.train(was_training)
        total = dist.sum_scalar(self.world, total)  # count already covers all ranks
        loss = total.item() / max(count, 1)
        result = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0))}
        self.state.log_history.append({"step": self.state.step, **result})
        return result

    # --- output --------------------------------------------------------------

    def _call(self, name, *args):
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(*args)

    def _bar(self, total):
        from tqdm.auto import tqdm

        disable = None if self.progress is None else not self.progress
        if not self.world.is_main:
            disable = True
        return tqdm(total=total, initial=self.state.step, desc="train", unit="step",
                    disable=disable, dynamic_ncols=True)

    @staticmethod
    def _write(fh, record):
        fh.write(json.dumps(record) + "\n")
        fh.flush()

    def _plot(self, path: Path):
        """Loss curve (and eval points) as a PNG, without touching pyplot state."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        train = [(h["step"], h["loss"]) for h in self.state.log_history if "loss" in h]
        evals = [(h["step"], h["eval_loss"]) for h in self.state.log_history if "eval_loss" in h]
        if not train and not evals:
            return
        fig = Figure(figsize=(6, 4), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        if train:
            ax.plot(*zip(*train), label="train loss")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (token-weighted cross-entropy)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(str(path))
