"""Issue #26, P2: kill -9 `eat predict` at a random moment, resume it, and check every input row is in the output
exactly once; repeated for several trials with seeded random kill times.

    python benchmarks/kill_resume.py --checkpoint runs/demo/sst2/eat --rows 4000 --trials 5 --work /tmp/kill \\
        [--out benchmarks/results/kill_resume.txt] [-- --chunk-rows 500]

Each trial starts a fresh output folder, waits until the job has written its first shard (so the kill lands
mid-job, not during start-up, whatever the machine's load), sends SIGKILL after a further random delay (uniform
between ``--min-delay`` and ``--max-delay`` seconds: between shards or in the middle of writing one), reruns the
same command to the end, and runs :func:`eat.bulk.verify_output` plus a check that the output's row numbers are
exactly the input's.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bulk_predict import build_input  # noqa: E402

from eat.bulk import verify_output  # noqa: E402
from eat.timing import environment  # noqa: E402


def shard_ids(output: Path) -> list[int]:
    """Every input row number in the output's shards (duplicates kept, so that a row written twice is seen twice)."""
    ids: list[int] = []
    for shard in sorted((output / "shards").glob("*.parquet")):
        ids.extend(pq.read_table(shard, columns=["row"]).column("row").to_pylist())
    return ids


def main() -> None:
    """Run the trials and print one line per trial and a verdict."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--min-delay", type=float, default=0.0, help="seconds after the first shard, at least")
    parser.add_argument("--max-delay", type=float, default=6.0, help="seconds after the first shard, at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args, extra = parser.parse_known_args()
    extra = [item for item in extra if item != "--"]
    source = build_input(args.rows, args.work / f"input_{args.rows}.parquet")
    rng = random.Random(args.seed)
    env = environment("cpu")
    lines = [f"kill -9 and resume: {args.rows} rows, {args.trials} trials, checkpoint {args.checkpoint}, "
             f"cpu {env['cpu']}, threads {args.threads}, commit {env['git_commit']}"]
    print(lines[-1], flush=True)
    passed = 0
    for trial in range(1, args.trials + 1):
        output = args.work / f"out_{trial}"
        shutil.rmtree(output, ignore_errors=True)
        command = [sys.executable, "-m", "eat.cli", "predict", "--checkpoint", args.checkpoint, "--input", str(source),
                   "--output", str(output), "--threads", str(args.threads), *extra]
        delay = rng.uniform(args.min_delay, args.max_delay)
        job = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while job.poll() is None and not any((output / "shards").glob("*.parquet")):
            time.sleep(0.05)
        time.sleep(delay)
        killed = job.poll() is None
        if killed:
            job.send_signal(signal.SIGKILL)
        job.wait()
        before = len(list((output / "shards").glob("*.parquet"))) if (output / "shards").exists() else 0
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            verify_output(output)
            ids = shard_ids(output)
            ok = sorted(ids) == list(range(args.rows))
            verdict = "exactly once" if ok else f"ids differ: {len(ids)} rows, {len(set(ids))} distinct"
        except ValueError as error:
            ok, verdict = False, f"verify failed: {error}"
        passed += ok
        lines.append(f"trial {trial}: {'killed' if killed else 'finished before the kill'} {delay:.1f} s after its first shard, with "
                     f"{before} shard files, resumed: {verdict}")
        print(lines[-1], flush=True)
    lines.append(f"P2: {passed}/{args.trials} trials hold every input row exactly once")
    print(lines[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
