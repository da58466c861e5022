"""Large-file prediction on Ray Data (a local Ray on loopback): same shards and rows as the local job."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest

from eat.bulk import BulkConfig, predict_files, read_predictions, verify_output

from .test_bulk import _texts, tiny_classifier  # noqa: F401 - the fixture

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU Ray on this machine: no dashboard, an 80 MiB object store, usage stats off."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024**2, log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_output_equals_local(tmp_path, tiny_classifier, local_ray):  # noqa: F811
    from eat.bulk_ray import predict_files_ray

    texts = _texts(230, 5)
    texts[7] = ""
    pd.DataFrame({"text": texts}).to_csv(tmp_path / "in.csv", index=False)
    (tmp_path / "all_bad.jsonl").write_text("nope\n{}\n")  # a file whose every record is rejected
    config = BulkConfig(tiny_classifier, chunk_rows=40, batch_size=8)
    local = predict_files(config, tmp_path / "in.csv", tmp_path / "local")
    result = predict_files_ray(config, tmp_path / "in.csv", tmp_path / "ray", actors=2, threads=1, window_chunks=3)
    assert (result.rows, result.rejected, result.shards) == (local.rows, local.rejected, local.shards) == (229, 1, 6)
    assert verify_output(tmp_path / "ray") == verify_output(tmp_path / "local") == {"in.csv": 230}
    a, b = read_predictions(tmp_path / "local"), read_predictions(tmp_path / "ray")
    assert sorted(p.name for p in (tmp_path / "ray" / "shards").iterdir()) == \
        sorted(p.name for p in (tmp_path / "local" / "shards").iterdir())
    for column in ("source", "row", "label", "label_id", "exit_layer", "tokens"):
        assert a[column].tolist() == b[column].tolist(), column
    np.testing.assert_allclose(np.stack(a["probabilities"]), np.stack(b["probabilities"]), atol=1e-6)
    assert (tmp_path / "ray" / "rejects.jsonl").read_text() == (tmp_path / "local" / "rejects.jsonl").read_text()
    # a second Ray run resumes (nothing left), and the folder format is the local one
    again = predict_files_ray(config, tmp_path / "in.csv", tmp_path / "ray", actors=2, threads=1)
    assert again.shards_written == 0
    bad = predict_files_ray(config, tmp_path / "all_bad.jsonl", tmp_path / "bad", actors=1)
    assert (bad.rows, bad.rejected) == (0, 2)
    assert verify_output(tmp_path / "bad") == {"all_bad.jsonl": 2}
