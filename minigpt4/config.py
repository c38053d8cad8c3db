"""Typed configuration: flat YAML presets loaded into dataclasses.

Every preset file holds everything it needs (no includes, no merging). Loading checks each key:
an unknown key, a value of the wrong type, or a required file that is not there raises
`ConfigError` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
import re
import reprlib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from minigpt4.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
EVAL_CONFIG_DIR = PROJECT_ROOT / "eval_configs"
DEFAULT_PRESET = "minigpt4_lite"

T = TypeVar("T")


@dataclass
class VisionConfig:
    """The frozen vision side. `kind` picks the architecture; see minigpt4/vision.py."""

    kind: str = "blip2"
    # HF id or directory of a BLIP-2 model: only its vision/Q-Former/query-token tensors are read.
    pretrained: str | None = None
    # Original LAVIS checkpoints (docs/original.md): Q-Former + query tokens + ln_vision (+ ViT when
    # present); the EVA ViT-g file alone (eva_vit_g.pth). kind blip2_patches needs only the ViT.
    lavis_checkpoint: str | None = None
    eva_vit_checkpoint: str | None = None
    num_query_tokens: int = 32
    image_size: int = 224
    # Architecture of a randomly initialised vision side (tests, smoke runs): keys of
    # Blip2VisionConfig under "vision" and of Blip2QFormerConfig under "qformer".
    random_init: dict[str, Any] | None = None
    # The ViT's weights: auto (float16 on GPU, float32 on CPU) | float32 | float16 (GPU) | bfloat16
    dtype: str = "auto"
    # efficientnet_lite only: one more token, the main object's colour (minigpt4/lite/vision.py).
    object_colour: bool = False

    def __post_init__(self) -> None:
        _check_positive(self, "model.vision", ("num_query_tokens", "image_size"))
        if self.object_colour and self.kind != "efficientnet_lite":
            raise ConfigError(
                f"model.vision.object_colour: only kind efficientnet_lite has it, not {self.kind!r}"
            )
        if self.random_init is not None:
            unknown = sorted(set(self.random_init) - {"vision", "qformer"})
            if unknown:
                raise ConfigError(f"model.vision.random_init: unknown key {unknown} (known: vision, qformer)")
            for part, config_class in (("vision", "Blip2VisionConfig"), ("qformer", "Blip2QFormerConfig")):
                _check_hf_keys(
                    f"model.vision.random_init.{part}", self.random_init.get(part) or {}, config_class
                )


RUNTIMES = ("transformers", "llama_cpp")
RUNTIME_WEIGHTS = ("f16", "q8_0", "q4_0", "q4_k_m")  # as minigpt4.decode.llama_cpp.WEIGHT_TYPES


@dataclass
class LLMConfig:
    """The frozen language model."""

    pretrained: str | None = None  # HF id or directory
    gguf_file: str | None = None  # a GGUF file inside `pretrained`
    tokenizer: str | None = None  # defaults to `pretrained`
    dtype: str = "auto"  # auto | float32 | float16 | bfloat16 ("auto": fp16 on GPU, fp32 on CPU)
    low_resource: bool = False  # 8-bit weights through bitsandbytes (CUDA only)
    # CPU only: one-token decode steps read float16 | bfloat16 copies of the weights (about 2× faster)
    decode_dtype: str | None = None
    random_init: dict[str, Any] | None = None  # LlamaConfig keys for a random tiny LLM
    # Where answers are decoded: transformers (any device), or llama_cpp (the GGUF file on the CPU,
    # through llama-cpp-python: quantised weights, several answers in one step).
    runtime: str = "transformers"
    max_sequences: int = 8  # answers decoded together at most (more wait for a free place)
    # transformers runtime: key/value positions cached by all conversations together (null: room for
    # max_sequences whole contexts, fewer where the free GPU memory holds fewer); idle ones lose theirs
    # first, least recently used first
    kv_cache_positions: int | None = None
    # llama_cpp: decode from the GGUF converted once to f16 | q8_0 | q4_0 | q4_k_m (null: as the file is,
    # or f16 for a Hugging Face checkpoint; with model.lora the adapters are merged into the f16 file,
    # which null then decodes)
    runtime_weights: str | None = None

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"model.llm.runtime must be one of {', '.join(RUNTIMES)}; got {self.runtime!r}")
        if self.runtime == "llama_cpp" and not self.pretrained:
            raise ConfigError(
                "model.llm.runtime: llama_cpp reads a GGUF file: set model.llm.pretrained (with gguf_file, "
                "a GGUF inside it; without, a Hugging Face checkpoint converted once by convert-llm)"
            )
        if self.runtime_weights not in (None, *RUNTIME_WEIGHTS):
            raise ConfigError(
                f"model.llm.runtime_weights must be one of {', '.join(RUNTIME_WEIGHTS)} or null; "
                f"got {self.runtime_weights!r}"
            )
        if self.max_sequences < 1:
            raise ConfigError(f"model.llm.max_sequences must be ≥ 1, got {self.max_sequences}")
        if self.kv_cache_positions is not None and self.kv_cache_positions < 1:
            raise ConfigError(f"model.llm.kv_cache_positions must be ≥ 1, got {self.kv_cache_positions}")
        if self.decode_dtype not in (None, "float16", "bfloat16"):
            raise ConfigError(
                f"model.llm.decode_dtype must be float16, bfloat16 or null; got {self.decode_dtype!r}"
            )
        if self.random_init is not None:
            _check_hf_keys("model.llm.random_init", self.random_init, "LlamaConfig")


@dataclass
class ProjectionConfig:
    """The trained projection: a checkpoint (.pth of the original release, or our .safetensors)."""

    checkpoint: str | None = None  # a path, or hf://org/repo/file for a file in a hub repository


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    lora: LoraConfig | None = None
    template: str = "vicuna0"
    max_context_tokens: int = 2000
    seed: int = 0  # seeds random initialisation (tiny presets) and the projection's init

    def __post_init__(self) -> None:
        if self.template not in ("vicuna0", "llama2", "chat_template"):
            raise ConfigError(
                f"model.template must be one of vicuna0, llama2, chat_template; got {self.template!r}"
            )
        _check_positive(self, "model", ("max_context_tokens",))


@dataclass
class GenerationConfig:
    max_new_tokens: int = 300
    num_beams: int = 1
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.05

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if not 1 <= self.num_beams <= 10:
            raise ConfigError(f"generation.num_beams must be in 1..10, got {self.num_beams}")
        if self.temperature <= 0:
            raise ConfigError(f"generation.temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"generation.repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Preset:
    """A preset for inference: the app, the CLI, the server, evaluation and benchmarks."""

    name: str
    description: str = ""  # which models run, in a few words: the app's status line shows it
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 20_000_000
    max_message_chars: int = 20_000

    def __post_init__(self) -> None:
        _check_positive(self, "", ("max_image_pixels", "max_image_bytes", "max_message_chars"))


def _check_positive(cfg: Any, section: str, keys: Sequence[str]) -> None:
    """Limits and sizes must be ≥ 1: zero or a negative number is a typo, never a setting."""
    for key in keys:
        value = getattr(cfg, key)
        if value < 1:
            raise ConfigError(
                f"{section + '.' if section else ''}{key} must be a positive number, got {value}"
            )


def _check_hf_keys(where: str, values: dict[str, Any], config_class: str) -> None:
    """Keys of a `random_init` mapping must be arguments of the transformers config class they build."""
    import inspect  # noqa: PLC0415

    import transformers  # noqa: PLC0415 (only presets with random_init pay for the import)

    cls = getattr(transformers, config_class)
    known = (set(cls().to_dict()) | set(inspect.signature(cls.__init__).parameters)) - {"self", "kwargs"}
    unknown = sorted(set(values) - known)
    if unknown:
        names = ", ".join(f"{where}.{k}" for k in unknown)
        shown = ", ".join(sorted(k for k in known if not k.startswith("_")))
        raise ConfigError(f"unknown key {names}: not an argument of {config_class} (known: {shown})")


def resolve_path(path: str | Path) -> Path:
    """A relative path is looked up from the current directory, then from the project root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    rooted = PROJECT_ROOT / p
    return rooted if rooted.exists() else p


