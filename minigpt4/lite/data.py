"""`python -m minigpt4 make-data lite`: the lite bridge's training data, made offline.

There are no ImageNet photos here, so the images are rendered scenes (`minigpt4.data.scenes`) whose
content is known exactly: stage 1 learns short captions that say where each shape is; stage 2 learns
the chat format on detailed descriptions, short colour / shape / position / count questions (the
paper's known weakness) and yes/no probes. What the backbone recognises in a real photo reaches the LLM
through the class tokens, whose bridge weights start as the class names' embeddings
(`bridge_init.safetensors`, see `minigpt4.lite.vision.initial_bridge`).

    <out>/stage1/shard-0000N.tar          webdataset: jpg + json {"caption": …}
    <out>/cc_sbu_align/filter_cap.json    {"annotations": [{"image_id", "instruction", "caption"}]}
    <out>/cc_sbu_align/image/<id>.jpg
    <out>/bridge_init.safetensors         the bridge (`llama_proj.*`) that stage 1 starts from
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import webdataset as wds
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoTokenizer

from minigpt4.config import LLMConfig, from_dict, read_yaml, resolve_path
from minigpt4.data import scenes
from minigpt4.data.make import jpeg_bytes, write_atomic
from minigpt4.lite.gguf_llm import converted_dir
from minigpt4.lite.packages import resolve_package_path
from minigpt4.lite.vision import initial_bridge

DESCRIBE_INSTRUCTIONS = (
    "Describe this image.",
    "Describe this image in detail.",
    "What is in this image?",
    "What do you see in this picture?",
    "Could you describe the contents of this image for me?",
)
ONE_SENTENCE = "Describe this image in one sentence."
# The VQA convention (LLaVA, and this project's eval): half the short questions carry it.
SHORT_ANSWER_HINT = "Answer the question using a single word or phrase."
# Shares of stage-2 examples: detailed description, one short question, one yes/no probe.
STAGE2_MIX = {"describe": 0.3, "question": 0.5, "probe": 0.2}


def positional_caption(scene: scenes.Scene) -> str:
    """ "a red circle in the top left and a blue square in the center" """
    return scenes._join([f"{scenes._article(o.colour)} {o.name} in the {o.position}" for o in scene.objects])


def short_answer(answer: str) -> str:
    """ "top left" → "Top left." : a sentence, still an exact match after VQA answer normalisation."""
    return answer[0].upper() + answer[1:] + "."


def stage2_example(scene: scenes.Scene, rng: random.Random) -> tuple[str, str]:
    """One (instruction, answer) pair about `scene`, of a kind drawn by STAGE2_MIX."""
    kind = rng.choices(list(STAGE2_MIX), weights=list(STAGE2_MIX.values()))[0]
    if kind == "describe":
        instruction = rng.choice(DESCRIBE_INSTRUCTIONS + (ONE_SENTENCE,))
        if instruction == ONE_SENTENCE:
            return instruction, short_answer(positional_caption(scene))
        return instruction, scenes.describe(scene)
    pairs = scenes.questions(scene, rng) if kind == "question" else scenes.pope_probes(scene, rng, 1)
    question, answer = rng.choice(pairs)
    if rng.random() < 0.5:
        question = f"{question} {SHORT_ANSWER_HINT}"
    return question, short_answer(answer)


def write_stage1(out_dir: Path, rng: random.Random, n_shards: int, per_shard: int) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for shard in tqdm(range(n_shards), desc="stage 1 shards", unit="shard"):

        def write(tmp: Path, shard: int = shard) -> None:
            with wds.TarWriter(str(tmp)) as sink:
                for i in range(per_shard):
                    scene = scenes.render_scene(rng)
                    caption = json.dumps({"caption": positional_caption(scene)})
                    sink.write(
                        {"__key__": f"{shard:05d}{i:04d}", "jpg": jpeg_bytes(scene.image), "json": caption}
                    )

        write_atomic(out_dir / f"shard-{shard:05d}.tar", write)


def write_stage2(out_dir: Path, rng: random.Random, n: int) -> None:
    image_dir = out_dir / "image"
    image_dir.mkdir(parents=True, exist_ok=True)
    annotations = []
    for i in tqdm(range(n), desc="stage 2 examples", unit="image"):
        scene = scenes.render_scene(rng)
        image_id = f"{i:05d}"
        data = jpeg_bytes(scene.image)
        write_atomic(image_dir / f"{image_id}.jpg", lambda tmp, data=data: tmp.write_bytes(data))
        instruction, answer = stage2_example(scene, rng)
        annotations.append({"image_id": image_id, "instruction": instruction, "caption": answer})
    text = json.dumps({"annotations": annotations}, indent=1)
    write_atomic(out_dir / "filter_cap.json", lambda tmp: tmp.write_text(text))


def write_bridge_init(path: Path, cfg_path: str) -> None:
    """The starting bridge for the LLM of a config's `model.llm`: only its tokenizer and input embeddings are read."""
    llm = from_dict(LLMConfig, read_yaml(resolve_path(cfg_path))["model"]["llm"], f"{cfg_path}: model.llm")
    folder = converted_dir(resolve_path(resolve_package_path(llm.pretrained, "the lite LLM")), llm.gguf_file)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as weights:
        embeddings = weights.get_tensor("model.embed_tokens.weight")
    write_atomic(path, lambda tmp: save_file(initial_bridge(tokenizer, embeddings), str(tmp)))


def add_parser(sets: argparse._SubParsersAction) -> None:
    """Register `make-data lite`."""
    lite = sets.add_parser(
        "lite", help="the lite bridge's training data (rendered scenes) and starting weights"
    )
    lite.add_argument("--out", default="data/lite", help="output folder (default: data/lite)")
    lite.add_argument("--seed", type=int, default=1000, help="scene seed (the eval set uses others)")
    lite.add_argument("--shards", type=int, default=2, help="stage-1 shards")
    lite.add_argument("--per-shard", type=int, default=500, help="scenes per stage-1 shard")
    lite.add_argument("--stage2", type=int, default=600, help="stage-2 examples")
    lite.add_argument(
        "--cfg-path",
        default="train_configs/lite_stage1.yaml",
        help="the config whose model.llm the bridge feeds",
    )
    lite.set_defaults(run=make_lite)


def make_lite(args: argparse.Namespace) -> int:
    out = Path(args.out)
    rng = random.Random(args.seed)
    write_stage1(out / "stage1", rng, args.shards, args.per_shard)
    write_stage2(out / "cc_sbu_align", rng, args.stage2)
    out.mkdir(parents=True, exist_ok=True)
    write_bridge_init(out / "bridge_init.safetensors", args.cfg_path)
    print(f"wrote the lite training data under {out}")
    return 0
