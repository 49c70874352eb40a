"""The accounting store: SQLite via sqlite-utils (schema, ingest, reports, rollups)."""

from db.ingest import IngestResult, ingest_records, resettle_runs
from db.samples import rollup_samples
from db.store import Store, StoreError, open_store

__all__ = [
    "IngestResult",
    "Store",
    "StoreError",
    "ingest_records",
    "open_store",
    "resettle_runs",
    "rollup_samples",
]