def resolve_preset(name_or_path: str | Path | None) -> Path:
    """Find a preset: a path to a YAML file, or a name in eval_configs/ (None: the default)."""
    name = str(name_or_path) if name_or_path is not None else DEFAULT_PRESET
    candidates = [resolve_path(name)]
    if not name.endswith((".yaml", ".yml")):
        candidates.append(EVAL_CONFIG_DIR / f"{name}.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    known = ", ".join(sorted(p.stem for p in EVAL_CONFIG_DIR.glob("*.yaml")))
    raise ConfigError(f"no preset {name!r}: not a file, and not one of eval_configs/ ({known})")


def read_yaml(path: str | Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a YAML mapping and apply `key.sub=value` overrides (values parsed as YAML).

    A file may start from another: `base: other.yaml` (a path relative to the file) reads that one
    first and merges this file's keys into it, section by section; a list or a value replaces the
    base's. The merge comes before the typed check, so an unknown key is still an error.
    """
    data = _read_with_base(Path(path), ())
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            reason = str(exc).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({reason})") from exc
    return data


def _read_mapping(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def _read_with_base(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    data = _read_mapping(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the name of another YAML file, got {_shown(base)}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base {base!r} is not a file (looked for {base_path})")
    seen = (*chain, path.resolve())
    if base_path.resolve() in seen:
        cycle = " → ".join(p.name for p in (*seen, base_path))
        raise ConfigError(f"{path}: base files form a cycle ({cycle})")
    return merge_sections(_read_with_base(base_path, seen), data)


def merge_sections(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` merged in: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_sections(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_preset(name_or_path: str | Path | None = None, overrides: Sequence[str] = ()) -> Preset:
    """Load an inference preset by name (eval_configs/<name>.yaml) or path, with overrides."""
    path = resolve_preset(name_or_path)
    data = read_yaml(path, overrides)
    data.setdefault("name", path.stem)
    cfg = from_dict(Preset, data, where=str(path))
    check_model_files(cfg.model, where=str(path))
    return cfg


def check_model_files(cfg: ModelConfig, where: str) -> None:
    """Local files a model config names must exist; hub ids (``org/name``) are left to the hub."""
    files = {
        "model.vision.lavis_checkpoint": (cfg.vision.lavis_checkpoint, "the BLIP-2 LAVIS checkpoint (.pth)"),
        "model.vision.eva_vit_checkpoint": (cfg.vision.eva_vit_checkpoint, "the EVA ViT-g checkpoint (.pth)"),
        "model.projection.checkpoint": (cfg.projection.checkpoint, "the trained projection checkpoint"),
    }
    for key, (value, what) in files.items():
        if value is not None and not value.startswith("hf://") and not resolve_path(value).is_file():
            raise ConfigError(f"{where}: {key}: {what} not found at {value!r}")
    dirs = {
        "model.vision.pretrained": cfg.vision.pretrained,
        "model.llm.pretrained": cfg.llm.pretrained,
        "model.llm.tokenizer": cfg.llm.tokenizer,
    }
    for key, value in dirs.items():
        if value is None or _looks_like_hub_id(value) or value.startswith("package:"):
            continue
        if not resolve_path(value).exists():
            raise ConfigError(f"{where}: {key}: directory {value!r} not found")
    vision = cfg.vision
    sources = {"pretrained": vision.pretrained, "lavis_checkpoint": vision.lavis_checkpoint}
    if vision.kind == "blip2_patches":  # no Q-Former: the EVA ViT file alone is enough
        sources["eva_vit_checkpoint"] = vision.eva_vit_checkpoint
    sources["random_init"] = vision.random_init
    if vision.kind.startswith("blip2") and all(v is None for v in sources.values()):
        raise ConfigError(f"{where}: model.vision needs one of {', '.join(sources)}")
    if cfg.llm.pretrained is None and cfg.llm.random_init is None:
        raise ConfigError(f"{where}: model.llm needs pretrained or random_init")
    if cfg.llm.pretrained is None and cfg.llm.tokenizer is None:
        raise ConfigError(f"{where}: model.llm.tokenizer is required when the LLM is randomly initialised")


def _looks_like_hub_id(value: str) -> bool:
    parts = value.split("/")
    return len(parts) == 2 and all(parts) and not value.startswith((".", "~")) and not Path(value).exists()


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and type recursively."""
    prefix = f"{where}: " if where else ""
    try:
        return _build(cls, data, prefix, "")
    except RecursionError as exc:  # a YAML alias that holds itself (`&a [*a]`)
        raise ConfigError(f"{prefix}a value nests too deeply (a YAML alias that refers to itself?)") from exc


def _build(cls: type[T], data: Any, prefix: str, path: str) -> T:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}{path or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(f"{path}.{k}" if path else k for k in unknown)
        raise ConfigError(f"{prefix}unknown key {names} (known: {', '.join(fields)})")
    kwargs = {}
    for name, value in data.items():
        key = f"{path}.{name}" if path else name
        kwargs[name] = _convert(hints[name], value, prefix, key)
    missing = [
        name
        for name, f in fields.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{prefix}missing required key {', '.join(missing)}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix}{exc}") from exc


def _convert(tp: Any, value: Any, prefix: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, prefix, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[-1] if errors else f"{prefix}{key}: bad value {_shown(value)}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, prefix, key)
    if tp is Any:
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{prefix}{key} must be a list, got {type(value).__name__} {_shown(value)}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(item_tp, v, prefix, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix}{key} must be a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 5e-5, without a dot, as a string
    if tp in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{prefix}{key} must be {tp.__name__}, got a boolean {_shown(value)}")
    if tp in (str, int, float, bool) and not isinstance(value, tp):
        raise ConfigError(f"{prefix}{key} must be {tp.__name__}, got {type(value).__name__} {_shown(value)}")
    return value


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


# YAML aliases share one object among many places, so a small file can hold a value whose full
# repr is gigabytes ("billion laughs"): error messages show a bounded prefix of it.
_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel, _SHORT_REPR.maxlist, _SHORT_REPR.maxdict = 2, 4, 4
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = 80


def _shown(value: Any) -> str:
    return _SHORT_REPR.repr(value)
