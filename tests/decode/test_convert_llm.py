"""convert-llm: tiny random LLaMA checkpoints, saved by transformers, converted to GGUF and read by llama.cpp.

The checkpoints are built here (a few layers of 64 dims) with the tokenizers MiniGPT-4's LLMs use: a
sentencepiece model (Vicuna, LLaMA-2), the same as a tokenizer.json, and byte-level BPE ones.
"""

from __future__ import annotations

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from decode_helpers import greedy_tokens

from minigpt4.decode.inputs import IMAGE_TOKEN_ID, PromptInput
from minigpt4.errors import ConfigError

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from minigpt4.decode.convert_llm import convert_llm, converted_llm  # noqa: E402 (after the skips)
from minigpt4.decode.llama_cpp import LlamaCppRuntime  # noqa: E402
from minigpt4.decode.runtime import TorchRuntime  # noqa: E402

ASSETS = Path(__file__).resolve().parents[2] / "minigpt4" / "assets"
TRAIN_TEXT = [
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I "
    "provide it to you. Please answer my questions.",
    "###Human: <Img></Img> Describe this image in detail. ###Assistant: A red square on a table.",
    "[INST] <Img></Img> What is in the picture? [/INST] The colour is red, the shape a square, 42 of them.",
    "Ünïcödé and 日本語 text, café, naïve; tabs\tand\nnew lines.",
] * 20
# Text the GGUF must split as transformers does: special tokens, the vicuna0 separator, runs of
# spaces, tabs and newlines, digits, accents, CJK, an emoji (byte fallback), a trailing space.
CORPUS = [
    "Hello world",
    "###Human: <Img></Img> Describe this image in detail.###Assistant: A red square.###",
    "<s>[INST] What is in the picture? [/INST] A dog.</s><s>[INST] And now?",
    "two  spaces,   three, a\ttab and\nnew\n\nlines \n end ",
    "Ünïcödé: 日本語, café, naïve 🦙",
    "digits 12345 and 3.14, 2024-01-01",
    "",
]
# Text that starts with a space, itself or after a special token: sentencepiece (and llama.cpp, and the
# original MiniGPT-4's tokenizer) gives it its "▁" prefix on top; transformers 5's converted LLaMA
# tokenizer does not (" hi" → "▁", "h", "i" instead of "▁", "▁", "h", "i").
LEADING_SPACES = [" leading space", "  two leading spaces", "<s> after a special token", "</s>  two"]
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


# --- checkpoints ---------------------------------------------------------------------------------------


