"""`python -m minigpt4 bench original`: a CPU preset of the original release at its real size.

    python -m minigpt4 bench original --cfg-path minigpt4_vicuna0_7b_cpu --threads 2
    python -m minigpt4 bench original --weights q4_0,q4_k_m --vision-dtype bfloat16,float32

Speed and memory do not depend on the weights' values, so no real weights are needed: the vision side
is built from the preset's config (BLIP-2's ViT-g and Q-Former, or the ViT alone) with random values
in the preset's precision, the projection is a random Linear, and the LLM is a LLaMA GGUF of the
preset's size (7B or 13B) with random weights at each `--weights` type, written once by the converter's
own writer (`random_llama_gguf`) into `--work` (about 4 GB a file for 7B; not kept in git). llama.cpp
decodes it with the preset's context and sequences, through the decode engine, as the chat does.

Each variant (LLM weights × ViT precision) runs in a process of its own, so that its peak RSS is its
own. Its figures, each the fastest of `--repeats` runs:
- image encode s: preprocessing, the vision side and the projection of one 224 px image;
- first-question TTFT s: the image encoded, the vicuna0 prompt of one question prefilled (the image
  vectors and `PROMPT_TOKENS` text tokens), the first token decoded;
- decode tok/s: the tokens after the first of an n-token answer to that prompt over their time (the
  prefill, whose time varies from run to run, stays out);
- the bandwidth limit: passes per second over exactly the bytes one decode step reads
  (`minigpt4.eval.bandwidth`), and `bandwidth_fraction` = decode tok/s / that limit;
- peak RSS of the chat path (measured before the limit pass, which copies the weights once more).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from minigpt4.commands.common import HelpFormatter, at_least
from minigpt4.config import ModelConfig, VisionConfig, load_preset
from minigpt4.errors import ConfigError

# Text tokens of the vicuna0 prompt around one image and the question "What is in this image?"
# (the system prompt and `###Human: <Img>`, then `</Img> What is in this image?###Assistant:`), as
# LLaMA's sentencepiece vocabulary splits them (llama.cpp's ggml-vocab-llama-spm.gguf): <s> and 41
# before the image's positions, 19 after.
PROMPT_TOKENS = (41, 19)
TARGETS = (("peak_rss_gb", 8.0, "max"), ("bandwidth_fraction", 0.6, "min"), ("encode_s", 10.0, "max"))
WEIGHTS = ("q4_0", "q4_k_m", "q8_0", "f16")
VISION_DTYPES = ("float32", "bfloat16")


# The LLMs of the original release that are not 7B, by hub id.
_13B = ("Vision-CAIR/vicuna",)


def real_size_overrides(preset: str, options: Sequence[str]) -> list[str]:
    """The preset with no file to read: no projection checkpoint, and the vision side random at the
    shapes of BLIP-2's EVA ViT-g and Q-Former (the configs the hub files hold), then `options`."""
    from minigpt4.vision import EVA_VIT_G, QFORMER_BASE  # noqa: PLC0415

    kind = load_preset(preset, ["model.projection.checkpoint=null"]).model.vision.kind
    shapes = {"vision": EVA_VIT_G, **({"qformer": QFORMER_BASE} if kind == "blip2" else {})}
    return [
        "model.projection.checkpoint=null",
        "model.vision.pretrained=null",
        "model.vision.lavis_checkpoint=null",
        "model.vision.eva_vit_checkpoint=null",
        # YAML, not JSON: PyYAML reads JSON's 1e-06 as a string
        f"model.vision.random_init={yaml.safe_dump(shapes, default_flow_style=True, width=10**6).strip()}",
        *options,
    ]


def llm_shape(cfg: ModelConfig) -> str:
    """The LLaMA size of a preset's LLM, from its hub id (7B unless it is a 13B one)."""
    name = cfg.llm.pretrained or ""
    return "13b" if name in _13B or "13b" in name.lower() else "7b"


