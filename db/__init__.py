"""The accounting store: SQLite via sqlite-utils (schema, rollups, ingest, store, reports).

Imports go one way: schema <- rollups <- ingest <- store <- reports (and interruptions,
chargeback). The ingest and the rollups take any object with the store's ``conn`` and
``transaction()``; db.store.Store builds on them (re-settlement when a reservation binds,
admin credits that move the rollups).
"""

from db.ingest import IngestResult, ingest_records, resettle_runs
from db.rollups import rollup_samples
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
