"""One router per resource: search, items, ingest (+ jobs), health, metrics (+ stats)."""
