"""`python -m minigpt4 train --cfg-path train_configs/X.yaml [--options key=value …]`: stage-1 / stage-2 training.

The loop is written out: AdamW on the trainable weights only, the original's warmup + cosine
schedule, gradient accumulation, clipping and mixed precision through Accelerate. The same command
runs data-parallel under `torchrun` or `accelerate launch`. The loss is a mean over every supervised
token of the global batch, whatever the number of processes and micro-batches, so N processes
train exactly as one process with an N× batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from tqdm import tqdm

from minigpt4.build import build_model
from minigpt4.commands.common import HelpFormatter, add_config_args, config_overrides
from minigpt4.config import ModelConfig
from minigpt4.data.labels import supervised_tokens
from minigpt4.data.loader import BatchPlan, build_loader, process_shards
from minigpt4.errors import ConfigError
from minigpt4.files import write_text_atomic
from minigpt4.model import MiniGPT4
from minigpt4.train import checkpoints
from minigpt4.train.checkpoints import CheckpointError
from minigpt4.train.config import (
    TRACKERS,
    RunConfig,
    TrainConfig,
    check_batch_layout,
    prepare_training,
)
from minigpt4.train.plot import PlotError, write_plot
from minigpt4.weights import WeightsError, load_trainable, save_trainable

log = logging.getLogger(__name__)

FINAL_WEIGHTS = "projection.safetensors"
METRICS = "metrics.jsonl"
CUBLAS_WORKSPACE_CONFIG = ":4096:8"  # the setting PyTorch documents for deterministic cuBLAS


class TrainingError(RuntimeError):
    """The run cannot go on (a NaN loss, an incompatible checkpoint); the message says why."""


def lr_at(run: RunConfig, step: int) -> float:
    """The learning rate of optimizer step `step` (0-based), as MiniGPT-4's scheduler sets it.

    Linear warmup from `warmup_lr` to `init_lr` over `warmup_steps`, then a cosine from `init_lr`
    to `min_lr` whose phase counts from step 0 over the whole run (max_epoch × iters_per_epoch).
    """
    if step < run.warmup_steps:
        return min(run.init_lr, run.warmup_lr + (run.init_lr - run.warmup_lr) * step / run.warmup_steps)
    return run.min_lr + (run.init_lr - run.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / run.total_steps))


def build_optimizer(model: MiniGPT4, run: RunConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights only; biases and 1-d weights get no weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    if not decay and not no_decay:
        raise TrainingError("the model has no trainable weight")
    groups = [{"params": decay, "weight_decay": run.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=run.init_lr, betas=(0.9, 0.999))


@dataclass
class TrainResult:
    step: int  # optimizer steps done (of the whole run)
    losses: list[float] = field(default_factory=list)  # the loss of each step this invocation ran
    corrupt: int = 0  # records skipped over the whole run
    checkpoint: Path | None = None
    weights: Path | None = None  # the final projection (+LoRA), once the run is complete
    main_process: bool = True


@dataclass
class _Progress:
    """What a checkpoint stores about the run besides weights and optimizer."""

    step: int = 0
    samples: int = 0  # records handed out (corrupt ones included): the data position
    corrupt: int = 0


def train(
    cfg: TrainConfig,
    resume: str | None = None,
    stop_after: int | None = None,
    cpu: bool = False,
) -> TrainResult:
    """Run (or continue) the training a config describes; see the module docstring."""
    run = cfg.run
    if run.deterministic:
        use_deterministic_algorithms()
    accelerator = make_accelerator(run, cpu)
    if run.log_with:
        accelerator.init_trackers(cfg.name, config=tracker_config(cfg))
    world, rank = accelerator.num_processes, accelerator.process_index
    global_micro = check_batch_layout(cfg, world)
    global_batch = global_micro * run.grad_accum_steps
    output_dir = Path(run.output_dir)

    model = build_model(model_config_for(run, cfg.model), device=accelerator.device)
    model.train()
    progress = _Progress()
    resume_from, state = _resume_from(output_dir, resume)
    if state is not None:
        _check_compatible(state, global_batch, global_micro, resume_from)
        load_trainable(model, resume_from / checkpoints.WEIGHTS)
        progress = _Progress(state["step"], state["samples"], state["corrupt"])
    optimizer = build_optimizer(model, run)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_seed(run.seed + rank)
    if state is not None and len(state["rng"]) == world:
        checkpoints.set_rng_state(state["rng"][rank])
    elif state is not None:
        log.warning(
            "the checkpoint has the RNG states of %d processes, not %d: fresh ones", len(state["rng"]), world
        )
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]

    plan = BatchPlan(global_micro, cfg.data.streams, rank, world)
    loader = build_loader(
        cfg.data, cfg.model, model, plan, seed=run.seed, start=progress.samples // global_micro
    )
    batches = iter(loader)
    if world > 1 and cfg.data.format == "webdataset":
        log.info("process %d of %d reads %s", rank, world, ", ".join(process_shards(cfg.data, plan)))
    if state is not None:
        log.info("resuming from %s at step %d of %d", resume_from, progress.step, run.total_steps)

    metrics = _Metrics(output_dir, accelerator, start_step=progress.step)
    result = TrainResult(
        step=progress.step, corrupt=progress.corrupt, main_process=accelerator.is_main_process
    )
    end = run.total_steps if stop_after is None else min(run.total_steps, progress.step + stop_after)
    bar = tqdm(
        total=run.total_steps, initial=progress.step, desc=cfg.name, unit="step",
        disable=not accelerator.is_main_process,
    )  # fmt: skip
    last_saved = None
    t_last, samples_last, rate = time.perf_counter(), 0, float("nan")
    for step in range(progress.step, end):
        out = train_step(accelerator, ddp_model, optimizer, params, batches, run, step)
        progress = _Progress(step + 1, progress.samples + global_batch, progress.corrupt + out.corrupt)
        result.losses.append(out.loss)
        samples_last += out.samples
        shown = {"loss": f"{out.loss:.4f}", "lr": f"{out.lr:.2e}"}
        if math.isfinite(rate):  # known from the first logged step on
            shown["samples_s"] = f"{rate:.1f}"
        bar.set_postfix(shown, refresh=False)
        bar.update(1)
        if (step + 1) % run.log_every == 0 or step + 1 == end:
            now = time.perf_counter()
            rate = samples_last / max(now - t_last, 1e-9)
            t_last, samples_last = now, 0
            metrics.write(
                step=step + 1, epoch=step // run.iters_per_epoch, loss=out.loss, lr=out.lr,
                grad_norm=out.grad_norm, samples_per_s=rate, corrupt=progress.corrupt,
            )  # fmt: skip
        if (run.save_every and (step + 1) % run.save_every == 0) or step + 1 == end:
            last_saved = _save(accelerator, model, optimizer, progress, global_batch, global_micro, cfg)
    bar.close()
    metrics.close()
    if accelerator.is_main_process and result.losses:
        try:
            log.info("loss and learning-rate plot: %s", write_plot(output_dir)[0])
        except (PlotError, OSError) as exc:
            log.warning("no plot: %s", exc)
    if world > 1:
        _check_ranks_agree(model, world)
    result.step, result.corrupt, result.checkpoint = progress.step, progress.corrupt, last_saved
    if progress.corrupt:
        log.warning("%d corrupt records were skipped over the run", progress.corrupt)
    if progress.step == run.total_steps:
        result.weights = output_dir / FINAL_WEIGHTS
        if accelerator.is_main_process:
            save_trainable(model, result.weights, {"config": cfg.name, "step": progress.step})
            log.info("trained weights: %s (set model.projection.checkpoint to it)", result.weights)
    accelerator.wait_for_everyone()
    accelerator.end_training()  # also destroys the process group of a multi-process run
    return result


def use_deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True)`, with the cuBLAS workspace it needs on CUDA.

    Without `CUBLAS_WORKSPACE_CONFIG` the first cuBLAS matmul of a deterministic run raises. It is
    read when cuBLAS starts, so it is set here, before any model is built; a value already in the
    environment is kept.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE_CONFIG)
    torch.use_deterministic_algorithms(True)


def model_config_for(run: RunConfig, model: ModelConfig) -> ModelConfig:
    """The model a run builds: under bf16 mixed precision an `auto` LLM dtype means bfloat16.

    `auto` is float16 on CUDA; frozen float16 weights under bf16 autocast would keep the LLM's
    norms and residual stream in float16's narrow range, which is what bf16 was chosen to avoid.
    """
    if run.mixed_precision == "bf16" and model.llm.dtype == "auto":
        return dataclasses.replace(model, llm=dataclasses.replace(model.llm, dtype="bfloat16"))
    return model


def make_accelerator(run: RunConfig, cpu: bool = False) -> Accelerator:
    """An Accelerator for the run: fp16 autocast on CUDA when `mixed_precision: auto`, and the
    trackers of `run.log_with` (local ones write under run.output_dir)."""
    # Accelerate joins CPU processes (gloo) only when told it runs on the CPU.
    cpu = cpu or not torch.cuda.is_available()
    precision = run.mixed_precision
    if precision == "auto":
        precision = "no" if cpu else "fp16"
    check_trackers(run.log_with)
    return Accelerator(
        cpu=cpu, mixed_precision=precision, log_with=run.log_with or None, project_dir=run.output_dir
    )


def check_trackers(names: list[str]) -> None:
    """Each tracker asked for must be installed: Accelerate alone would drop a missing one quietly."""
    from accelerate.tracking import get_available_trackers  # noqa: PLC0415

    available = {str(t) for t in get_available_trackers()}
    missing = [name for name in names if name not in available]
    if missing:
        raise ConfigError(
            f"run.log_with: {', '.join(missing)} is not installed (pip install {' '.join(missing)}); "
            f"installed here: {', '.join(sorted(available)) or 'none'}"
        )


def tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """The run's settings as the flat `section.key: value` map trackers store (str, int, float, bool)."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else key, sub)
        elif isinstance(value, (bool, int, float, str)):
            flat[prefix] = value
        else:  # None, lists: stored as text
            flat[prefix] = json.dumps(value)

    walk("", dataclasses.asdict(cfg))
    return flat


