"""The sites of a simulated federation: one data file each, given (`--clients`) or split from one file
(`--data` with `--partition iid | field:NAME`). Torch-free.

A field partition puts every line whose `metadata.NAME` (or top-level NAME) has the same value at one site,
the non-IID case of the field: sites that differ by topic, language or organisation. IID is a seeded
random split into `num_clients` near-equal parts. The files are written to RUN/sites/ once, at the start
of a run; a resumed run reads them back.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from tunery.errors import TuneryError
from tunery.training.io import atomic_write_text

SITES_DIR = "sites"


@dataclass(frozen=True)
class Site:
    name: str  # a-z0-9 and -, unique in the federation
    path: str  # its training JSONL


def given_sites(paths: list[str]) -> list[Site]:
    """A site per file, named after the file (`clinic_a.jsonl` -> clinic_a), numbered when names clash."""
    names: list[str] = []
    for path in paths:
        stem = "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(path).stem) or "site"
        names.append(stem if stem not in names else f"{stem}-{len(names)}")
    return [Site(name, path) for name, path in zip(names, paths, strict=True)]


def partitioned_sites(data: str, partition: str, num_clients: int, seed: int, run_dir: Path) -> list[Site]:
    """Split `data` into RUN/sites/NAME.jsonl (kept when they exist: a resumed run trains on the same split)."""
    folder = run_dir / SITES_DIR
    listing = folder / "sites.json"
    if listing.is_file():
        return [Site(**entry) for entry in json.loads(listing.read_text())]
    lines = [line for line in Path(data).read_text(encoding="utf-8").splitlines() if line.strip()]
    groups: dict[str, list[str]] = {}
    if partition == "iid":
        if num_clients > len(lines):
            raise TuneryError(
                f"{data}: {len(lines)} examples cannot make {num_clients} sites; lower --num-clients"
            )
        order = list(range(len(lines)))
        random.Random(seed).shuffle(order)
        for k in range(num_clients):
            groups[f"site-{k}"] = [lines[i] for i in sorted(order[k::num_clients])]
    else:
        key = partition.removeprefix("field:")
        for number, line in enumerate(lines, 1):
            value = _field(json.loads(line), key)
            if value is None:
                raise TuneryError(
                    f"{data}, line {number}: no '{key}' field (in metadata or at the top level) to partition by; "
                    "add it to every line, or use --partition iid"
                )
            groups.setdefault(value, []).append(line)
        if len(groups) < 2:
            raise TuneryError(f"{data}: every line has the same '{key}'; a federation needs at least 2 sites")
    sites = []
    for raw_name, site_lines in groups.items():
        name = "".join(c if c.isalnum() or c in "-_" else "-" for c in raw_name)[:64] or "site"
        path = folder / f"{name}.jsonl"
        atomic_write_text(path, "".join(line + "\n" for line in site_lines))
        sites.append(Site(name, str(path)))
    atomic_write_text(listing, json.dumps([vars(site) for site in sites], indent=1) + "\n")
    return sites


def _field(row: dict[str, object], key: str) -> str | None:
    metadata = row.get("metadata")
    value = metadata.get(key) if isinstance(metadata, dict) and key in metadata else row.get(key)
    return None if value is None or isinstance(value, dict | list) else str(value)
