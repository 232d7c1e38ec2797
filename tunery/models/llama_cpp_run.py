"""llama.cpp's logits for a GGUF file, computed in a child process.

llama.cpp is native code: on some CPUs and builds it crashes rather than raising (its AMX int8 kernels
segfault on q8_0 prompts on Sapphire Rapids, ggml-org/llama.cpp#20824). `tunery export --check` and the
tests read a file back through it here, in a separate process, so a crash becomes a message naming what
died instead of taking the caller down with it.

    python -m tunery.models.llama_cpp_run REQUEST.json OUT.npz
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


class LlamaCppFailed(RuntimeError):
    """llama.cpp could not read or run the file; the message says how it ended."""


def scores(
    path: Path, ids: list[list[int]], texts: list[str], timeout: float = 900
) -> tuple[list[Any], bool]:
    """Each token list's logits (positions x vocabulary, float32 numpy) as llama.cpp computes them from
    `path`, and whether llama.cpp's own tokenizer gives the same ids for `texts`."""
    import numpy as np

    with tempfile.TemporaryDirectory(prefix="tunery-llama-cpp-") as tmp:
        request, out = Path(tmp) / "request.json", Path(tmp) / "scores.npz"
        request.write_text(json.dumps({"path": str(path), "ids": ids, "texts": texts}))
        try:
            done = subprocess.run(
                [sys.executable, "-m", __name__, str(request), str(out)],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise LlamaCppFailed(f"llama.cpp did not finish reading {path} within {timeout:.0f} s") from e
        if done.returncode < 0:
            raise LlamaCppFailed(
                f"llama.cpp was killed by {signal.Signals(-done.returncode).name} running {path.name}. On CPUs"
                " with AMX, rebuild it without its AMX kernels: rm -f .venv/.tunery-llama-cpp-installed; make"
                " llama-cpp"
            )
        if done.returncode != 0:
            tail = " | ".join(done.stderr.strip().splitlines()[-2:])
            raise LlamaCppFailed(
                f"llama.cpp could not run {path.name} (exit status {done.returncode}): {tail}"
            )
        with np.load(out) as saved:
            return [saved[f"s{i}"] for i in range(len(ids))], bool(saved["same"])


def _run(request: dict[str, Any], out: Path) -> None:
    import numpy as np
    from llama_cpp import Llama

    ids: list[list[int]] = request["ids"]
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)  # llama.cpp writes a line per tensor to stdout and stderr
    llm = Llama(
        request["path"],
        n_ctx=max(64, max(len(i) for i in ids) + 8),
        logits_all=True,
        verbose=False,
        n_threads=os.cpu_count(),
    )
    add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token") == "true"
    same = True
    arrays: dict[str, Any] = {}
    for n, (text, tokens) in enumerate(zip(request["texts"], ids, strict=True)):
        same = same and llm.tokenize(text.encode(), add_bos=add_bos, special=True) == tokens
        llm.reset()
        llm.eval(tokens)
        arrays[f"s{n}"] = np.array(llm.scores[: len(tokens)], dtype=np.float32)
    llm.close()
    arrays["same"] = np.array(same)
    np.savez(out, **arrays)


if __name__ == "__main__":
    _run(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))
