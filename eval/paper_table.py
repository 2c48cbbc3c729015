"""The paper table: each row's measured value (a step's results.json) beside its published value and source."""
from __future__ import annotations

import csv
import json
from pathlib import Path

COLUMNS = ("experiment", "measured", "published", "source", "results")


def measured(output_dir: Path, step: str | None, metric: str | None, scale: float = 1.0
             ) -> tuple[float | None, str]:
    """(value x scale, where it came from or why it is missing)."""
    if not step:
        return None, "not run here (reference row)"
    path = output_dir / step / "results.json"
    if not path.is_file():
        return None, f"no {path.relative_to(output_dir)} yet (see --status)"
    value = json.loads(path.read_text()).get("metrics", {}).get(metric)
    if value is None:
        return None, f"{path.relative_to(output_dir)} has no metric {metric!r}"
    return scale * float(value), str(path.relative_to(output_dir))


def table_rows(spec: dict, output_dir: Path) -> list[dict]:
    rows = []
    for row in spec.get("table") or []:
        value, where = measured(output_dir, row.get("step"), row.get("metric"), row.get("scale", 1.0))
        rows.append({"experiment": row["label"], "measured": value, "published": row.get("published"),
                     "source": row.get("source", ""), "results": where})
    return rows


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def write_table(spec: dict, output_dir: str | Path) -> tuple[Path, Path]:
    """``paper_table.md`` and ``paper_table.csv`` in ``output_dir``; empty cells where nothing is measured or
    nothing was published."""
    output_dir = Path(output_dir)
    rows = table_rows(spec, output_dir)
    md = output_dir / "paper_table.md"
    lines = [f"# {spec['name']}: measured vs published", "",
             "Measured: this run's results.json (percent). Published: only values a source states; empty otherwise.",
             *(["", f"Derived from {spec['derived_from']}: built-in samples and scaled recipes (eval/derive.py); "
                "the measured values show that every step ran, they are not comparable with the published ones."]
               if spec.get("derived_from") else []),
             "", "| experiment | measured | published | source | measured from |", "|---|---:|---:|---|---|"]
    lines += [f"| {r['experiment']} | {_cell(r['measured'])} | {_cell(r['published'])} | {r['source']} | "
              f"{r['results']} |" for r in rows]
    md.write_text("\n".join(lines) + "\n")
    path_csv = output_dir / "paper_table.csv"
    with path_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({**r, "measured": "" if r["measured"] is None else r["measured"],
                          "published": "" if r["published"] is None else r["published"]} for r in rows)
    return md, path_csv
