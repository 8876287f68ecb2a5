"""DuckDB side of the query bench: the same queries over the same Parquet files.

usage: query_duckdb.py <lake dir> <queries.json> <runs>
queries.json: [{"name": …, "duckdb": …}, …]; prints one JSON object: {name: {"ms": [...], "rows": n}}.
"""
import json
import sys
import time

import duckdb

lake, queries_path, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
queries = json.load(open(queries_path))
con = duckdb.connect()
# The tables as a Delta reader would list them: telemetry is append-only and devices was written in
# one commit, so every Parquet file under them is live.
con.execute(
    f"CREATE VIEW telemetry AS SELECT * FROM read_parquet('{lake}/telemetry/*/*/*.parquet', hive_partitioning = true)"
)
con.execute(
    f"CREATE VIEW devices AS SELECT * FROM read_parquet('{lake}/devices/*/*.parquet', hive_partitioning = true)"
)
out = {}
for q in queries:
    rows = len(con.execute(q["duckdb"]).fetchall())  # warm-up
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        con.execute(q["duckdb"]).fetchall()
        times.append((time.perf_counter() - start) * 1000.0)
    out[q["name"]] = {"ms": times, "rows": rows}
print(json.dumps(out))
