"""eat serve: the on_exit hook, the dynamic batcher, the HTTP service (every route and error), SIGTERM with
requests in flight, and Ray Serve with 2 replicas answering like the single-machine server.

The tiny model (hidden 32, 4 layers, real uncased tokenizer) has mean-pooled exit heads whose classifiers are
scaled up, so layer-1 confidence differs between texts: at tau 0.85 EARLY leaves at layer 1 and LATE does not
(the fixture checks this, so no test relies on it silently).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch

from eat import EATForSequenceClassification
from eat.serving import ServeConfig
from eat.serving.app import create_app
from eat.serving.batcher import BatcherClosed, DynamicBatcher, QueueFull, RowTiming
from eat.serving.model import load_predictor
from eat.serving.protocol import RequestError, parse_request, parse_server_timing

from .conftest import REPO, mixed_batch, tiny_config, tiny_model

EARLY = "a gripping film"
LATE = "an utterly charming tale of love"
TAU = 0.85
EXITS = {"exit_policy": "confidence", "exit_threshold": TAU}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, backbone_path) -> Path:
    """A tiny EAT classifier (2 labels, exit heads after every layer) with the real tokenizer, saved as a run."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("serve-run") / "model"
    torch.manual_seed(0)
    model = EATForSequenceClassification(tiny_config(vocab_size=30522, num_labels=2, max_position_embeddings=128,
                                                     exit_layers="all", exit_pooling="mean",
                                                     sep_token_id=102)).eval()
    model.config.id2label, model.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    with torch.no_grad():
        for head in model.exit_heads.values():
            head.classifier.weight.mul_(100)  # spread the confidences (a random head is near 0.5 everywhere)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(backbone_path).save_pretrained(folder)
    predictor = load_predictor(folder.parent, knobs=EXITS)
    out = []
    predictor.run([predictor.encode(EARLY), predictor.encode(LATE)], lambda i, a: out.extend(zip(i, a)))
    layers = {i: a["exit_layer"] for i, a in out}
    assert layers[0] == 1 and layers[1] > 1, layers  # the premise of the early-answer tests
    return folder.parent


@contextmanager
def live_server(app):
    """Run ``app`` with uvicorn on a free loopback port in a thread; yields its base URL once it is ready."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert thread.is_alive() and time.time() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    while httpx.get(url + "/health").status_code != 200:  # warm-up runs in the background
        assert time.time() < deadline, "the model did not warm up"
        time.sleep(0.02)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def metric(text: str, name: str, **labels) -> float:
    """A sample's value in Prometheus text format (0 when absent)."""
    wanted = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _post_all(url: str, bodies: list) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return await asyncio.gather(*(client.post("/v1/classify", json=body) for body in bodies))


# --- the model hook -------------------------------------------------------------------------------------------


def test_on_exit_reports_every_row_once_with_its_final_logits():
    """on_exit sees each row exactly once, at its exit layer, with the logits and token count the output has;
    passing it changes nothing."""
    model = tiny_model(seed=3, exit_layers="all", exit_policy="confidence", keep_ratio=0.7)
    with torch.no_grad():
        for head in model.exit_heads.values():
            for parameter in head.parameters():
                parameter.mul_(40)
    ids, mask = mixed_batch(lengths=(17, 9, 30, 4, 12, 20, 7))
    with torch.no_grad():
        cached = model(ids, mask, output_exit_logits=True, disable_exit=True)
    model.config.set_knobs(exit_threshold=float(cached.exit_logits.softmax(-1).amax(-1)[:, 0].median()))
    seen = []
    with torch.no_grad():
        out = model(ids, mask, on_exit=lambda layer, rows, logits, tokens: seen.append(
            (layer, rows.tolist(), logits.clone(), tokens.tolist())))
        plain = model(ids, mask)
    assert sorted(r for _, rows, _, _ in seen for r in rows) == list(range(7))
    assert len({layer for layer, *_ in seen}) > 1  # some rows left early, some later
    for layer, rows, logits, tokens in seen:
        assert torch.equal(out.logits[rows], logits) and out.exit_layer[rows].eq(layer).all()
        assert tokens == out.tokens_per_layer[rows, layer - 1].tolist()
    assert torch.equal(out.logits, plain.logits) and torch.equal(out.exit_layer, plain.exit_layer)


