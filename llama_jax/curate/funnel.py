"""The funnel: documents and bytes into and out of every stage, from the per-task tallies.

Written by a last one-task phase (so a Slurm or Ray run produces it too) as `funnel.json`, and printed
as a table by the command line. "kept" is the share of the stage's input bytes in its output;
"skipped" counts input lines that were not UTF-8 or not JSON with text (reported, never fatal).
"""
from __future__ import annotations

import json
from pathlib import Path

from llama_jax.utils.files import write_atomically

FUNNEL_FILE = "funnel.json"


def collect_funnel(root: Path, stages: dict[str, list[str]]) -> list[dict]:
    """One row per source and stage, in run order. `stages`: source -> stage directory tags."""
    from llama_jax.curate.blocks.tally import read_tally

    rows = []
    for source, tags in stages.items():
        for tag in tags:
            base = root / "funnel" / source / tag
            counts_in, counts_out = read_tally(base / "in"), read_tally(base / "out")
            skipped = sum(read_tally(base / "skipped").values())
            bytes_in, bytes_out = counts_in.get("bytes", 0), counts_out.get("bytes", 0)
            rows.append({"source": source, "stage": tag.split("_", 1)[1], "docs_in": counts_in.get("docs", 0),
                         "docs_out": counts_out.get("docs", 0), "bytes_in": bytes_in, "bytes_out": bytes_out,
                         "kept": bytes_out / bytes_in if bytes_in else 0.0, "skipped": skipped})
    return rows


def write_funnel(root: Path, stages: dict[str, list[str]]) -> list[dict]:
    rows = collect_funnel(root, stages)
    write_atomically(root / FUNNEL_FILE, json.dumps(rows, indent=1).encode())
    return rows


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def format_funnel(rows: list[dict]) -> str:
    header = f"{'source':<14} {'stage':<13} {'docs in':>9} {'docs out':>9} {'bytes in':>10} {'bytes out':>10} {'kept':>7}"
    lines = [header, "-" * len(header)]
    for r in rows:
        note = f"  ({r['skipped']} bad lines skipped)" if r["skipped"] else ""
        lines.append(f"{r['source']:<14} {r['stage']:<13} {r['docs_in']:>9} {r['docs_out']:>9} "
                     f"{_size(r['bytes_in']):>10} {_size(r['bytes_out']):>10} {r['kept']:>6.1%}{note}")
    if rows:
        first, last = rows[0], rows[-1]
        if first["source"] == last["source"] and first["bytes_in"]:
            lines.append(f"{'overall':<14} {'':<13} {first['docs_in']:>9} {last['docs_out']:>9} "
                         f"{_size(first['bytes_in']):>10} {_size(last['bytes_out']):>10} "
                         f"{last['bytes_out'] / first['bytes_in']:>6.1%}")
    return "\n".join(lines)
