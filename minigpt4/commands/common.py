"""Arguments shared by the commands that load a preset and generate text, and their checks.

Every check that needs no model runs before the model loads (`check_model_args`,
`check_generation_args`), so a mistyped flag, preset, `--options` key or `--device` costs a second,
not a model load, and ends in one line naming it and exit status 2. Heavy modules (torch, the
engine) are imported only inside the functions that need them: `--help` and `import app` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import replace
from typing import TYPE_CHECKING, NoReturn

from minigpt4.config import DEFAULT_PRESET, Preset, load_preset, resolve_preset
from minigpt4.errors import ConfigError

if TYPE_CHECKING:
    from minigpt4.chat import Chat
    from minigpt4.generation import GenerationParams

USAGE_ERROR = 2


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help` lists each option's default, unless its help already says it; descriptions keep
    their line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        no_default = action.default is None or action.default is False or action.default == []
        if "default" in text.lower() or no_default or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr (with a pointer to --help), exit 2."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def fail(message: str) -> NoReturn:
    """End a command with one line on stderr and the usage-error status."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(USAGE_ERROR)


def _ranged(kind: type, test, what: str):
    """An argparse `type` that converts with `kind` and refuses values outside a range."""

    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return convert


def at_least(minimum: float, kind: type = int):
    """An argparse `type`: a number of `kind` that is at least `minimum` (the one range check of every command)."""
    return _ranged(kind, lambda value: value >= minimum, f"≥ {minimum}")


def positive(kind: type = float):
    """An argparse `type`: a number of `kind` above zero."""
    return _ranged(kind, lambda value: value > 0, "> 0")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cfg-path",
        default=None,
        help=f"preset name in eval_configs/ or a YAML path (default: {DEFAULT_PRESET})",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when present)")
    parser.add_argument(
        "--options",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override preset keys, e.g. generation.top_p=0.5",
    )


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """`--threads`, applied by `chat_from_args` before the model loads."""
    parser.add_argument(
        "--threads",
        type=at_least(1),
        help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)",
    )


def add_config_args(parser: argparse.ArgumentParser, example: str = "run.iters_per_epoch=50") -> None:
    """`--options`, `--device` and `--threads` of a command that reads a train config (`train`,
    `cache-features`), as every command that loads a preset has them. Overrides given the old way, as
    positional `key=value` arguments, are caught so that `config_overrides` can show the new form."""
    parser.add_argument(
        "--options", nargs="*", default=[], metavar="KEY=VALUE", help=f"override config keys, e.g. {example}"
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda when present)")
    add_threads_arg(parser)
    parser.add_argument("old_overrides", nargs="*", help=argparse.SUPPRESS)


def config_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    """The `--options` of a command set up by `add_config_args`, after refusing positional overrides and
    an unknown or absent device, and with `--threads` applied."""
    if args.old_overrides:
        parser.error(f"config overrides are given with --options: --options {' '.join(args.old_overrides)}")
    try:
        check_device(args.device)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.threads:
        import torch  # noqa: PLC0415 (only once a command runs)

        torch.set_num_threads(args.threads)
    return list(args.options)


def add_allowed_hosts_arg(parser: argparse.ArgumentParser) -> None:
    """`--allowed-hosts`: host names the server answers besides localhost and its --host (DNS
    rebinding defence; IP addresses are always answered). See `minigpt4.hosts`."""
    parser.add_argument(
        "--allowed-hosts",
        type=lambda text: [name for name in text.split(",") if name.strip()],
        default=[],
        metavar="NAMES",
        help="comma-separated host names this server answers besides localhost and --host, e.g. "
        "myhost.example,*.example.org; '*' answers any (also $MINIGPT4_ALLOWED_HOSTS; a Space's "
        "$SPACE_HOST is added by itself)",
    )