# --- the batcher, without HTTP --------------------------------------------------------------------------------


class Recorder:
    """A fake model: records batches, answers each row with its own value; raises on rows named 'poison'."""

    def __init__(self, gate: threading.Event | None = None):
        self.batches: list[list] = []
        self.gate = gate

    def __call__(self, rows, deliver):
        if self.gate is not None:
            self.gate.wait(10)
        self.batches.append(list(rows))
        if "poison" in rows:
            raise RuntimeError("bad row")
        deliver(list(range(len(rows))), [{"row": row} for row in rows])


async def _until_running(batcher) -> None:
    """Wait until the worker has taken the queued rows (they are running, none is waiting)."""
    while batcher.queue_depth or not batcher.in_flight:
        await asyncio.sleep(0.005)


def test_batcher_caps_batches_by_rows_and_padded_tokens_in_arrival_order():
    async def scenario():
        recorder = Recorder(gate=threading.Event())
        batcher = DynamicBatcher(recorder, max_batch=3, max_batch_tokens=40, max_wait_ms=0)
        batcher.start()
        first = batcher.submit(["held"], [5])  # occupies the worker until the gate opens
        await _until_running(batcher)
        rows = ["a", "b", "c", "d", "long", "e"]
        tokens = [5, 5, 5, 5, 20, 5]
        futures = batcher.submit(rows, tokens)
        assert batcher.queue_depth == 6
        recorder.gate.set()
        answers = await asyncio.gather(*first, *futures)
        await batcher.close()
        return recorder.batches, answers

    batches, answers = asyncio.run(scenario())
    assert [a["row"] for a in answers] == ["held", "a", "b", "c", "d", "long", "e"]
    # 3 rows at most; "d" + "long" would be 2 x 20 = 40 tokens (fits), "d", "long", "e" 60 (does not)
    assert batches == [["held"], ["a", "b", "c"], ["d", "long"], ["e"]]


def test_batcher_fills_row_timings_in_order_of_events():
    """submit(..., timings): each row's RowTiming gets enqueued <= started <= answered; a row that waited behind a
    held batch has queue time at least the hold; a mismatched timings list is refused."""
    async def scenario():
        recorder = Recorder(gate=threading.Event())
        batcher = DynamicBatcher(recorder, max_batch=4, max_wait_ms=0)
        batcher.start()
        held_timing = [RowTiming()]
        first = batcher.submit(["held"], [3], held_timing)
        await _until_running(batcher)
        timings = [RowTiming(), RowTiming()]
        queued = batcher.submit(["a", "b"], [3, 3], timings)
        await asyncio.sleep(0.05)  # the held batch keeps "a" and "b" waiting
        recorder.gate.set()
        await asyncio.gather(*first, *queued)
        with pytest.raises(ValueError, match="2 timings for 1 rows"):
            batcher.submit(["c"], [3], [RowTiming(), RowTiming()])
        await batcher.close()
        return held_timing + timings

    timings = asyncio.run(scenario())
    for timing in timings:
        assert 0.0 < timing.enqueued <= timing.started <= timing.answered
    assert timings[1].queue_s >= 0.04 and timings[2].queue_s >= 0.04
    assert timings[1].started == timings[2].started  # one batch
    assert timings[0].model_s >= 0.04  # held by the gate inside the model call