def sentencepiece_dir(directory: Path) -> Path:
    """A LLaMA tokenizer as Vicuna ships it: a sentencepiece BPE model and its tokenizer_config.json."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT), model_writer=proto, vocab_size=400, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    directory.mkdir(parents=True)
    (directory / "tokenizer.model").write_bytes(proto.getvalue())
    config = {
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": CHAT_TEMPLATE,
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def byte_level_bpe_dir(directory: Path, kind: str) -> Path:
    """A byte-level BPE tokenizer.json whose pre-tokenizer llama.cpp calls `kind`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "gpt-2":  # the tiny preset's own tokenizer
        shutil.copytree(ASSETS / "tiny_tokenizer", directory)
        return directory
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind != "llama-bpe")
    first = {"smollm": pre_tokenizers.Digits(individual_digits=True)}.get(kind) or pre_tokenizers.Split(
        Regex(LLAMA3_SPLIT), "isolated"
    )
    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([first, byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TRAIN_TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def tokenizer_dir(directory: Path, kind: str) -> Path:
    if kind == "sentencepiece":
        return sentencepiece_dir(directory)
    if kind == "llama-hf":  # the sentencepiece tokenizer as transformers saves it: tokenizer.json only
        from transformers import AutoTokenizer

        source = sentencepiece_dir(directory.with_name(directory.name + "-spm"))
        AutoTokenizer.from_pretrained(source, legacy=True).save_pretrained(directory)
        (directory / "tokenizer.model").unlink(missing_ok=True)
        return directory
    return byte_level_bpe_dir(directory, kind)


def save_checkpoint(directory: Path, tokenizer: Path, *, hidden: int = 64, layers: int = 2, seed: int = 0):
    """A random LLaMA (grouped-query attention, its logits far apart) saved with its tokenizer files."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    shutil.copytree(tokenizer, directory, dirs_exist_ok=True)
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(hf_tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
        bos_token_id=hf_tokenizer.bos_token_id, eos_token_id=hf_tokenizer.eos_token_id, rope_theta=10000.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The sentencepiece (Vicuna-like) checkpoint as one safetensors file, with its model in memory."""
    root = tmp_path_factory.mktemp("checkpoint")
    model = save_checkpoint(root / "vicuna-tiny", sentencepiece_dir(root / "tokenizer"))
    return root / "vicuna-tiny", model


@pytest.fixture(scope="module")
def converted(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The checkpoint as float32 and float16 GGUF files."""
    root = tmp_path_factory.mktemp("gguf")
    return {w: convert_llm(checkpoint[0], root / f"tiny-{w}.gguf", w) for w in ("f32", "f16")}


def gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}


# --- (a) the tokenizer ---------------------------------------------------------------------------------


# Each kind of tokenizer and llama.cpp's tokenizer for it.
GGUF_TOKENIZERS = {
    "sentencepiece": "llama",
    "llama-hf": "llama",
    "gpt-2": "gpt2",
    "smollm": "gpt2",
    "llama-bpe": "gpt2",
}


@pytest.mark.parametrize("kind", GGUF_TOKENIZERS)
def test_the_gguf_tokenizes_as_transformers_does(tmp_path, kind):
    from transformers import AutoTokenizer

    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, tokenizer_dir(tmp_path / "tokenizer", kind), hidden=16, layers=1)
    path = convert_llm(directory, tmp_path / "tiny.gguf")
    hf = AutoTokenizer.from_pretrained(directory, legacy=True)
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in CORPUS:
        for add_special in (True, False):
            expected = hf(text, add_special_tokens=add_special).input_ids
            assert vocab.tokenize(text.encode(), add_bos=add_special, special=True) == expected, (
                text,
                add_special,
            )
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == GGUF_TOKENIZERS[kind]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == hf.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"].contents() == hf.eos_token_id
    assert fields["tokenizer.chat_template"].contents() == hf.chat_template
    text = vocab.detokenize(hf(CORPUS[3], add_special_tokens=False).input_ids).decode()
    # llama.cpp keeps the "▁" prefix sentencepiece put before the first word, as a space.
    assert (text.removeprefix(" ") if GGUF_TOKENIZERS[kind] == "llama" else text) == CORPUS[3]


@pytest.mark.parametrize("kind", ["sentencepiece", "llama-hf"])
def test_sentencepiece_text_after_a_space_tokenizes_as_sentencepiece_does(tmp_path, kind):
    import sentencepiece as spm

    directory = tmp_path / "checkpoint"
    save_checkpoint(directory, tokenizer_dir(tmp_path / "tokenizer", kind), hidden=16, layers=1)
    path = convert_llm(directory, tmp_path / "tiny.gguf")
    model = tmp_path / ("tokenizer" if kind == "sentencepiece" else "tokenizer-spm") / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(model))
    special = {"<s>": sp.bos_id(), "</s>": sp.eos_id()}
    vocab = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    for text in LEADING_SPACES + CORPUS:
        # What the original's LLaMA tokenizer did: split at special tokens, each piece sentencepiece's.
        pieces = [p for p in re.split("(<s>|</s>)", text) if p]
        expected = [i for p in pieces for i in ([special[p]] if p in special else sp.encode(p))]
        assert vocab.tokenize(text.encode(), add_bos=False, special=True) == expected, text


# --- (b) decoding --------------------------------------------------------------------------------------

PROMPTS = ["###Human: What is in the picture?###Assistant:", "[INST] Describe it. [/INST]", "A red"]


def _runtime(path: Path) -> LlamaCppRuntime:
    return LlamaCppRuntime(path, context_tokens=128, max_sequences=1, threads=1)


def _prompt_ids(directory: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, legacy=True)(text).input_ids


def _image_prompts(directory: Path, hidden: int) -> list[PromptInput]:
    """Prompts with 8 image-like vectors spliced in (the scale of the token embeddings), as MiniGPT-4's."""
    generator = torch.Generator().manual_seed(0)
    prompts = []
    for i, (before, after) in enumerate(
        [("###Human: <Img>", "</Img> What is it?###"), ("[INST] <Img>", "</Img>")]
    ):
        ids = _prompt_ids(directory, before) + [IMAGE_TOKEN_ID] * 8 + _prompt_ids(directory, after)[1:]
        vectors = torch.randn(8, hidden, generator=generator) * 0.1 * (i + 1)
        prompts.append(PromptInput(ids, vectors))
    return prompts


def test_llama_cpp_decodes_the_float32_gguf_as_transformers_does(checkpoint, converted):
    directory, model = checkpoint
    runtime, reference = _runtime(converted["f32"]), TorchRuntime(model)
    prompts = [PromptInput(_prompt_ids(directory, p)) for p in PROMPTS]
    prompts += _image_prompts(directory, model.config.hidden_size)
    try:
        for prompt in prompts:
            assert greedy_tokens(runtime, prompt, 12) == greedy_tokens(reference, prompt, 12)
    finally:
        runtime.close()


def test_the_float16_gguf_decodes_as_transformers_does(checkpoint, converted):
    directory, model = checkpoint
    runtime, reference = _runtime(converted["f16"]), TorchRuntime(model)
    try:
        for prompt in [
            PromptInput(_prompt_ids(directory, PROMPTS[0])),
            *_image_prompts(directory, model.config.hidden_size),
        ]:
            assert greedy_tokens(runtime, prompt, 8) == greedy_tokens(reference, prompt, 8)
    finally:
        runtime.close()


def test_the_gguf_holds_the_hyperparameters_and_float16_weights(checkpoint, converted):
    directory, model = checkpoint
    reader = gguf.GGUFReader(converted["f16"])
    fields = {
        name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer")
    }
    assert fields["general.architecture"] == "llama"
    assert {k: v for k, v in fields.items() if k.startswith("llama.")} == pytest.approx(
        {
            "llama.context_length": 256,
            "llama.embedding_length": 64,
            "llama.block_count": 2,
            "llama.feed_forward_length": 128,
            "llama.attention.head_count": 4,
            "llama.attention.head_count_kv": 2,
            "llama.attention.layer_norm_rms_epsilon": 1e-6,
            "llama.vocab_size": model.config.vocab_size,
            "llama.rope.dimension_count": 16,
            "llama.rope.freq_base": 10000.0,
        }
    )
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert types["blk.1.ffn_down.weight"] == types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert len(types) == 2 + 1 + 2 * 9  # embeddings, output, final norm, 9 per layer
    tensors = gguf_tensors(converted["f16"])
    expected = model.model.layers[1].mlp.down_proj.weight.detach().half().numpy()
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"], expected)


# --- (c) checkpoint formats ----------------------------------------------------------------------------


def _bin_shards(source: Path, directory: Path) -> None:
    """The checkpoint as Vicuna v0's: pytorch_model-0000N-of-00002.bin shards with an index, and the
    rotary frequencies that old transformers saved (which GGUF does not hold)."""
    from safetensors.torch import load_file

    shutil.copytree(source, directory, ignore=shutil.ignore_patterns("*.safetensors*"))
    state = load_file(source / "model.safetensors")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    names = sorted(state)
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n].half() for n in part}, directory / file)
        weight_map.update(dict.fromkeys(part, file))
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_safetensors_and_bin_shards_convert_to_the_same_file(checkpoint, converted, tmp_path):
    directory, model = checkpoint
    sharded = tmp_path / "sharded"
    shutil.copytree(directory, sharded, ignore=shutil.ignore_patterns("*.safetensors"))
    model.save_pretrained(sharded, max_shard_size="40KB")
    assert (
        len(list(sharded.glob("model-*.safetensors"))) > 2
        and (sharded / "model.safetensors.index.json").is_file()
    )
    _bin_shards(directory, tmp_path / "bin")
    expected = gguf_tensors(converted["f16"])
    for source in (sharded, tmp_path / "bin"):
        tensors = gguf_tensors(convert_llm(source, tmp_path / f"{source.name}.gguf"))
        assert tensors.keys() == expected.keys()
        for name, data in expected.items():
            np.testing.assert_array_equal(tensors[name], data, err_msg=f"{source.name}: {name}")


