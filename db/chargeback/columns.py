"""The export's columns: every file's columns and their kinds, and the JSON Schema made from
them (db/chargeback/export_schema.json, regenerated with ``python -m db.chargeback.export
--schema``). The column table in FORMAT.md documents EXPORT_COLUMNS, in this order.

Columns are stable: new ones are only ever appended; anything else bumps SCHEMA_VERSION.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Column:
    name: str
    kind: str
    """text, int, money (2 places), dec1/dec3/dec6 (decimal strings), timestamp."""
    nullable: bool = False


def _cols(spec: str) -> tuple[Column, ...]:
    out = []
    for item in spec.split():
        name, kind = item.split(":")
        out.append(Column(name, kind.rstrip("?"), kind.endswith("?")))
    return tuple(out)


EXPORT_COLUMNS = _cols(
    "period:text cluster:text job_id:int restart_count:int array_job_id:int? "
    "array_task_id:int? user:text? account:text? team:text? project:text? cost_center:text? "
    "partition:text? state:text? gpu_type:text? gpus:dec3? cpus:int? mem_mb:int? "
    "node_count:int? nodes:text? start_time:timestamp end_time:timestamp seconds:int "
    "share:dec6 gpu_hours:dec6 energy_kwh:dec6 util_mean:dec1? cost_gpu:money cost_cpu:money "
    "cost_mem:money cost_energy:money cost:money idle_cost:money credit:money net:money "
    "credit_reason:text? busy_gpu_hours:dec6? epochs:int? steps:int?"
)
"""runs.csv / runs.jsonl, in order ("?": nullable). Not db.ingest.RUN_COLUMNS (the database's)."""
MEASURE_COLUMNS = _cols(
    "runs:int gpu_hours:dec6 energy_kwh:dec6 cost_gpu:money cost_cpu:money cost_mem:money "
    "cost_energy:money cost:money idle_cost:money credit:money net:money"
)
EFFICIENCY_COLUMNS = _cols("busy_gpu_hours:dec6 measured_gpu_hours:dec6")
"""Sums appended to the aggregated files after ``mode`` (columns are only ever appended):
GPU efficiency of a group = busy_gpu_hours / measured_gpu_hours."""
SUM_COLUMNS = (*MEASURE_COLUMNS, *EFFICIENCY_COLUMNS)
"""Every sum a group keeps, in the order of its accumulator (and the manifest's totals)."""
# Aggregated files: name -> key columns. The group key of the accumulation is GROUP_KEY.
AGGREGATES: dict[str, tuple[str, ...]] = {
    "by_team": ("team",),
    "by_project": ("team", "project"),
    "by_user": ("team", "user"),
    "by_cost_center": ("cost_center",),
    "by_gpu_type": ("gpu_type",),
}
GROUP_KEY = ("team", "project", "user", "cost_center", "gpu_type")


def aggregate_columns(name: str) -> tuple[Column, ...]:
    keys = tuple(Column(k, "text", True) for k in AGGREGATES[name])
    return (Column("period", "text"), *keys, *MEASURE_COLUMNS, Column("mode", "text"),
            *EFFICIENCY_COLUMNS)


_PATTERNS = {
    "money": r"^-?[0-9]+\.[0-9]{2}$",
    "dec1": r"^-?[0-9]+\.[0-9]$",
    "dec3": r"^-?[0-9]+\.[0-9]{3}$",
    "dec6": r"^-?[0-9]+\.[0-9]{6}$",
    "timestamp": r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$",
}


def _column_schema(col: Column) -> dict[str, Any]:
    if col.kind == "int":
        schema: dict[str, Any] = {"type": ["integer", "null"] if col.nullable else "integer"}
    else:
        schema = {"type": ["string", "null"] if col.nullable else "string"}
        if col.kind in _PATTERNS:
            schema["pattern"] = _PATTERNS[col.kind]
        if col.kind == "timestamp":
            schema["format"] = "date-time"
    if col.name == "mode":
        schema["enum"] = ["chargeback", "showback"]
    return schema


def _object_schema(title: str, columns: Sequence[Column]) -> dict[str, Any]:
    return {
        "title": title,
        "type": "object",
        "properties": {c.name: _column_schema(c) for c in columns},
        "required": [c.name for c in columns],
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """JSON Schema (2020-12) of every JSON Lines file; one line validates against
    ``$defs/<file stem>`` (``runs``, ``by_team``, ...). db/chargeback/export_schema.json is this."""
    defs = {"runs": _object_schema("one run (or its share) in the period", EXPORT_COLUMNS)}
    for name in AGGREGATES:
        defs[name] = _object_schema(f"sums {name.replace('_', ' ')}", aggregate_columns(name))
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"slurmgate-export-v{SCHEMA_VERSION}",
        "title": f"slurmgate chargeback export, schema version {SCHEMA_VERSION}",
        "description": "Each line of <file>.jsonl validates against $defs/<file>. Money and "
                       "decimals are strings with a fixed number of places; timestamps are "
                       "ISO 8601 UTC.",
        "$defs": defs,
    }


def schema_text() -> str:
    return json.dumps(json_schema(), indent=2) + "\n"