def test_batcher_waits_up_to_max_wait_for_a_batch_to_fill():
    async def scenario():
        recorder = Recorder()
        batcher = DynamicBatcher(recorder, max_batch=4, max_wait_ms=1000)
        batcher.start()
        futures = batcher.submit(["a"], [3])
        await asyncio.sleep(0.05)  # well inside max_wait: the batch is still open
        futures += batcher.submit(["b", "c"], [3, 3])
        await asyncio.gather(*futures)
        await batcher.close()
        return recorder.batches

    assert asyncio.run(scenario()) == [["a", "b", "c"]]


def test_batcher_model_error_fails_only_the_bad_row():
    async def scenario():
        recorder = Recorder()
        batcher = DynamicBatcher(recorder, max_batch=8, max_wait_ms=100)
        batcher.start()
        answers = await asyncio.gather(*batcher.submit(["x", "poison", "y"], [3, 3, 3]))
        await batcher.close()
        return answers, batcher.stats

    answers, stats = asyncio.run(scenario())
    assert answers[0] == {"row": "x"} and answers[2] == {"row": "y"}
    assert "RuntimeError: bad row" in answers[1]["error"]
    assert stats.retried_batches == 1 and stats.row_errors == 1 and stats.rows == 3


def test_batcher_refuses_a_request_that_overflows_the_queue_and_drains_on_close():
    async def scenario():
        gate = threading.Event()
        batcher = DynamicBatcher(Recorder(gate), max_batch=1, max_queue=3)
        batcher.start()
        held = batcher.submit(["held"], [1])
        await _until_running(batcher)
        queued = batcher.submit(["a", "b"], [1, 1])
        with pytest.raises(QueueFull, match="queue is full"):
            batcher.submit(["c", "d"], [1, 1])  # 2 + 2 > 3: refused whole
        queued += batcher.submit(["c"], [1])
        closing = asyncio.create_task(batcher.close())
        await asyncio.sleep(0.01)
        with pytest.raises(BatcherClosed):
            batcher.submit(["late"], [1])
        gate.set()
        await closing
        return [f.result()["row"] for f in held + queued]

    assert asyncio.run(scenario()) == ["held", "a", "b", "c"]


def test_batcher_answers_early_rows_before_the_batch_ends(checkpoint):
    """EARLY (exits at layer 1) and LATE share a batch; EARLY's future resolves first, counted as an early
    answer, and LATE's only after it: decided by order and counters, not by timing."""
    predictor = load_predictor(checkpoint, knobs=EXITS)

    async def scenario():
        batcher = DynamicBatcher(predictor.run, max_batch=8, max_wait_ms=200)
        batcher.start()
        order = []
        late, early = batcher.submit([predictor.encode(LATE), predictor.encode(EARLY)], [10, 5])
        for name, future in (("late", late), ("early", early)):
            future.add_done_callback(lambda _, name=name: order.append(name))
        answers = await asyncio.gather(late, early)
        await batcher.close()
        return order, answers, batcher.stats

    order, (late, early), stats = asyncio.run(scenario())
    assert stats.batch_sizes == [2]
    assert early["exit_layer"] == 1 and late["exit_layer"] > 1
    assert order == ["early", "late"] and stats.early_rows == 1


def test_a_model_without_the_hook_is_answered_at_the_end_and_a_nan_row_fails_alone(checkpoint):
    """A model that ignores on_exit (another backend) still answers every row, from its output; a row whose output
    is not finite gets an error (JSON has no NaN) and the other rows their answers."""
    from types import SimpleNamespace

    from eat.serving.model import Predictor

    class NanModel:
        config = tiny_config(num_labels=2)

        def __call__(self, ids, mask, types, **unused):
            logits = torch.zeros(ids.shape[0], 2)
            logits[1] = float("nan")
            return SimpleNamespace(logits=logits, exit_layer=torch.full((ids.shape[0],), 4), tokens_per_layer=None)

    predictor = Predictor(NanModel(), load_predictor(checkpoint).tokenizer)
    got = {}
    predictor.run([predictor.encode(text) for text in (EARLY, LATE, EARLY)],
                  lambda indices, answers: got.update(zip(indices, answers)))
    assert sorted(got) == [0, 1, 2] and "non-finite" in got[1]["error"]
    assert got[0]["exit_layer"] == got[2]["exit_layer"] == 4 and got[0]["confidence"] == 0.5


