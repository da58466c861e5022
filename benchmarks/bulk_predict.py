"""Large-file prediction at scale (issue #26, P1 and P3): rows/s and peak memory of `eat predict --input`.

Builds an input of N rows by repeating the SST-2 dev sentences (written in slices: the builder's memory stays
flat too), then runs `eat predict` on it under ``/usr/bin/time -v`` and reports rows, seconds, rows/s and the
process's peak resident memory (with ``--ray``: the driver's; Ray's workers are separate processes, see
docs/scale-out.md), and checks the output holds every row exactly once.

    python benchmarks/bulk_predict.py --rows 1000000 --checkpoint runs/demo/sst2/eat \\
        --tuned runs/demo/results/tuned_sst2.json --work /tmp/bulk [--ray local --actors 2 --threads 1] \\
        [--out benchmarks/results/bulk_predict_1m.txt]

Everything after ``--`` goes to `eat predict` unchanged (e.g. ``-- --chunk-rows 20000 --batch-size 32``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit  # noqa: E402

from eat.bulk import verify_output  # noqa: E402
from eat.data import load_glue  # noqa: E402
from eat.timing import environment  # noqa: E402


def build_input(rows: int, path: Path, slice_rows: int = 100_000) -> Path:
    """``rows`` rows (``id``, ``text``) of SST-2 dev sentences repeated in order, written a slice at a time."""
    sentences = load_glue("sst2", "validation").frame["text"].tolist()
    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.int64()), ("text", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, slice_rows):
            ids = list(range(start, min(rows, start + slice_rows)))
            writer.write_table(pa.table({"id": ids, "text": [sentences[i % len(sentences)] for i in ids]},
                                        schema=schema))
    return path


def main() -> None:
    """Build the input, run `eat predict` under /usr/bin/time -v, print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--tuned", default=None)
    parser.add_argument("--work", type=Path, required=True, help="folder for the input and the output")
    parser.add_argument("--ray", default=None, help="local, auto or an address: run on Ray Data")
    parser.add_argument("--actors", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    source = args.work / f"sst2_dev_x_{args.rows}.parquet"
    if not source.is_file():
        build_input(args.rows, source)
    output = args.work / f"out_{args.rows}{'_ray' if args.ray else ''}"
    shutil.rmtree(output, ignore_errors=True)
    command = [str(Path(sys.executable).parent / "eat"), "predict", "--checkpoint", args.checkpoint,
               "--input", str(source), "--output", str(output), "--id-column", "id"]
    for flag, value in (("--tuned", args.tuned), ("--ray", args.ray), ("--actors", args.actors),
                        ("--threads", args.threads)):
        if value is not None:
            command += [flag, str(value)]
    command += extra
    started = time.perf_counter()
    run = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True,
                         env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    seconds = time.perf_counter() - started
    if run.returncode != 0:
        sys.exit(f"eat predict failed ({run.returncode}):\n{run.stderr[-3000:]}")
    peak_kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr).group(1))
    files = verify_output(output)
    manifest = json.loads((output / "manifest.json").read_text())
    lines = [f"# eat predict --input: {args.rows} rows of SST-2 dev repeated",
             f"command: {' '.join(command)}",
             f"rows {manifest['rows']} predicted, {manifest['rejected']} rejected, exactly once: {files}",
             f"wall {seconds:.1f} s (process start and model load included): {args.rows / seconds:.1f} rows/s",
             f"peak RSS of the eat process: {peak_kib / 1024:.0f} MiB",
             f"last output line: {run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ''}",
             f"environment: {json.dumps(environment(), sort_keys=True)}"]
    emit(lines, args.out)


if __name__ == "__main__":
    main()