# --- (d) errors ----------------------------------------------------------------------------------------


def test_another_architecture_and_a_missing_tokenizer_are_named(checkpoint, tmp_path, capsys):
    from minigpt4.commands.convert_llm import main

    directory, _ = checkpoint
    mistral = tmp_path / "mistral"
    shutil.copytree(directory, mistral)
    config = json.loads((mistral / "config.json").read_text())
    config.update(architectures=["MistralForCausalLM"], model_type="mistral")
    (mistral / "config.json").write_text(json.dumps(config))
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(directory, no_tokenizer, ignore=shutil.ignore_patterns("tokenizer*"))
    cases = [
        (mistral, "architecture MistralForCausalLM is not supported"),
        (no_tokenizer, "no tokenizer file"),
    ]
    for source, error in cases:
        with pytest.raises(ConfigError, match=error):
            convert_llm(source, tmp_path / "out" / "x.gguf")
    assert list((tmp_path / "out").iterdir()) == []  # no partial file left
    for source, error in cases:
        with pytest.raises(SystemExit) as exit_:
            main([str(source), "--out", str(tmp_path / "out" / "x.gguf")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and error in err and err.count("\n") == 1


def test_the_command_lists_its_defaults(capsys):
    from minigpt4.commands.convert_llm import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert (
        "{f32,f16,q8_0,q4_0,q4_k_m}" in text
        and "(default: f16)" in text
        and "~/.cache/minigpt4/gguf/" in text
    )


# --- (e) quantisation and the cache --------------------------------------------------------------------


# How far below transformers' best logit a quantised file's greedy token may be (this model's logits
# spread with a standard deviation of 0.8; a token picked at random is about 2.5 below the best).
MAX_LOGIT_GAP = {"q8_0": 0.25, "q4_0": 0.75, "q4_k_m": 0.75}


def _logit_gap(model, ids: list[int], tokens: list[int]) -> float:
    """The most that transformers' logit of a token llama.cpp chose falls below its best (teacher-forced)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids + tokens[:-1]])).logits[0, len(ids) - 1 :]
    chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    return float((logits.max(1).values - chosen).max())


@pytest.mark.parametrize("weights", MAX_LOGIT_GAP)
def test_quantised_files_are_smaller_and_decode(checkpoint, converted, tmp_path, weights):
    directory, model = checkpoint
    path = convert_llm(directory, tmp_path / f"tiny-{weights}.gguf", weights)
    assert path.stat().st_size < 0.7 * converted["f16"].stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # the float16 file is gone
    assert gguf.GGUFReader(path).fields["general.file_type"].contents() == getattr(
        gguf.LlamaFileType, f"MOSTLY_{weights.upper()}"
    )
    runtime = _runtime(path)
    try:
        for text in PROMPTS:
            ids = _prompt_ids(directory, text)
            assert (
                _logit_gap(model, ids, greedy_tokens(runtime, PromptInput(ids), 8)) < MAX_LOGIT_GAP[weights]
            )
    finally:
        runtime.close()


def test_converted_llm_converts_once_into_the_cache(checkpoint, tmp_path, monkeypatch, capsys):
    from minigpt4.commands.convert_llm import main

    directory = tmp_path / "vicuna-tiny"
    shutil.copytree(checkpoint[0], directory)
    monkeypatch.setenv("MINIGPT4_CACHE_DIR", str(tmp_path / "cache"))
    assert main([str(directory)]) == 0
    path = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert path.parent == tmp_path / "cache" / "gguf" and path.name.startswith("vicuna-tiny-")
    assert path.name.endswith("-f16.gguf")
    stamp = path.stat().st_mtime_ns
    assert converted_llm(directory, "f16") == path and path.stat().st_mtime_ns == stamp
    q8 = converted_llm(directory, "q8_0")
    assert q8.name == path.name.replace("-f16", "-q8_0") and q8.stat().st_size < path.stat().st_size
    (directory / "model.safetensors").touch()  # a changed checkpoint: converted again
    again = converted_llm(directory, "f16")
    assert again != path and again.parent == path.parent


# --- the CPU presets of the original release ------------------------------------------------------------


@pytest.mark.parametrize("preset", ["minigpt4_vicuna0_7b_cpu", "minigpt4_llama2_7b_cpu"])
def test_a_cpu_preset_converts_its_checkpoint_once_and_answers_without_a_transformers_llm(
    checkpoint, tmp_path, monkeypatch, preset
):
    from PIL import Image
    from vision_helpers import TINY_QFORMER, TINY_VIT

    from minigpt4.chat import load_chat

    monkeypatch.setenv("MINIGPT4_CACHE_DIR", str(tmp_path / "cache"))
    random_vision = json.dumps({"vision": TINY_VIT, "qformer": TINY_QFORMER})
    overrides = [
        f"model.llm.pretrained={checkpoint[0]}",
        "model.vision.pretrained=null",
        f"model.vision.random_init={random_vision}",
        "model.projection.checkpoint=null",  # the released projection is not here
        "model.max_context_tokens=256",
        "generation.max_new_tokens=8",
    ]
    chat = load_chat(preset, overrides=overrides)
    assert isinstance(chat.engine.runtime, LlamaCppRuntime)
    assert chat.engine.runtime.path.name.endswith("-q4_0.gguf")
    assert chat.engine.runtime.path.is_relative_to(tmp_path / "cache")
    assert chat.model.vision.vit_stored_dtype == torch.bfloat16
    session = chat.new_session()
    chat.upload_image(session, Image.new("RGB", (64, 48), "red"))
    chat.add_question(session, "What is in this image?")
    answer = chat.answer(session, do_sample=False)
    assert isinstance(answer, str)
    assert not chat.model.llm_loaded  # llama.cpp decoded from the GGUF alone
    assert len(list((tmp_path / "cache" / "gguf").glob("*.gguf"))) == 1  # the float16 step was let go

    again = load_chat(preset, overrides=overrides)  # a second start reuses the conversion
    assert again.engine.runtime.path == chat.engine.runtime.path

    # Beam search needs the transformers copy: refused with a message where it would not fit in memory.
    from minigpt4 import build
    from minigpt4.errors import MessageError

    chat.add_question(session, "And its colour?")
    monkeypatch.setattr(build, "available_memory", lambda: 1000)
    with pytest.raises(MessageError, match=r"beam search would load a second, transformers copy of the LLM"):
        chat.answer(session, num_beams=2, do_sample=False)
    assert not chat.model.llm_loaded
    monkeypatch.setattr(build, "available_memory", lambda: 10**12)
    assert isinstance(chat.answer(session, num_beams=2, do_sample=False), str)
    assert chat.model.llm_loaded


# --- a random LLaMA of a real size, for the bench ------------------------------------------------------

SMALL_SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 8, "num_attention_heads": 4}


@pytest.mark.parametrize("weights", ["q4_0", "q4_k_m", "f16"])
def test_a_random_llama_gguf_has_the_shapes_and_types_asked_and_decodes(tmp_path, weights):
    from minigpt4.decode.convert_llm import random_llama_gguf
    from minigpt4.decode.engine import Engine
    from minigpt4.decode.stops import NO_STOPS
    from minigpt4.generation import GenerationParams

    path = random_llama_gguf(SMALL_SHAPE, tmp_path / f"random-{weights}.gguf", weights)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    assert len(tensors) == 3 + 9 * 8
    assert tuple(int(d) for d in tensors["blk.0.ffn_down.weight"].shape) == (512, 256)  # GGUF order
    kinds = {name: t.tensor_type.name for name, t in tensors.items()}
    assert kinds["output_norm.weight"] == "F32"
    if weights == "q4_k_m":  # llama.cpp's mix: more bits for the output and some attn_v / ffn_down
        assert kinds["output.weight"] == "Q6_K" and kinds["blk.0.attn_v.weight"] == "Q6_K"
        assert kinds["blk.1.attn_v.weight"] == "Q4_K" and kinds["blk.7.ffn_down.weight"] == "Q6_K"
        assert kinds["blk.0.attn_q.weight"] == "Q4_K"
    else:
        assert kinds["blk.0.attn_q.weight"] == weights.upper() and kinds["output.weight"] == weights.upper()
    engine = Engine(LlamaCppRuntime(path, 64, 1), NO_STOPS, pad_id=0)
    prompt = PromptInput([1, IMAGE_TOKEN_ID, IMAGE_TOKEN_ID, 5, 6], torch.randn(2, 256) * 0.02)
    result = engine.generate(prompt, GenerationParams(max_new_tokens=6, do_sample=False)).run()
    assert len(result.tokens) == 6 and all(0 <= t < 32000 for t in result.tokens)
    assert result.finish_reason == "length"
