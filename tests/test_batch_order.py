"""benchmarks/batch_order.py: the padding share it reports, that both batch orders time the same rows, and its
refusal of a --tuned file that is missing or is not a tuner output."""

from __future__ import annotations

import sys

import pytest
import torch

from eat.configuration_eat import MECHANISMS_OFF
from eat.data import EncodedDataset, batches, padding_share

from .conftest import benchmark_script, tiny_model


def _rows(lengths):
    ids = [[101] + [3 + i] * (n - 2) + [102] for i, n in enumerate(lengths)]  # tiny vocabulary: ids < 120
    return EncodedDataset(ids, [[0] * len(row) for row in ids], [i % 2 for i in range(len(ids))], 0, list(lengths))


def test_padding_share_counts_pad_positions_in_each_order():
    data = _rows([4, 20, 4, 20])  # arrival: (4, 20), (4, 20) -> 80 positions, 48 real; sorted: (4, 4), (20, 20)
    assert padding_share(list(batches(data, 2, bucket=False))) == pytest.approx(1 - 48 / 80)
    assert padding_share(list(batches(data, 2, bucket=True))) == 0.0


def test_both_orders_are_timed_on_the_same_rows():
    script = benchmark_script("batch_order")
    static = tiny_model(seed=0)
    static.config.set_knobs(**MECHANISMS_OFF)
    tuned = tiny_model(seed=0, exit_layers="all", exit_policy="confidence", exit_threshold=0.0)
    data = _rows([5, 17, 9, 30, 6, 12])
    result = script.compare_orders(static.eval(), tuned.eval(), data, 3, repeats=1)
    assert set(result) == {"arrival", "bucketed"}
    assert result["bucketed"]["padding"] < result["arrival"]["padding"]
    for row in result.values():
        assert row["static_rows_per_s"] > 0 and row["eat_rows_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["eat_rows_per_s"] / row["static_rows_per_s"])
    batch = next(iter(batches(data, 6, bucket=False)))
    with torch.no_grad():  # the tuned model really leaves at the first head on these rows
        out = tuned(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    assert bool((out.exit_layer == 1).all())


@pytest.mark.parametrize("content", [None, "not json", '{"point": "eat:tuned"}'])
def test_a_missing_or_foreign_tuned_file_is_refused(content, tmp_path, monkeypatch, capsys):
    script = benchmark_script("batch_order")
    tuned = tmp_path / "tuned_sst2.json"
    if content is not None:
        tuned.write_text(content)
    monkeypatch.setattr(sys, "argv", ["batch_order.py", "--task", "sst2", "--run", "nowhere", "--static", "nowhere",
                                      "--tuned", str(tuned)])
    with pytest.raises(SystemExit) as stopped:
        script.main()
    assert stopped.value.code == 2
    expected = "no such file" if content is None else "not a tuner output"
    assert expected in capsys.readouterr().err