def add_generation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "generation (defaults: the preset's; --temperature and --top-p apply only when sampling)"
    )
    mode = group.add_mutually_exclusive_group()
    mode.add_argument("--greedy", action="store_true", help="greedy decoding (always the likeliest token)")
    mode.add_argument("--sample", action="store_true", help="sample, even if the preset decodes greedily")
    group.add_argument("--temperature", type=_ranged(float, lambda x: x > 0, "> 0"))
    group.add_argument("--top-p", type=_ranged(float, lambda x: 0 < x <= 1, "in (0, 1]"))
    group.add_argument("--num-beams", type=_ranged(int, lambda n: 1 <= n <= 10, "in 1..10"))
    group.add_argument("--max-new-tokens", type=_ranged(int, lambda n: n >= 1, "≥ 1"))


def load_config(args: argparse.Namespace) -> Preset:
    """The preset with its `--options`; a mistake in the options is reported as the command line's."""
    path = resolve_preset(args.cfg_path)
    cfg = load_preset(path)  # errors here are the file's and name it
    if not args.options:
        return cfg
    try:
        return load_preset(path, args.options)
    except ConfigError as exc:
        message = str(exc).removeprefix(f"{path}: ")
        raise ConfigError(f"--options {' '.join(args.options)}: {message}") from exc


def check_device(device: str | None) -> None:
    """Refuse a device name torch does not know, or one this machine does not have."""
    if device is None:
        return
    import torch  # noqa: PLC0415 (only once a command runs)

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {device}: unknown device (use cpu, cuda or cuda:N)") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
        if parsed.index is not None and parsed.index >= count:
            raise ConfigError(
                f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0..cuda:{count - 1}"
            )
    elif parsed.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"--device {device}: MPS is not available on this machine")
    elif parsed.type != "cpu":
        raise ConfigError(f"--device {device}: unsupported device type {parsed.type!r} (use cpu or cuda)")


def check_model_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Preset:
    """Check the preset, `--options` and `--device` before anything heavy loads; the loaded preset."""
    try:
        cfg = load_config(args)
        check_device(args.device)
    except ConfigError as exc:
        parser.error(str(exc))
    return cfg


def check_generation_args(parser: argparse.ArgumentParser, args: argparse.Namespace, cfg: Preset) -> None:
    """Refuse sampling flags that would change nothing because decoding is greedy."""
    sampling = args.sample or (cfg.generation.do_sample and not args.greedy)
    given = [
        flag
        for flag, value in (("--temperature", args.temperature), ("--top-p", args.top_p))
        if value is not None
    ]
    if given and not sampling:
        why = "--greedy is given" if args.greedy else f"the preset {cfg.name} decodes greedily"
        verb = "has" if len(given) == 1 else "have"
        parser.error(f"{' and '.join(given)} {verb} no effect without sampling ({why}): add --sample")


def chat_from_args(args: argparse.Namespace) -> Chat:
    """Load the preset's model into a Chat (raises `ConfigError`, `WeightsError`). Anything third-party
    code prints while the model is built goes to stderr: stdout may carry JSONL."""
    from minigpt4.chat import load_chat  # noqa: PLC0415 (torch, transformers: only once a command runs)

    if getattr(args, "threads", None):
        import torch  # noqa: PLC0415

        torch.set_num_threads(args.threads)
    with contextlib.redirect_stdout(sys.stderr):
        return load_chat(args.cfg_path, device=args.device, overrides=args.options)


def chat_or_exit(args: argparse.Namespace) -> Chat:
    """`chat_from_args`, where a preset or checkpoint that cannot be used ends the command with one line."""
    from minigpt4.weights import WeightsError  # noqa: PLC0415

    try:
        return chat_from_args(args)
    except (ConfigError, WeightsError) as exc:
        fail(str(exc))


def params_from_args(chat: Chat, args: argparse.Namespace) -> GenerationParams:
    changes = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "num_beams": args.num_beams,
        "max_new_tokens": args.max_new_tokens,
    }
    params = replace(chat.defaults, **{k: v for k, v in changes.items() if v is not None})
    if args.greedy or args.sample:
        params = replace(params, do_sample=args.sample)
    return params
