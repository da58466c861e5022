"""What can an exit head after layer L read? A linear probe of `[CLS]` vs mean-pooled token features.

For a fine-tuned run, every layer's `[CLS]` vector and the mean of its real tokens are computed (every mechanism
off) for a seeded sample of SST-2 training rows and for all of dev; a logistic regression per layer and feature is
fitted on the training sample and scored on dev: accuracy, and the share of dev rows (most confident first) that
can leave while their accuracy stays >= 95% ("coverage at 95%"). This is the evidence behind
`eat train --exit-pooling mean`: a static model's early `[CLS]` has gathered little, its token mean a lot.

    python benchmarks/exit_probe.py --run runs/plain/static --train-rows 20000
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
from eat.data import batches, encode, load_glue
from eat.modeling_eat import exit_head_input
from eat.timing import environment


def layer_features(model, encoded, batch_size: int = 64) -> dict[str, np.ndarray]:
    """{"cls": (N, L, d), "mean": (N, L, d)}: every layer's `[CLS]` vector and real-token mean, in row order."""
    layers = model.config.num_hidden_layers
    captured: dict[int, torch.Tensor] = {}
    hooks = [block.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out[0]))
             for i, block in enumerate(model.bert.encoder.layer)]
    features = {name: np.zeros((len(encoded), layers, model.config.hidden_size), np.float32) for name in ("cls", "mean")}
    try:
        with torch.no_grad():
            for batch in batches(encoded, batch_size, bucket=True):
                model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
                key_mask, rows = batch["attention_mask"].bool(), batch["index"].numpy()
                for i in range(layers):
                    for name in features:
                        features[name][rows, i] = exit_head_input(captured[i], name, key_mask).numpy()
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
    parser.add_argument("--run", required=True, help="a fine-tuned SST-2 run folder (with model/)")
    parser.add_argument("--train-rows", type=int, default=20000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_classifier(f"{args.run}/model", knobs=MECHANISMS_OFF).eval()
    tokenizer = AutoTokenizer.from_pretrained(f"{args.run}/model")
    train = load_glue("sst2", "train").subset(args.train_rows, seed=args.seed)
    dev = load_glue("sst2", "validation")
    started = time.perf_counter()
    train_x = layer_features(model, encode(train, tokenizer, 128))
    dev_x = layer_features(model, encode(dev, tokenizer, 128))
    train_y, dev_y = train.frame["label"].to_numpy(), dev.frame["label"].to_numpy()
    env = environment("cpu")
    print(f"# linear probe of {args.run}: {len(train)} training rows (seed {args.seed}), all {len(dev)} dev rows; "
          f"{env['cpu']}, {env['threads']} threads, features in {time.perf_counter() - started:.0f} s")
    print("| layer | [CLS] accuracy | [CLS] coverage at 95% | mean accuracy | mean coverage at 95% |")
    print("|---|---|---|---|---|")
    for layer in range(model.config.num_hidden_layers):
        cells = []
        for name in ("cls", "mean"):
            probe = LogisticRegression(max_iter=2000).fit(train_x[name][:, layer], train_y)
            correct = probe.predict(dev_x[name][:, layer]) == dev_y
            confidence = probe.predict_proba(dev_x[name][:, layer]).max(1)
            cells += [f"{100 * correct.mean():.2f}", f"{100 * coverage_at(confidence, correct, 0.95):.0f}%"]
        print(f"| {layer + 1} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