def random_vision(cfg: VisionConfig, dtype: str) -> torch.nn.Module:
    """The preset's vision side at its real size with random values, made as a real load makes it:
    on the meta device, halved where `dtype` says, then given memory (no float32 copy beside it)."""
    from minigpt4.vision import Blip2Vision, blip2_configs, vit_half_dtype  # noqa: PLC0415

    vision_config, qformer_config = blip2_configs(cfg)
    with torch.device("meta"):
        module = Blip2Vision(vision_config, qformer_config, cfg.num_query_tokens, cfg.image_size)
    half = vit_half_dtype(dtype, torch.device("cpu"))
    if half is not None:
        module.store_vit_half(half)  # as build_vision does on a CPU
    module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.normal_(0.0, 0.02, generator=generator)
    return module.eval()


@torch.no_grad()
def measure_variant(
    preset: str, options: Sequence[str], gguf: Path, vision_dtype: str, repeats: int, decode_tokens: int
) -> dict[str, Any]:
    """Every figure of one variant, in this process (see the module docstring)."""
    from minigpt4.decode.engine import Engine  # noqa: PLC0415
    from minigpt4.decode.inputs import IMAGE_TOKEN_ID, PromptInput  # noqa: PLC0415
    from minigpt4.decode.llama_cpp import LlamaCppRuntime  # noqa: PLC0415
    from minigpt4.decode.stops import NO_STOPS  # noqa: PLC0415
    from minigpt4.eval.bandwidth import WeightStream  # noqa: PLC0415
    from minigpt4.eval.bench import default_image, fastest  # noqa: PLC0415
    from minigpt4.generation import GenerationParams  # noqa: PLC0415

    cfg = load_preset(preset, real_size_overrides(preset, options)).model
    vision = random_vision(cfg.vision, vision_dtype)
    runtime = LlamaCppRuntime(gguf, cfg.max_context_tokens, cfg.llm.max_sequences)
    projection = torch.nn.Linear(vision.feature_dim, runtime.hidden)
    image = default_image()

    def encode() -> torch.Tensor:
        return projection(vision(vision.preprocess([image])))[0]

    encode()  # warm-up: lazy initialisation
    encode_s = fastest(encode, repeats)

    engine = Engine(runtime, NO_STOPS, pad_id=0)
    before, after = PROMPT_TOKENS
    words = torch.randint(300, 32000, (before + after,), generator=torch.Generator().manual_seed(0)).tolist()
    ids = [1, *words[:before], *[IMAGE_TOKEN_ID] * vision.n_tokens, *words[before:]]

    def answer(vectors: torch.Tensor, n_tokens: int) -> list[float]:
        """The times at which each token came (no key: nothing reused, the whole prompt prefilled)."""
        params = GenerationParams(max_new_tokens=n_tokens, do_sample=False)
        return [time.perf_counter() for _ in engine.generate(PromptInput(ids, vectors), params)]

    def first_question() -> None:
        answer(encode(), 1)

    vectors = encode()
    answer(vectors, 2)  # warm-up
    ttft_s = fastest(first_question, repeats)
    # Decode: the tokens after the first of one answer, so the prefill's own variation stays out.
    gaps = []
    for _ in range(repeats):
        times = answer(vectors, decode_tokens)
        gaps.append((times[-1] - times[0]) / (len(times) - 1))
    decode_tok_s = 1 / min(gaps)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # KiB on Linux
    stream = WeightStream(runtime.decode_weight_tensors())
    limit_tok_s = 1 / min(stream.seconds_per_pass(1) for _ in range(repeats))
    return {
        "vision_dtype": vision_dtype,
        "gguf": gguf.name,
        "gguf_gb": gguf.stat().st_size / 1e9,
        "image_positions": vision.n_tokens,
        "prompt_positions": len(ids),
        "encode_s": encode_s,
        "ttft_s": ttft_s,
        "decode_tok_s": decode_tok_s,
        "limit_tok_s": limit_tok_s,
        "limit_gb_s": stream.bytes * limit_tok_s / 1e9,
        "bandwidth_fraction": decode_tok_s / limit_tok_s,
        "peak_rss_gb": peak_rss_gb,
    }


