"""Reads Tributary's lake tables the way data engineers outside Tributary do, with delta-rs's Python
bindings (`deltalake`) and with `polars`, and checks that both give exactly the rows DataFusion
gives (Tributary's `tributary sql --format arrow "SELECT * FROM <table>"`, an Arrow IPC stream).

usage: read_tables.py <lake dir> <table>=<arrow ipc file> [<table>=<arrow ipc file>...]

Prints one line per table when the three agree; exits 1 naming the table, the reader and the first
difference otherwise. Rows are compared as multisets of canonical JSON (maps as objects whether a
reader gives them as maps or as lists of key/value structs, timestamps as UTC ISO strings, bytes
as hex), over every column DataFusion returns.
"""

import datetime
import json
import os
import sys

import polars as pl
import pyarrow as pa
import pyarrow.ipc
from deltalake import DeltaTable


def canon(v):
    if isinstance(v, dict):
        return {k: canon(x) for k, x in sorted(v.items())}
    if isinstance(v, list):
        if v and all(isinstance(x, tuple) and len(x) == 2 for x in v):
            return {str(k): canon(x) for k, x in v}
        if v and all(isinstance(x, dict) and set(x) == {"key", "value"} for x in v):
            return {str(x["key"]): canon(x["value"]) for x in v}
        return [canon(x) for x in v]
    if isinstance(v, tuple):
        return [canon(x) for x in v]
    if isinstance(v, (bytes, bytearray)):
        return v.hex()
    if isinstance(v, datetime.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=datetime.timezone.utc)
        return v.astimezone(datetime.timezone.utc).isoformat()
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, float):
        return repr(v)
    return v


def rows(table: pa.Table, columns):
    return sorted(
        json.dumps(canon(r), sort_keys=True) for r in table.select(columns).to_pylist()
    )


def first_difference(want, got):
    a, b = set(want), set(got)
    missing = sorted(a - b)[:1]
    extra = sorted(b - a)[:1]
    return f"missing {missing}, unexpected {extra}, {len(want)} vs {len(got)} rows"


def main():
    lake = sys.argv[1]
    failed = False
    for arg in sys.argv[2:]:
        name, path = arg.split("=", 1)
        with open(path, "rb") as f:
            datafusion = pa.ipc.open_stream(f).read_all()
        columns = datafusion.column_names
        want = rows(datafusion, columns)
        location = os.path.join(lake, name)
        readers = {
            "deltalake": lambda: DeltaTable(location).to_pyarrow_table(),
            "polars": lambda: pl.read_delta(location).to_arrow(),
        }
        for reader, read in readers.items():
            table = read()
            absent = sorted(set(columns) - set(table.column_names))
            if absent:
                print(f"{name}: {reader} lacks columns {absent}")
                failed = True
                continue
            got = rows(table, columns)
            if got != want:
                print(f"{name}: {reader} differs from DataFusion: {first_difference(want, got)}")
                failed = True
        if not failed:
            print(f"{name}: {len(want)} rows, {len(columns)} columns equal in DataFusion, deltalake and polars")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
