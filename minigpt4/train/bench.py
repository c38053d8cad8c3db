"""`python -m minigpt4 bench train --cfg-path …`: training speed with and without the feature cache.

Three measurements on the same config, model and process, side by side:
  images    the real training step, data from images (decode, preprocess, ViT, Q-Former)
  cache     the real training step, data from cached frozen features (`cache-features`)
  llm-only  the frozen LLM's forward + backward alone, on embeddings of the same batches held in
            memory: the floor, since the projection sits at the LLM's input and every step must
            back-propagate through the whole LLM.
The overhead ratio (cache step time ÷ LLM-only step time) shows what is left of data loading and
the vision stack once the cache is used; 1.0 means they are fully hidden.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from minigpt4.build import build_model
from minigpt4.commands.common import HelpFormatter
from minigpt4.data.config import DataConfig
from minigpt4.data.loader import BatchPlan, build_loader
from minigpt4.errors import ConfigError
from minigpt4.train.config import TrainConfig, check_batch_layout, prepare_training
from minigpt4.train.features import cache_features
from minigpt4.train.loop import build_optimizer, make_accelerator, train_step

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Timing:
    samples: int
    seconds: float

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds

    def step_ms(self, steps: int) -> float:
        return 1000 * self.seconds / steps


def _interleaved(
    kinds: dict[str, Callable[[int], int]], warmup: int, steps: int, rounds: int
) -> dict[str, Timing]:
    """Time each kind's steps in `rounds` alternating slices, so that load on a shared machine
    that comes and goes weighs on every kind alike. A step function takes its step number and
    returns the samples it used."""
    for run_step in kinds.values():
        for i in range(warmup):
            run_step(i)
    timings = {name: Timing(0, 0.0) for name in kinds}
    bounds = [warmup + steps * r // rounds for r in range(rounds + 1)]
    for lo, hi in itertools.pairwise(bounds):
        for name, run_step in kinds.items():
            start = time.perf_counter()
            samples = sum(run_step(i) for i in range(lo, hi))
            timings[name] = Timing(
                timings[name].samples + samples, timings[name].seconds + time.perf_counter() - start
            )
    return timings


def bench_train(
    cfg: TrainConfig, steps: int = 20, warmup: int = 3, rounds: int = 4, features: Path | None = None
) -> dict[str, Any]:
    """Measure the three step kinds on `cfg`; `features`: an existing cache (default: make one)."""
    accelerator = make_accelerator(cfg.run)
    if accelerator.num_processes > 1:
        raise SystemExit("bench train measures one process; run it without torchrun / accelerate launch")
    model = build_model(cfg.model, device=accelerator.device)
    model.train()
    optimizer = build_optimizer(model, cfg.run)
    model, optimizer = accelerator.prepare(model, optimizer)
    params = [p for p in model.parameters() if p.requires_grad]
    plan = BatchPlan(check_batch_layout(cfg, 1), cfg.data.streams)
    accum = cfg.run.grad_accum_steps

    def trainer(data: DataConfig) -> Callable[[int], int]:
        batches = iter(build_loader(data, cfg.model, model, plan, cfg.run.seed))
        return lambda step: train_step(accelerator, model, optimizer, params, batches, cfg.run, step).samples

    with tempfile.TemporaryDirectory() as tmp:
        if features is None:
            features = Path(tmp) / "features"
            log.info("computing a temporary feature cache of the whole data set in %s", features)
            cache_features(cfg.data, cfg.model, features)
        cached_cfg = dataclasses.replace(cfg.data, features=str(features))
        loader = build_loader(cached_cfg, cfg.model, model, plan, cfg.run.seed)
        held = list(itertools.islice(iter(loader), (warmup + steps) * accum))
        embeds = [model.embed_inputs(b["input_ids"], model.project(b["features"])).detach() for b in held]

        def llm_step(step: int) -> int:
            samples = 0
            for inputs, batch in list(zip(embeds, held, strict=True))[step * accum : (step + 1) * accum]:
                with accelerator.autocast():
                    out = model.llm(
                        inputs_embeds=inputs.requires_grad_(), attention_mask=batch["attention_mask"],
                        labels=batch["labels"], use_cache=False,
                    )  # fmt: skip
                out.loss.backward()
                inputs.grad = None
                samples += len(batch["labels"])
            return samples

        kinds = {"no_cache": trainer(cfg.data), "cache": trainer(cached_cfg), "llm_only": llm_step}
        timings = _interleaved(kinds, warmup, steps, rounds)
    images, cached, llm_only = timings["no_cache"], timings["cache"], timings["llm_only"]
    return {
        "config": cfg.name,
        "device": str(accelerator.device),
        "threads": torch.get_num_threads(),
        "batch_size": cfg.run.batch_size * cfg.run.grad_accum_steps,
        "steps": steps,
        "num_workers": cfg.data.num_workers,
        "samples_per_s_no_cache": images.samples_per_s,
        "samples_per_s_cache": cached.samples_per_s,
        "samples_per_s_llm_only": llm_only.samples_per_s,
        "step_ms_no_cache": images.step_ms(steps),
        "step_ms_cache": cached.step_ms(steps),
        "step_ms_llm_only": llm_only.step_ms(steps),
        "cache_speedup": cached.samples_per_s / images.samples_per_s,
        "overhead_ratio": cached.step_ms(steps) / llm_only.step_ms(steps),
        "peak_rss_mb": _peak_rss_mb(),
    }


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (data workers), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, children) / 1024  # ru_maxrss is in KiB on Linux


def format_report(r: dict[str, Any]) -> str:
    rows = [
        ("images (no cache)", r["samples_per_s_no_cache"], r["step_ms_no_cache"]),
        ("cached features", r["samples_per_s_cache"], r["step_ms_cache"]),
        ("LLM fwd+bwd only", r["samples_per_s_llm_only"], r["step_ms_llm_only"]),
    ]
    lines = [
        f"bench train: {r['config']} on {r['device']} ({r['threads']} threads), batch {r['batch_size']}, "
        f"{r['steps']} steps each (timed in alternating slices), {r['num_workers']} data workers",
        f"  {'':<20}{'samples/s':>12}{'ms/step':>12}",
        *(f"  {name:<20}{sps:>12.1f}{ms:>12.1f}" for name, sps, ms in rows),
        f"cache speed-up: {r['cache_speedup']:.2f}×   overhead ratio (cache ÷ LLM-only): "
        f"{r['overhead_ratio']:.2f}   peak RSS: {r['peak_rss_mb']:.0f} MB",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        prog="python -m minigpt4 bench train",
        description=__doc__.split("\n")[0],
    )
    parser.add_argument("--cfg-path", required=True, help="a train YAML, or a name in train_configs/")
    parser.add_argument("--steps", type=int, default=20, help="measured steps of each kind")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps first")
    parser.add_argument("--rounds", type=int, default=4, help="alternating slices the steps are timed in")
    parser.add_argument(
        "--features", default=None, help="an existing cache-features folder (default: make one)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Benchmark training speed; `argv` are the arguments after `bench train`."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = prepare_training(args.cfg_path, args.overrides)
        features = Path(args.features) if args.features else None
        report = bench_train(cfg, args.steps, args.warmup, args.rounds, features)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