def _variant_in_new_process(args: argparse.Namespace, gguf: Path, vision_dtype: str) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "minigpt4", "bench", "original", "--cfg-path", args.cfg_path,
        "--threads", str(args.threads), "--repeats", str(args.repeats), "--decode-tokens", str(args.decode_tokens),
        "--variant", f"{gguf}:{vision_dtype}", *(["--options", *args.options] if args.options else []),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the variant {gguf.name} / {vision_dtype} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def format_report(result: dict[str, Any]) -> str:
    lines = [
        f"MiniGPT-4 at its real size, random weights: preset {result['preset']} (LLaMA {result['llm']}), "
        f"{result['threads']} threads, fastest of {result['repeats']} runs, load average {result['load']}",
        f"prompt: {result['variants'][0]['prompt_positions']} positions "
        f"({result['variants'][0]['image_positions']} of them the image's); decode {result['decode_tokens']} tokens",
        "",
        "  LLM weights  GGUF     ViT       encode   TTFT     decode      limit (GB/s)      fraction  peak RSS",
    ]
    for v in result["variants"]:
        lines.append(
            f"  {v['weights']:<11}  {v['gguf_gb']:4.1f} GB  {v['vision_dtype']:<8}  {v['encode_s']:5.1f} s  "
            f"{v['ttft_s']:5.1f} s  {v['decode_tok_s']:5.2f} tok/s  {v['limit_tok_s']:5.2f} tok/s ({v['limit_gb_s']:4.1f})  "
            f"{v['bandwidth_fraction']:8.2f}  {v['peak_rss_gb']:5.2f} GB"
        )
    lines += ["", "targets (7B, 2-core CPU)"]
    for v in result["variants"]:
        verdicts = []
        for key, limit, kind in TARGETS:
            met = v[key] <= limit if kind == "max" else v[key] >= limit
            verdicts.append(f"{key} {'≤' if kind == 'max' else '≥'} {limit:g}: {'met' if met else 'NOT met'}")
        lines.append(f"  {v['weights']} / {v['vision_dtype']}: " + "; ".join(verdicts))
    return "\n".join(lines)


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        unknown = [v for v in values if v not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)} (comma-separated)")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minigpt4 bench original",
        formatter_class=HelpFormatter,
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--cfg-path", default="minigpt4_vicuna0_7b_cpu", help="a CPU preset of the original release"
    )
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="preset overrides")
    p.add_argument(
        "--weights", type=_choices(WEIGHTS), default=["q4_0", "q4_k_m"], help="LLM GGUF types to measure"
    )
    p.add_argument(
        "--vision-dtype",
        type=_choices(VISION_DTYPES),
        default=list(VISION_DTYPES),
        help="ViT precisions to measure",
    )
    p.add_argument("--threads", type=at_least(1), default=2, help="torch and llama.cpp threads")
    p.add_argument(
        "--repeats", type=at_least(1), default=2, help="runs of each measurement (the fastest counts)"
    )
    p.add_argument(
        "--decode-tokens", type=at_least(2), default=16, help="new tokens in the decode measurement"
    )
    p.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where the random GGUF files are written (default: the cache's bench/)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # GGUF:DTYPE, run in this process
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    try:
        if args.variant is not None:
            gguf, _, dtype = args.variant.rpartition(":")
            result = measure_variant(
                args.cfg_path, args.options, Path(gguf), dtype, args.repeats, args.decode_tokens
            )
            print(json.dumps(result))
            return 0
        from minigpt4.decode.convert_llm import random_llama_gguf  # noqa: PLC0415
        from minigpt4.gguf_checkpoint import cache_root  # noqa: PLC0415

        cfg = load_preset(args.cfg_path, real_size_overrides(args.cfg_path, args.options))
        if cfg.model.llm.runtime != "llama_cpp" or cfg.model.vision.kind not in ("blip2", "blip2_patches"):
            raise ConfigError(
                f"{args.cfg_path}: bench original measures the CPU presets (BLIP-2 vision, llama.cpp)"
            )
        shape = llm_shape(cfg.model)
        work = args.work or cache_root() / "bench"
        variants = []
        for weights in args.weights:
            gguf = work / f"llama-{shape}-random-{weights}.gguf"
            if not gguf.is_file():
                random_llama_gguf(shape, gguf, weights)
            for dtype in args.vision_dtype:
                print(f"measuring {weights} / ViT {dtype} in a new process …", file=sys.stderr, flush=True)
                variants.append({"weights": weights, **_variant_in_new_process(args, gguf, dtype)})
    except (ConfigError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = {
        "preset": cfg.name,
        "llm": shape,
        "threads": args.threads,
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "variants": variants,
    }
    print(json.dumps(result, indent=1) if args.json else format_report(result))
    return 0