@dataclass
class StepResult:
    loss: float  # mean over every supervised token of the global batch
    lr: float
    grad_norm: float
    samples: int  # used samples, all processes
    corrupt: int  # skipped records, all processes


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    batches: Iterator[dict[str, Any]],
    run: RunConfig,
    step: int,
) -> StepResult:
    """One optimizer step (0-based `step`): schedule, forward/backward, clipping, update, NaN checks."""
    lr = lr_at(run, step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, samples, corrupt = forward_backward(accelerator, model, batches, run.grad_accum_steps, step)
    grad_norm = _clip(accelerator, params, run.max_grad_norm, step)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    _check_finite(params, step)
    return StepResult(loss, lr, grad_norm, samples, corrupt)


def forward_backward(
    accelerator: Accelerator, model: torch.nn.Module, batches: Iterator[dict[str, Any]], accum: int, step: int
) -> tuple[float, int, int]:
    """Forward/backward over `accum` micro-batches; returns (global mean loss, samples, corrupt)."""
    micro = [next(batches) for _ in range(accum)]
    counts = [supervised_tokens(b["labels"]) for b in micro]
    totals = torch.tensor(
        [sum(counts), sum(len(b["labels"]) for b in micro), sum(b["corrupt"] for b in micro)],
        dtype=torch.float64, device=accelerator.device,
    )  # fmt: skip
    tokens, samples, corrupt = (int(v) for v in accelerator.reduce(totals, "sum").tolist())
    if tokens == 0:
        raise TrainingError(f"step {step + 1}: the batch has no supervised token (every label is -100)")
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for i, (batch, n) in enumerate(zip(micro, counts, strict=True)):
        inputs = {k: v.to(accelerator.device) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        sync = nullcontext() if i == accum - 1 else accelerator.no_sync(model)
        with sync, accelerator.autocast():
            out = model(**inputs)
            # The model's loss is a mean over this micro-batch's n tokens; re-weight it into a share
            # of the global sum, × processes because gradient all-reduce averages over them.
            accelerator.backward(out.loss * (n * accelerator.num_processes / tokens))
        loss_sum += out.loss.detach().double() * n
    loss = float(accelerator.reduce(loss_sum, "sum")) / tokens
    if not math.isfinite(loss):
        raise TrainingError(
            f"step {step + 1}: the loss is {loss}; stopped before updating the weights "
            "(the last checkpoint is intact: lower the learning rate or check the data)"
        )
    return loss, samples, corrupt


def _clip(
    accelerator: Accelerator, params: list[torch.nn.Parameter], max_norm: float | None, step: int
) -> float:
    if max_norm is None:
        return float("nan")
    accelerator.unscale_gradients()  # a no-op without fp16 grad scaling
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    if not math.isfinite(norm) and accelerator.mixed_precision != "fp16":
        # Under fp16 the grad scaler skips such a step itself; elsewhere it is a real blow-up.
        raise TrainingError(
            f"step {step + 1}: the gradient norm is {norm}; stopped before updating the weights"
        )
    return norm


def _check_ranks_agree(model: MiniGPT4, world: int) -> None:
    """Data-parallel ranks must end with the same weights, bit for bit; anything else is a bug."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.trainable_state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    if len(set(digests)) != 1:
        raise TrainingError(f"the {world} processes ended with different weights: {digests}")
    log.info("the trained weights are identical on all %d processes (sha256 %s)", world, digests[0][:16])


def _check_finite(params: list[torch.nn.Parameter], step: int) -> None:
    if not all(bool(torch.isfinite(p).all()) for p in params):
        raise TrainingError(
            f"step {step + 1}: the update made the weights NaN or inf; stopped without saving them "
            "(the last checkpoint is intact: lower the learning rate)"
        )


def _save(
    accelerator: Accelerator,
    model: MiniGPT4,
    optimizer: torch.optim.Optimizer,
    progress: _Progress,
    global_batch: int,
    global_micro: int,
    cfg: TrainConfig,
) -> Path:
    path = checkpoints.step_dir(cfg.run.output_dir, progress.step)
    rng = gather_object([checkpoints.rng_state()])
    if accelerator.is_main_process:
        state = {
            "step": progress.step,
            "samples": progress.samples,
            "corrupt": progress.corrupt,
            "global_batch": global_batch,
            "global_micro": global_micro,
            "optimizer": optimizer.state_dict(),
            "rng": rng,
            "config": json.dumps(dataclasses.asdict(cfg)),
        }
        checkpoints.save_checkpoint(path, model, state, {"config": cfg.name, "step": progress.step})
        checkpoints.prune_checkpoints(cfg.run.output_dir, cfg.run.keep_checkpoints)
    accelerator.wait_for_everyone()
    return path


def _resume_from(output_dir: Path, resume: str | None) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to continue from and its state: with `auto` the newest one that reads completely."""
    if resume == "auto":
        found = checkpoints.load_latest(output_dir)
        if found is None:
            log.info("--resume auto: no readable checkpoint in %s yet, starting from step 0", output_dir)
            return None, None
        if found[0] != checkpoints.latest_checkpoint(output_dir):
            log.warning("--resume auto: continuing from %s, the newest complete checkpoint", found[0])
        return found
    if resume:
        return Path(resume), checkpoints.load_state(resume)
    latest = checkpoints.latest_checkpoint(output_dir)
    if latest is not None:
        raise TrainingError(
            f"{output_dir} already holds checkpoints (latest: {latest.name}); pass --resume auto to "
            "continue that run, or set run.output_dir to a new folder"
        )
    return None, None


def _check_compatible(state: dict[str, Any], global_batch: int, global_micro: int, path: Path) -> None:
    if state["global_batch"] != global_batch:
        raise TrainingError(
            f"{path}: the run used a global batch of {state['global_batch']} samples per step, this one "
            f"{global_batch} (batch_size × processes × grad_accum_steps); resume with the same global batch"
        )
    if state["samples"] % global_micro:
        raise TrainingError(
            f"{path}: data position {state['samples']} is not a whole number of micro-batches"
        )


class _Metrics:
    """One JSON line per logged step in <output_dir>/metrics.jsonl, and the same values to the
    Accelerate trackers of `run.log_with` (on the main process only)."""

    def __init__(self, output_dir: Path, accelerator: Accelerator, start_step: int = 0) -> None:
        self.file = None
        self.accelerator = accelerator
        if not accelerator.is_main_process:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        _truncate_metrics(output_dir / METRICS, start_step)
        self.file = open(output_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, step: int, **values: float) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        self.file.flush()
        if self.accelerator.trackers:
            self.accelerator.log({f"train/{name}": value for name, value in values.items()}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines of steps after `step`: a resumed run logs them again (they were not saved)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short when the run was killed
    write_text_atomic(path, "".join(kept))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter, prog="python -m minigpt4 train", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--cfg-path", required=True, help="a train YAML, or a name in train_configs/")
    parser.add_argument(
        "--resume", default=None, metavar="auto|DIR",
        help="continue from the latest checkpoint of run.output_dir (auto) or from a checkpoint folder",
    )  # fmt: skip
    parser.add_argument(
        "--stop-after", type=int, default=None, metavar="N",
        help="run at most N steps now, save a checkpoint and exit (continue later with --resume auto)",
    )  # fmt: skip
    parser.add_argument(
        "--log-with", nargs="+", default=None, metavar="TRACKER", choices=TRACKERS,
        help=f"Accelerate trackers to log to (sets run.log_with; {', '.join(TRACKERS)})",
    )  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)  # now --device cpu
    add_config_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Train from the command line; see `train --help`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cpu:
        parser.error("--cpu is now --device cpu")
    overrides = config_overrides(parser, args)
    if args.log_with is not None:
        overrides.append(f"run.log_with={json.dumps(args.log_with)}")
    try:
        cfg = prepare_training(args.cfg_path, overrides)
        result = train(cfg, resume=args.resume, stop_after=args.stop_after, cpu=args.device == "cpu")
    except (ConfigError, TrainingError, CheckpointError, WeightsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not result.main_process:
        return 0
    if result.losses:
        print(
            f"steps {result.step - len(result.losses) + 1}–{result.step}: loss {result.losses[0]:.4f} → {result.losses[-1]:.4f}"
        )
    if result.weights is not None:
        print(f"trained weights: {result.weights}")
    elif result.checkpoint is not None:
        print(f"stopped at step {result.step}; continue with --resume auto ({result.checkpoint})")
    return 0
