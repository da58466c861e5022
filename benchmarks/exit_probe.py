"""What can an exit head after layer L read? A linear probe of `[CLS]`, mean-pooled and pair features.

For a fine-tuned run, every layer's `[CLS]` vector, the mean of its real tokens and (sentence-pair tasks) the pair
features (each segment's mean a, b, then |a - b| and a * b) are computed (every mechanism off) for a seeded sample
of training rows and for all of an evaluation split; a logistic regression per layer and feature is fitted on the
training sample and scored on the evaluation split: accuracy, and the share of its rows (most confident first)
that can leave while their accuracy stays >= 95% ("coverage at 95%"; at 80% for three-class tasks, whose
accuracy is lower). This is the evidence behind `eat train --exit-pooling mean` (SST-2: a static model's early
`[CLS]` has gathered little, its token mean a lot) and `--exit-pooling pair` (sentence pairs).

    python benchmarks/exit_probe.py --run runs/plain/static --train-rows 20000
    python benchmarks/exit_probe.py --run runs/qqp3k/static --task qqp --train-rows 20000
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from transformers import AutoTokenizer

from eat.checkpoints import load_classifier
from eat.configuration_eat import MECHANISMS_OFF
from eat.data import batches, encode, load_glue, task_spec
from eat.modeling_eat import exit_head_input
from eat.timing import environment


def layer_features(model, encoded, names=("cls", "mean"), batch_size: int = 64) -> dict[str, np.ndarray]:
    """{name: (N, L, width)} for every pooling in ``names`` (see `exit_head_input`), every layer, in row order."""
    layers, d = model.config.num_hidden_layers, model.config.hidden_size
    captured: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0]))
             for i, block in enumerate(model.bert.encoder.layer)]
    features = {name: np.zeros((len(encoded), layers, 4 * d if name == "pair" else d), np.float32) for name in names}
    try:
        with torch.no_grad():
            for batch in batches(encoded, batch_size, bucket=True):
                model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                key_mask, rows = batch["attention_mask"].bool(), batch["index"].numpy()
                for i in range(layers):
                    for name in features:
                        features[name][rows, i] = exit_head_input(captured[i], name, key_mask,
                                                                  segments=batch["token_type_ids"]).numpy()
    finally:
        for hook in hooks:
            hook.remove()
    return features


def coverage_at(probabilities: np.ndarray, correct: np.ndarray, accuracy: float) -> float:
    """Largest share of rows (most confident first) whose accuracy stays >= ``accuracy``."""
    order = np.argsort(-probabilities)
    running = np.cumsum(correct[order]) / np.arange(1, len(order) + 1)
    ok = np.nonzero(running >= accuracy)[0]
    return (ok.max() + 1) / len(order) if len(ok) else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a fine-tuned run folder (with model/)")
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--split", default=None, help="evaluation split (default: the task's first dev split)")
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = task_spec(args.task)
    split = args.split or spec.eval_splits[0]
    names = ("cls", "mean", "pair") if len(spec.text_columns) == 2 else ("cls", "mean")
    model = load_classifier(f"{args.run}/model", knobs=MECHANISMS_OFF).eval()
    tokenizer = AutoTokenizer.from_pretrained(f"{args.run}/model")
    train = load_glue(args.task, "train").subset(args.train_rows, seed=args.seed)
    dev = load_glue(args.task, split)
    started = time.perf_counter()
    train_encoded, dev_encoded = encode(train, tokenizer, 128), encode(dev, tokenizer, 128)
    train_x = layer_features(model, train_encoded, names)
    dev_x = layer_features(model, dev_encoded, names)
    train_y, dev_y = np.asarray(train_encoded.labels), np.asarray(dev_encoded.labels)
    bar = 0.95 if len(np.unique(train_y)) == 2 else 0.80
    env = environment("cpu")
    print(f"# linear probe of {args.run}: {len(train)} {args.task} training rows (seed {args.seed}), all {len(dev)} "
          f"{split} rows; {env['cpu']}, {env['threads']} threads, features in {time.perf_counter() - started:.0f} s")
    print("| layer | " + " | ".join(f"{n} accuracy | {n} coverage at {bar:.0%}" for n in names) + " |")
    print("|---|" + "---|---|" * len(names))
    for layer in range(model.config.num_hidden_layers):
        cells = []
        for name in names:
            probe = LogisticRegression(max_iter=2000).fit(train_x[name][:, layer], train_y)
            correct = probe.predict(dev_x[name][:, layer]) == dev_y
            confidence = probe.predict_proba(dev_x[name][:, layer]).max(1)
            cells += [f"{100 * correct.mean():.2f}", f"{100 * coverage_at(confidence, correct, bar):.0f}%"]
        print(f"| {layer + 1} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
