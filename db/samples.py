"""GPU utilisation samples: raw rows for recent days, hourly rows after that."""

from __future__ import annotations

import time

from db.store import Store

_ROLLUP = """
INSERT INTO gpu_samples_hourly
    (node, gpu_uuid, hour_ts, gpu_type, util_mean, util_max, mem_max_bytes, samples)
SELECT node, gpu_uuid, CAST(ts / 3600 AS INTEGER) * 3600, max(gpu_type), avg(util), max(util),
       max(mem_used_bytes), count(*)
FROM gpu_samples
WHERE ts < ?
GROUP BY 1, 2, 3
ON CONFLICT (node, gpu_uuid, hour_ts) DO UPDATE SET
    util_mean = (coalesce(util_mean, 0) * samples
                 + coalesce(excluded.util_mean, 0) * excluded.samples)
                / (samples + excluded.samples),
    util_max = max(coalesce(util_max, excluded.util_max), coalesce(excluded.util_max, util_max)),
    mem_max_bytes = max(coalesce(mem_max_bytes, excluded.mem_max_bytes),
                        coalesce(excluded.mem_max_bytes, mem_max_bytes)),
    gpu_type = coalesce(excluded.gpu_type, gpu_type),
    samples = samples + excluded.samples
"""


def rollup_samples(store: Store, retention_days: float, *, now: float | None = None) -> int:
    """Fold raw samples older than ``retention_days`` into hourly rows and delete them.

    One transaction; an hour split by the cutoff is merged (sample-weighted mean) when its
    later samples age out. Returns how many raw samples were rolled up.
    """
    cutoff = (time.time() if now is None else now) - retention_days * 86400.0
    with store.transaction():
        store.conn.execute(_ROLLUP, (cutoff,))
        cur = store.conn.execute("DELETE FROM gpu_samples WHERE ts < ?", (cutoff,))
    return cur.rowcount
