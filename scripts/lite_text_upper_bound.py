"""How well the lite preset's LLM answers scene questions when it is *told* the scene in words.

An upper bound for the projection: the frozen SmolLM2-135M-Instruct gets a perfect text description of
a rendered scene ("top left: red circle. center: blue square.") instead of image tokens, and the
eval's VQA question and prompt. Scored like `python -m minigpt4 eval --task vqa`: VQA accuracy after
the official normalisation, and option accuracy (the one option of the question's closed answer set
that the answer names), per question kind.

    PYTHONPATH=. python scripts/lite_text_upper_bound.py [--scenes 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import random
from collections import defaultdict

import torch

from minigpt4.build import load_llm, load_tokenizer
from minigpt4.config import load_preset
from minigpt4.data import scenes
from minigpt4.eval.metrics import option_answer, vqa_accuracy
from minigpt4.eval.run import VQA_PROMPT


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    cfg = load_preset("minigpt4_lite").model.llm
    tokenizer = load_tokenizer(cfg)
    llm = load_llm(cfg, tokenizer, torch.device("cpu"))
    rng = random.Random(args.seed)
    scores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for _ in range(args.scenes):
        scene = scenes.render_scene(rng)
        words = " ".join(f"{o.position}: {o.colour} {o.shape}." for o in scene.objects)
        for question, answer in rng.sample(scenes.questions(scene, rng), 3):
            content = f"Picture: {words}\n{VQA_PROMPT.format(question=question)}"
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": content}],
                add_generation_prompt=True,
                return_tensors="pt",
                return_dict=True,
            )["input_ids"]
            with torch.no_grad():
                out = llm.generate(
                    ids, max_new_tokens=10, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            reply = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
            read = option_answer(reply, scenes.answer_options(question)) or ""
            scores[scenes.question_kind(question)].append(
                (vqa_accuracy(reply, [answer] * 10), float(read == answer))
            )

    def percent(values: list[tuple[float, float]], i: int) -> float:
        return 100 * sum(v[i] for v in values) / len(values)

    everything = [s for kind in scores.values() for s in kind]
    print(f"text upper bound, {len(everything)} questions: VQA accuracy / option accuracy")
    print(f"  {'all':<9} {percent(everything, 0):5.1f}% / {percent(everything, 1):5.1f}%")
    for kind, values in sorted(scores.items()):
        print(
            f"  {kind:<9} {percent(values, 0):5.1f}% / {percent(values, 1):5.1f}%  ({len(values)} questions)"
        )


if __name__ == "__main__":
    main()
