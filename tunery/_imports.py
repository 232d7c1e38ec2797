"""Third-party imports that must not reach the network. bitsandbytes (imported by peft whenever it is
installed, so by every training run) asks the Hugging Face hub for a native CPU kernel at import time on
CPUs with AVX-512 BF16 (`kernels.get_kernel("kernels-community/quantization-bitsandbytes")`): a download
of native code nobody asked for, and a warning in every run's log where there is no network. Tunery's
runs take nothing from the hub they were not given by name, so that import runs with `kernels` hidden
and the warning dropped; bitsandbytes falls back to its own kernels, as it does on other CPUs.

Installed by `tunery/__init__.py` as an import hook, so the cost is nil until bitsandbytes is imported.

A `tunery` command's process also defers bitsandbytes until a quantized run asks for it
(`defer_bitsandbytes`, `allow_bitsandbytes`): peft imports it whenever it is installed, and its import
costs about a second (it sets up kernels through torch.compile), a sixth of a short run's whole process,
for the runs that never quantize. For the same reason it hides `kernels` (`hide_hub_kernels`), the hub
kernels package transformers installs with itself: transformers imports it with every model class (~0.2 s)
and wraps layers' forward for kernels fetched from the hub, which Tunery never asks for."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
from types import ModuleType
from typing import Any

_ABSENT = object()


class _OfflineLoader(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)  # type: ignore[no-any-return]

    def exec_module(self, module: ModuleType) -> None:
        hidden = sys.modules.get("kernels", _ABSENT)
        quiet = logging.getLogger("bitsandbytes.backends.cpu.ops")
        level = quiet.level
        sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import ...` fails
        quiet.setLevel(logging.ERROR)
        try:
            self.loader.exec_module(module)
        finally:
            quiet.setLevel(level)
            if hidden is _ABSENT:
                sys.modules.pop("kernels", None)
            else:
                sys.modules["kernels"] = hidden  # type: ignore[assignment]


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "bitsandbytes":
            return None
        sys.meta_path.remove(self)  # once: the real spec from the finders after this one
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _OfflineLoader(spec.loader)
        return spec


def defer_bitsandbytes() -> None:
    """Until `allow_bitsandbytes`, bitsandbytes reads as not installed in this process (`None` in
    sys.modules: `import bitsandbytes` raises ImportError and `importlib.util.find_spec` finds nothing), as on
    a machine without the `quantize` extra. For the CLI's own process only (`tunery.cli.entry`): a program
    that imports tunery keeps its imports as they are."""
    if "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def allow_bitsandbytes() -> None:
    """Undo `defer_bitsandbytes`, before a quantized run imports bitsandbytes. peft's availability checks
    are cached: they ask again."""
    if "bitsandbytes" in sys.modules and sys.modules["bitsandbytes"] is None:
        del sys.modules["bitsandbytes"]
        checks = sys.modules.get("peft.import_utils")
        for name in ("is_bnb_available", "is_bnb_4bit_available"):
            cache_clear = getattr(getattr(checks, name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()


def install() -> None:
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())


def hide_hub_kernels() -> None:
    """`kernels` reads as not installed in this process, so transformers neither imports it nor wraps layers
    for hub kernels: as on a machine without it. For Tunery's own processes only (the CLI, the inference
    worker); nothing Tunery runs takes a kernel from the hub."""
    if "kernels" not in sys.modules:
        sys.modules["kernels"] = None  # type: ignore[assignment]
