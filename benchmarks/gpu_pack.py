"""Pack what target 8 (batch-1 latency on a GPU) needs into one folder small enough to travel to a GPU machine.

    .venv/bin/python benchmarks/gpu_pack.py --run runs/sent/eat-mean-frozen \
        --tuned results/sst2-sent-mean-frozen/tuned_sst2.json --out .gpu

The GPU machine has PyTorch and transformers but not this project's runs or data, and what travels there is
limited (64 MiB). The pack holds:

- ``eat/``: the EAT run's model in float16 (about 46 MB instead of 91 MB; fp16 keeps 10 mantissa bits, and the GPU
  runs it in fp16), its tokenizer and its ``train_config.json``. In a two-stage family (exit heads fitted on the
  frozen static model) the static model *is* this model with exits off, bit for bit, so ``--static`` may name the
  same folder and nothing else has to travel. The script refuses a run whose backbone was trained jointly (there
  the static model is a different checkpoint).
- ``glue/sst2/validation.parquet``: SST-2 dev (from ``EAT_DATA_DIR``).
- the tuned point(s): ``tuned_sst2.json`` (and ``tuned_sst2_b32.json`` when it lies beside it), chosen on the
  calibration split on CPU.

Then run ``benchmarks/gpu_t8.sh`` there (see that file).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True, help="a two-stage EAT run folder (model/, train_config.json)")
    parser.add_argument("--tuned", type=Path, required=True, help="tuned_sst2.json from `eat tune`")
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("EAT_DATA_DIR", "../shared/data/glue")))
    args = parser.parse_args()

    import torch

    from eat.checkpoints import load_classifier

    config_file = args.run / "train_config.json"
    if not (args.run / "model" / "config.json").is_file() or not config_file.is_file():
        sys.exit(f"{args.run}: expected a run folder with model/ and train_config.json")
    trained = json.loads(config_file.read_text())
    if not trained.get("freeze_backbone"):
        sys.exit(f"{args.run}: not a two-stage run (--freeze-backbone): its static model is another checkpoint, "
                 "which this pack does not carry")
    dev = args.data_dir / "sst2" / "validation.parquet"
    if not dev.is_file():
        sys.exit(f"{dev}: SST-2 dev not found (set EAT_DATA_DIR or --data-dir)")
    if not args.tuned.is_file():
        sys.exit(f"{args.tuned}: no such file (expected a tuned_<task>.json from `eat tune`)")
    tuned_files = [args.tuned] + sorted(args.tuned.parent.glob(f"{args.tuned.stem}_b*.json"))
    for path in tuned_files:
        try:
            knobs = json.loads(path.read_text()).get("knobs")
        except (json.JSONDecodeError, AttributeError):
            knobs = None
        if not knobs:
            sys.exit(f"{path}: no 'knobs' (expected a tuned_<task>.json from `eat tune`)")

    shutil.rmtree(args.out, ignore_errors=True)
    model_dir = args.out / "eat" / "model"
    model = load_classifier(str(args.run / "model")).to(torch.float16)
    model.save_pretrained(model_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(args.run / "model")).save_pretrained(model_dir)
    shutil.copy(config_file, args.out / "eat" / "train_config.json")
    (args.out / "glue" / "sst2").mkdir(parents=True)
    shutil.copy(dev, args.out / "glue" / "sst2" / "validation.parquet")
    for path in tuned_files:
        shutil.copy(path, args.out / path.name)
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"packed {args.run} (float16), SST-2 dev and {', '.join(p.name for p in tuned_files)} into {args.out}: "
          f"{size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