# --- the protocol ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "malformed JSON"),
    (b"", 400, "empty body"),
    (b"[1, 2]", 422, "JSON object"),
    (b'{"txt": "hi"}', 422, "unknown field 'txt'"),
    (b'{"id": 3}', 422, "missing field"),
    (b'{"text": "a", "texts": ["b"]}', 422, "not both"),
    (b'{"text": "   "}', 422, "'text' is empty"),
    (b'{"text": 5}', 422, "'text' must be a string"),
    (b'{"texts": ["ok", ""]}', 422, "texts[1] is empty"),
    (b'{"texts": []}', 422, "empty list"),
    (b'{"texts": [["a"]]}', 422, "texts[0] must be a text or a [text, text_pair] pair"),
    (b'{"texts": ["a", "b", "c"]}', 413, "at most 2 per request"),
    (b'{"text": "' + b"x" * 300 + b'"}', 413, "at most 200"),
])
def test_bad_requests_get_a_message_naming_the_problem(body, status, message):
    with pytest.raises(RequestError) as caught:
        parse_request(body, max_rows=2, max_body_bytes=200)
    assert caught.value.status == status and message in caught.value.message


def test_request_forms():
    assert parse_request(b'{"text": "a", "text_pair": "b", "id": "r1"}', max_rows=4, max_body_bytes=999).rows == \
        [("a", "b")]
    parsed = parse_request(b'{"texts": ["a", ["b", "c"], {"text": "d", "text_pair": "e"}], "id": 7}',
                           max_rows=4, max_body_bytes=999)
    assert parsed.id == 7 and parsed.rows == [("a", None), ("b", "c"), ("d", "e")]


# --- the HTTP service -----------------------------------------------------------------------------------------


def test_every_route_answers_and_batches_concurrent_requests(checkpoint):
    """classify (one text, a pair, a list) answers what the model answers in-process; concurrent requests share
    a batch (batch-size metric); /health and /metrics report; early rows are counted."""
    predictor = load_predictor(checkpoint, knobs=EXITS)
    app = create_app(predictor, ServeConfig(max_batch=16, max_wait_ms=300))
    reference = load_predictor(checkpoint, knobs=EXITS)
    expected = {}
    for text in (EARLY, LATE):
        reference.run([reference.encode(text)], lambda i, a, text=text: expected.update({text: a[0]}))
    with live_server(app) as url:
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ready" and health["kind"] == "classify" and health["layers"] == 4
        one = httpx.post(url + "/v1/classify", json={"text": EARLY, "id": "r1"})
        assert one.status_code == 200 and one.json()["id"] == "r1"
        answer = one.json()["results"][0]
        # the server's account of the request (W3C Server-Timing, ms): every phase present, parts within the total
        phases = parse_server_timing(one.headers["server-timing"])
        assert set(phases) == {"parse", "queue", "model", "total"}
        assert all(ms >= 0.0 for ms in phases.values()) and phases["model"] > 0.0
        assert phases["parse"] + phases["queue"] + phases["model"] <= phases["total"] + 1e-3
        assert set(answer) >= {"label", "label_id", "confidence", "probabilities", "exit_layer", "tokens",
                               "tokens_kept"}
        assert answer["label"] == expected[EARLY]["label"] and answer["exit_layer"] == 1
        assert answer["probabilities"][answer["label"]] == pytest.approx(expected[EARLY]["confidence"], abs=1e-5)
        pair = httpx.post(url + "/v1/classify", json={"text": EARLY, "text_pair": LATE}).json()["results"]
        assert len(pair) == 1 and pair[0]["tokens"] > answer["tokens"]
        listed = httpx.post(url + "/v1/classify", json={"texts": [EARLY, LATE, [EARLY, LATE]]}).json()["results"]
        assert [r["label"] for r in listed[:2]] == [expected[EARLY]["label"], expected[LATE]["label"]]
        assert listed[1]["exit_layer"] == expected[LATE]["exit_layer"]
        assert {k: listed[2][k] for k in ("label", "exit_layer", "tokens")} == \
            {k: pair[0][k] for k in ("label", "exit_layer", "tokens")}
        before = app.state.batcher.stats.batches
        responses = asyncio.run(_post_all(url, [{"text": LATE if i % 2 else EARLY, "id": i} for i in range(6)]))
        assert [r.json()["id"] for r in responses] == list(range(6))
        assert app.state.batcher.stats.batches - before < 6  # several requests landed in one batch
        metrics = httpx.get(url + "/metrics").text
        assert metric(metrics, "eat_batch_rows_bucket", le="1.0") < metric(metrics, "eat_batch_rows_count")
        assert metric(metrics, "eat_requests_total", route="classify", status="200") == 9
        assert metric(metrics, "eat_rows_answered_early_total") >= 3  # EARLY rows of the mixed batches
        assert metric(metrics, "eat_exit_layer_bucket", le="1.0") >= 5  # every EARLY row
        assert "eat_request_latency_seconds_bucket" in metrics and "eat_queue_depth_rows 0.0" in metrics
        wrong = httpx.post(url + "/v1/tag", json={"text": EARLY})
        assert wrong.status_code == 404 and "use POST /v1/classify" in wrong.json()["error"]


class FlakyPredictor:
    """Wraps a predictor: raises on any batch holding the text 'poison pill', and (when ``gate`` is set) holds
    every batch until the gate opens."""

    def __init__(self, inner, gate: threading.Event | None = None):
        self.inner, self.gate = inner, gate
        for name in ("kind", "labels", "num_layers", "description", "encode", "warmup"):
            setattr(self, name, getattr(inner, name))

    def run(self, rows, deliver):
        if self.gate is not None and not self.gate.is_set() and rows[0].text == "hold":
            self.gate.wait(20)
        if any(row.text == "poison pill" for row in rows):
            raise RuntimeError("the model failed on this row")
        self.inner.run(rows, deliver)


def test_http_errors_name_the_problem_and_a_bad_row_fails_alone(checkpoint):
    gate = threading.Event()
    predictor = FlakyPredictor(load_predictor(checkpoint), gate)
    config = ServeConfig(max_batch=4, max_wait_ms=0, max_queue=3, max_rows_per_request=3, max_body_bytes=2000)
    app = create_app(predictor, config)
    with live_server(app) as url:
        post = lambda **kw: httpx.post(url + "/v1/classify", timeout=30, **kw)  # noqa: E731
        cases = [(dict(content=b"{oops"), 400, "malformed JSON"),
                 (dict(json={"texts": ["a"], "extra": 1}), 422, "unknown field 'extra'"),
                 (dict(json={"id": 1}), 422, "missing field"),
                 (dict(json={"texts": ["fine", " "]}), 422, "texts[1] is empty"),
                 (dict(json={"texts": ["a"] * 4}), 413, "at most 3 per request"),
                 (dict(content=b'{"text": "' + b"y" * 3000 + b'"}'), 413, "at most 2000"),
                 (dict(content=iter([b'{"text": "', b"z" * 3000, b'"}'])), 413, "more than 2000")]  # chunked
        for kwargs, status, message in cases:
            response = post(**kwargs)
            assert response.status_code == status and message in response.json()["error"], response.text
        mixed = post(json={"texts": ["good", "poison pill", "also good"]})
        assert mixed.status_code == 200
        results = mixed.json()["results"]
        assert "label" in results[0] and "label" in results[2] and "model failed" in results[1]["error"]
        alone = post(json={"text": "poison pill"})
        assert alone.status_code == 500 and "model failed" in alone.json()["results"][0]["error"]

        async def overflow():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                held = asyncio.create_task(client.post("/v1/classify", json={"text": "hold"}))
                await _until_running(app.state.batcher)  # the held row is in the worker, none is waiting
                queued = asyncio.create_task(client.post("/v1/classify", json={"texts": ["q1", "q2", "q3"]}))
                while app.state.batcher.queue_depth < 3:
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/classify", json={"text": "one too many"})
                gate.set()
                return refused, await held, await queued

        refused, held, queued = asyncio.run(overflow())
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "queue is full" in refused.json()["error"]
        assert held.status_code == 200 and queued.status_code == 200 and len(queued.json()["results"]) == 3
        metrics = httpx.get(url + "/metrics").text
        assert metric(metrics, "eat_requests_total", route="classify", status="503") == 1
        assert metric(metrics, "eat_row_errors_total") == 2


def test_tag_route_answers_tags_per_word(tmp_path, backbone_path):
    from transformers import AutoTokenizer

    from eat import EATForTokenClassification

    torch.manual_seed(1)
    model = EATForTokenClassification(tiny_config(vocab_size=30522, num_labels=3, max_position_embeddings=128,
                                                  exit_layers="all", sep_token_id=102))
    model.config.id2label = {0: "O", 1: "B-PER", 2: "I-PER"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    model.save_pretrained(tmp_path / "model")
    AutoTokenizer.from_pretrained(backbone_path).save_pretrained(tmp_path / "model")
    predictor = load_predictor(tmp_path)
    assert predictor.kind == "tag"
    with live_server(create_app(predictor)) as url:
        response = httpx.post(url + "/v1/tag", json={"texts": ["John lives in Paris", "hello"]})
        assert response.status_code == 200
        first, second = response.json()["results"]
        assert first["words"] == ["John", "lives", "in", "Paris"] and len(first["tags"]) == 4
        assert set(first["tags"]) <= {"O", "B-PER", "I-PER"} and len(first["exit_layer"]) == 4
        assert second["words"] == ["hello"]
        wrong = httpx.post(url + "/v1/classify", json={"text": "hi"})
        assert wrong.status_code == 404 and "/v1/tag" in wrong.json()["error"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_answers_every_accepted_request_then_exits(checkpoint):
    """`eat serve` in a subprocess: requests are queued (a long max-wait holds them), SIGTERM arrives, and every
    one of them still gets its answer; then the process exits and the port is closed."""
    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "eat.cli", "serve", "--checkpoint", str(checkpoint),
                                "--port", str(port), "--max-wait-ms", "1500", "--max-batch", "64", "--threads", "1",
                                "--knob", "exit_policy=confidence", "--knob", f"exit_threshold={TAU}"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            assert process.poll() is None, process.stdout.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.time() < deadline, "eat serve did not become ready"
            time.sleep(0.1)

        async def load_then_terminate():
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                tasks = [asyncio.create_task(client.post("/v1/classify", json={"text": f"{EARLY} {i}", "id": i}))
                         for i in range(8)]
                while True:  # all 8 rows accepted and waiting for the batch window
                    text = (await client.get("/metrics")).text
                    if metric(text, "eat_queue_depth_rows") == 8:
                        break
                    await asyncio.sleep(0.02)
                process.send_signal(signal.SIGTERM)
                return await asyncio.gather(*tasks)

        responses = asyncio.run(load_then_terminate())
        assert [r.status_code for r in responses] == [200] * 8
        assert sorted(r.json()["id"] for r in responses) == list(range(8))
        assert process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_serve_command_refuses_bad_settings_with_one_line(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from eat.cli import app

    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(checkpoint), "--max-batch-tokens", "64",
                                      "--max-length", "128"])
    assert result.exit_code == 2 and "--max-batch-tokens 64 is below --max-length 128" in result.output
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "nothing" in result.output
    result = CliRunner().invoke(app, ["serve", "--checkpoint", str(checkpoint), "--replicas", "2"])
    assert result.exit_code == 2 and "--replicas needs --ray" in result.output


# --- Ray Serve ------------------------------------------------------------------------------------------------


def test_ray_serve_two_replicas_answer_like_the_single_machine_server(checkpoint, monkeypatch):
    """S5: the same checkpoint on Ray Serve with 2 replicas (a local Ray on loopback, small object store, usage
    stats off) answers every row as the single-machine server does."""
    ray = pytest.importorskip("ray")
    serve = pytest.importorskip("ray.serve")
    from eat.serving.ray_app import build_ray_app

    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    texts = [EARLY, LATE, "the plot is thin", "what a waste of time", "a small gem", [EARLY, LATE]]
    config = ServeConfig(max_batch=8, max_wait_ms=20)
    with live_server(create_app(load_predictor(checkpoint, knobs=EXITS), config)) as url:
        single = [httpx.post(url + "/v1/classify", json={"texts": [text]}).json()["results"][0] for text in texts]
    port = _free_port()
    ray.init(include_dashboard=False, object_store_memory=80 * 1024**2, num_cpus=2, _node_ip_address="127.0.0.1",
             runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_ray_app(checkpoint, config=config, replicas=2, knobs=EXITS, threads=1), name="eat",
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(base + "/health", timeout=30).json()["status"] == "ready"

        async def both():
            async with httpx.AsyncClient(base_url=base, timeout=60) as client:
                return await asyncio.gather(*(client.post("/v1/classify", json={"texts": [text], "id": i})
                                              for i, text in enumerate(texts * 2)))

        responses = asyncio.run(both())
        assert [r.json()["id"] for r in responses] == list(range(len(texts) * 2))
        replicas = serve.status().applications["eat"].deployments["eat"].replica_states
        assert replicas.get("RUNNING") == 2
        for i, response in enumerate(responses):
            got, want = response.json()["results"][0], single[i % len(texts)]
            assert {k: got[k] for k in ("label", "exit_layer", "tokens", "tokens_kept")} == \
                {k: want[k] for k in ("label", "exit_layer", "tokens", "tokens_kept")}
            assert got["confidence"] == pytest.approx(want["confidence"], abs=1e-5)
        bad = httpx.post(base + "/v1/classify", content=b"{oops", timeout=30)
        assert bad.status_code == 400 and "malformed JSON" in bad.json()["error"]
    finally:
        serve.shutdown()
        ray.shutdown()


# --- the load generator ---------------------------------------------------------------------------------------


def test_load_generator_counts_every_request_once_with_malformed_ones_mixed_in(checkpoint):
    """benchmarks/serve_load.py at a tiny size against a live server: every well-formed request answered once
    with its own id, every malformed one rejected with a 4xx, latencies and rates filled in."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load_script", REPO / "benchmarks" / "serve_load.py")
    load = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = load  # its dataclasses look their module up there
    spec.loader.exec_module(load)
    texts = [EARLY, LATE, "the plot is thin", "a small gem"]
    with live_server(create_app(load_predictor(checkpoint, knobs=EXITS))) as url:
        result = asyncio.run(load.run_rate(url, texts, 200.0, requests=40, duration=10, seed=1, malformed=0.2))
    assert result.sent == 40 and result.malformed_sent > 0
    assert result.malformed_rejected == result.malformed_sent and result.status_counts.get("400") == \
        result.malformed_sent
    assert result.answered == 40 - result.malformed_sent and result.exactly_once
    assert result.errors == result.lost == result.refused == result.duplicates == 0
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms and result.throughput > 0
    assert load.percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and load.percentile([5.0], 99) == 5.0


def test_parse_server_timing_reads_durations_and_skips_the_rest():
    """The Server-Timing reader of the load test: ms per named phase; entries without a number are skipped."""
    assert parse_server_timing("parse;dur=0.25, queue;dur=0.1,model;desc=\"m\";dur=3.5, total") == \
        {"parse": 0.25, "queue": 0.1, "model": 3.5}
    assert parse_server_timing("") == {} and parse_server_timing("x;dur=abc") == {}
