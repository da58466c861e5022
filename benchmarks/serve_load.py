"""Open-loop load on `eat serve` over loopback: Poisson arrivals of SST-2 dev texts at given rates.

Per rate it reports throughput, p50 / p90 / p99 latency, errors, and an exactly-once check (every request carries
an id; each id must come back exactly once, in the answer to that request). ``--search`` finds the highest rate a
server sustains (p99 within ``--slo-ms``, no error, nothing lost, throughput at least 90% of the send rate).
``--overhead`` times single requests one at a time against the model called in-process at batch 1 (server
overhead at low load).

It can start the servers itself (``--static RUN`` and ``--eat RUN --tuned FILE``, one after the other, never at
the same time, with the same ``eat serve`` settings), or load a server already running (``--url``). Loopback only.

    # S1 / S2 / S4 (see docs/serving.md): both servers, rate search, half-rate p50, overhead
    python benchmarks/serve_load.py --static runs/demo/sst2/static --eat runs/demo/sst2/eat \\
        --tuned runs/demo/results/tuned_sst2.json --threads 2 --search --slo-ms 50 --overhead \\
        --out results/serve/sst2_load.json
    # S3: 5% malformed requests mixed in, and SIGTERM to the server 5 s into the run
    python benchmarks/serve_load.py --eat runs/demo/sst2/eat --tuned runs/demo/results/tuned_sst2.json \\
        --rates 100 --malformed 0.05 --sigterm-after 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


@dataclass
class RateResult:
    """One open-loop run. offered_rate: the Poisson rate asked for; achieved_rate: requests sent per second of
    the sending span (a finite Poisson sample differs from its rate); throughput: answered (200) per second of the run
    (first send to last answer); latencies in ms over answered requests; errors: non-200 answers to well-formed
    requests plus transport errors after acceptance; malformed_sent / malformed_rejected: malformed requests sent
    and answered with a 4xx; refused: connection refused (server gone, e.g. after SIGTERM: never accepted);
    lost: accepted requests with no answer; duplicates / mismatched: ids answered twice / with another id."""

    offered_rate: float
    achieved_rate: float
    sent: int
    answered: int
    throughput: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    errors: int
    malformed_sent: int = 0
    malformed_rejected: int = 0
    refused: int = 0
    lost: int = 0
    duplicates: int = 0
    mismatched: int = 0
    seconds: float = 0.0
    status_counts: dict[str, int] = field(default_factory=dict)

    @property
    def exactly_once(self) -> bool:
        """Every accepted request answered exactly once with its own id (malformed ones rejected)."""
        return self.lost == 0 and self.duplicates == 0 and self.mismatched == 0 and \
            self.malformed_rejected == self.malformed_sent

    def sustained(self, slo_ms: float) -> bool:
        """p99 within the SLO, no error, nothing lost, and the server kept up (throughput at least 90% of the
        achieved send rate: the rest is the last answers' tail)."""
        return (self.exactly_once and self.errors == 0 and self.refused == 0 and self.p99_ms <= slo_ms
                and self.throughput >= 0.9 * self.achieved_rate)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


async def run_rate(url: str, texts: list[str], rate: float, *, requests: int, duration: float, seed: int = 0,
                   malformed: float = 0.0, on_start=None, timeout: float = 60.0) -> RateResult:
    """Send up to ``requests`` requests (and for at most ``duration`` seconds) with exponential gaps of mean
    1/``rate`` (open loop: a request is sent at its time whether or not earlier ones were answered).
    ``malformed``: share of requests sent as broken JSON (they must get a 4xx). ``on_start``: called once the
    first request is sent (e.g. to schedule a SIGTERM)."""
    rng = random.Random(seed)
    answers: dict[int, int] = {}
    latencies: list[float] = []
    statuses: dict[str, int] = {}
    counts = {"errors": 0, "refused": 0, "lost": 0, "mismatched": 0, "malformed_sent": 0, "malformed_rejected": 0}
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=200)

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        async def one(request_id: int, bad: bool) -> None:
            text = rng.choice(texts)
            start = time.perf_counter()
            try:
                if bad:
                    response = await client.post("/v1/classify", content=b'{"text": ' + text[:20].encode() + b'"',
                                                 headers={"content-type": "application/json"})
                else:
                    response = await client.post("/v1/classify", json={"text": text, "id": request_id})
            except httpx.ConnectError:
                counts["refused"] += 1  # never accepted
                return
            except httpx.TransportError:
                counts["lost"] += 1  # accepted (or half-sent), then no answer
                return
            elapsed = (time.perf_counter() - start) * 1000.0
            statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1
            if bad:
                counts["malformed_rejected"] += 400 <= response.status_code < 500
                return
            if response.status_code != 200:
                counts["errors"] += 1
                return
            answered_id = response.json().get("id")
            if answered_id != request_id:
                counts["mismatched"] += 1
                return
            answers[request_id] = answers.get(request_id, 0) + 1
            latencies.append(elapsed)

        tasks = []
        begin = time.perf_counter()
        next_time = last_send = begin
        for request_id in range(requests):
            delay = next_time - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if time.perf_counter() - begin > duration:
                break
            bad = rng.random() < malformed
            counts["malformed_sent"] += bad
            tasks.append(asyncio.create_task(one(request_id, bad)))
            last_send = time.perf_counter()
            if request_id == 0 and on_start is not None:
                on_start()
            next_time += rng.expovariate(rate)
        await asyncio.gather(*tasks)
        seconds = time.perf_counter() - begin

    well_formed = len(tasks) - counts["malformed_sent"]
    missing = well_formed - counts["refused"] - counts["errors"] - counts["mismatched"] - len(answers) - \
        counts["lost"]
    span = last_send - begin
    return RateResult(offered_rate=rate, achieved_rate=(len(tasks) - 1) / span if span > 0 else rate,
                      sent=len(tasks), answered=len(latencies),
                      throughput=len(latencies) / seconds if seconds else 0.0,
                      p50_ms=percentile(latencies, 50), p90_ms=percentile(latencies, 90),
                      p99_ms=percentile(latencies, 99), errors=counts["errors"],
                      malformed_sent=counts["malformed_sent"], malformed_rejected=counts["malformed_rejected"],
                      refused=counts["refused"], lost=counts["lost"] + max(0, missing),
                      duplicates=sum(n - 1 for n in answers.values() if n > 1), mismatched=counts["mismatched"],
                      seconds=seconds, status_counts=statuses)


async def search_rate(url: str, texts: list[str], *, slo_ms: float, start: float, requests: int, duration: float,
                      steps: int, log=print) -> tuple[float, list[RateResult]]:
    """The highest sustained rate (see :meth:`RateResult.sustained`): double from ``start`` until a rate fails,
    then bisect ``steps`` times between the last good and the first bad rate. Returns (rate, every run)."""
    runs: list[RateResult] = []
    good, bad = 0.0, None
    rate = start
    while bad is None:
        result = await run_rate(url, texts, rate, requests=requests, duration=duration, seed=len(runs))
        runs.append(result)
        log(row_line(result, slo_ms))
        if result.sustained(slo_ms):
            good, rate = rate, rate * 2
        else:
            bad = rate
        if rate > 1e5:
            break
    for _ in range(steps if bad is not None else 0):
        rate = (good + bad) / 2 if good else bad / 2
        result = await run_rate(url, texts, rate, requests=requests, duration=duration, seed=len(runs))
        runs.append(result)
        log(row_line(result, slo_ms))
        if result.sustained(slo_ms):
            good = rate
        else:
            bad = rate
    return good, runs


def overhead(url: str, predictor, texts: list[str], count: int, idle_ms: float = 5.0) -> dict[str, float]:
    """S4: p50 of single requests sent one at a time (closed loop) over the p50 of the same texts' model call
    in-process at batch 1 (tokenized beforehand, calls back to back: what `eat bench` times). Run while the
    server is otherwise idle; the in-process model runs with the same threads.

    The client is ``http.client`` on one keep-alive connection: a lean client, so that the figure is the server's
    (httpx costs about a millisecond of Python per request on these cores). Also reported: the server's own
    account of each request (its ``Server-Timing`` header: parse, queue, model, total), and the in-process model
    called with ``idle_ms`` of idleness before each call (a server's model thread idles between requests, and a
    cold call is slower than one right after another: that share of the overhead is the machine's, not HTTP's)."""
    import http.client
    from urllib.parse import urlsplit

    import torch

    from eat.serving.protocol import parse_server_timing

    chosen = texts[:count]
    encoded = [predictor.tokenizer(text, truncation=True, max_length=predictor.max_length, return_tensors="pt")
               for text in chosen]
    model = predictor.model

    def in_process(idle_s: float) -> list[float]:
        times = []
        with torch.inference_mode():
            for item in encoded[:5]:
                model(item["input_ids"], None, item.get("token_type_ids"))
            for item in encoded:
                if idle_s:
                    time.sleep(idle_s)
                start = time.perf_counter()
                model(item["input_ids"], None, item.get("token_type_ids"))
                times.append((time.perf_counter() - start) * 1000.0)
        return times

    hot, idle = in_process(0.0), in_process(idle_ms / 1000.0)
    address = urlsplit(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    headers = {"Content-Type": "application/json"}
    served, phases = [], {}
    try:
        for index, text in enumerate(chosen[:5] + chosen):
            body = json.dumps({"text": text})
            start = time.perf_counter()
            connection.request("POST", "/v1/classify", body=body, headers=headers)
            response = connection.getresponse()
            response.read()
            elapsed = (time.perf_counter() - start) * 1000.0
            if response.status != 200:
                raise RuntimeError(f"single request answered {response.status}")
            if index < 5:  # warm-up
                continue
            served.append(elapsed)
            for name, ms in parse_server_timing(response.getheader("server-timing", "")).items():
                phases.setdefault(name, []).append(ms)
    finally:
        connection.close()
    server_p50, model_p50 = statistics.median(served), statistics.median(hot)
    result = {"requests": len(served), "served_p50_ms": server_p50, "in_process_b1_p50_ms": model_p50,
              "ratio": server_p50 / model_p50, "in_process_b1_idle_p50_ms": statistics.median(idle),
              "idle_ms": idle_ms}
    # the server's own account (Server-Timing): what of the client's latency is inside the request handler
    for name, values in phases.items():
        result[f"server_{name}_p50_ms"] = statistics.median(values)
    if "total" in phases:
        result["server_ratio"] = result["server_total_p50_ms"] / model_p50
    return result


def row_line(result: RateResult, slo_ms: float) -> str:
    """One table line for a run."""
    flag = "ok" if result.sustained(slo_ms) else "--"
    return (f"  {result.offered_rate:8.1f}/s sent {result.sent:5d}  {result.throughput:8.1f}/s  p50 "
            f"{result.p50_ms:7.2f}  p90 {result.p90_ms:7.2f}  p99 {result.p99_ms:8.2f} ms  errors {result.errors}  "
            f"refused {result.refused}  lost {result.lost}  dup {result.duplicates}  malformed "
            f"{result.malformed_rejected}/{result.malformed_sent}  {flag}")


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """`eat serve` in a subprocess on 127.0.0.1 (started, waited for /health, stopped with SIGTERM)."""

    def __init__(self, checkpoint: str, tuned: str | None, threads: int | None, extra: list[str], log: Path | None,
                 cpus: str | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "eat.cli", "serve", "--checkpoint", checkpoint, "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning", *extra]
        if tuned:
            command += ["--tuned", tuned]
        if threads:
            command += ["--threads", str(threads)]
        if cpus:  # pin the server (taskset), so that the load generator does not share its cores
            command = ["taskset", "-c", cpus, *command]
        self.log = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed in stop()
        # env: extra variables for the server process only (e.g. OMP_WAIT_POLICY), not for the load generator
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300.0) -> None:
        """Block until /health answers 200 (the model is loaded and warmed up)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"eat serve exited with {self.process.returncode} before it was ready")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"eat serve was not ready after {timeout:.0f} s")

    def terminate(self) -> None:
        """Send SIGTERM (graceful: answer everything accepted, then exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int:
        """SIGTERM, wait for the exit, return its code."""
        self.terminate()
        try:
            code = self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return code


def sst2_texts(rows: int | None, seed: int = 0) -> list[str]:
    """SST-2 dev sentences (EAT_DATA_DIR or the hub), a seeded sample of ``rows`` when given."""
    from eat.data import load_glue

    return list(load_glue("sst2", "validation").subset(rows, seed).frame["text"])


def main() -> None:
    """Parse arguments, load each server in turn, print (and with --out save) the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a server already running (instead of --static / --eat)")
    parser.add_argument("--static", help="run folder of the static model (started with eat serve)")
    parser.add_argument("--eat", help="run folder of the EAT model (started with eat serve)")
    parser.add_argument("--tuned", help="tuned_<task>.json for --eat (eat serve --tuned)")
    parser.add_argument("--threads", type=int, default=2, help="server torch threads (and the in-process model's)")
    parser.add_argument("--server-cpus", help="pin each server to these cores (taskset -c, e.g. 0,1); the load "
                                                  "generator should then run on others (taskset -c 2,3 python ...)")
    parser.add_argument("--precision", default="fp32", help="eat serve --precision for every server (and the "
                        "in-process model of --overhead)")
    parser.add_argument("--backend", default="torch", help="eat serve --backend for every server (and the "
                        "in-process model of --overhead)")
    parser.add_argument("--serve-args", default="", help="extra eat serve options, the same for every server")
    parser.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                        help="an environment variable for the servers only (repeatable), e.g. "
                             "OMP_WAIT_POLICY=ACTIVE (OpenMP workers spin between requests instead of sleeping)")
    parser.add_argument("--rates", default="", help="comma list of request rates per second to run")
    parser.add_argument("--search", action="store_true", help="find the highest rate with p99 <= --slo-ms")
    parser.add_argument("--slo-ms", type=float, default=50.0)
    parser.add_argument("--start-rate", type=float, default=20.0, help="first rate of the search")
    parser.add_argument("--search-steps", type=int, default=4, help="bisection steps after the doubling")
    parser.add_argument("--requests", type=int, default=600, help="requests per rate at most")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per rate at most")
    parser.add_argument("--rows", type=int, help="SST-2 dev sentences to draw from (default: all 872)")
    parser.add_argument("--malformed", type=float, default=0.0, help="share of malformed requests mixed in")
    parser.add_argument("--sigterm-after", type=float, help="SIGTERM the (self-started) server this many seconds "
                                                            "into the first --rates run")
    parser.add_argument("--overhead", type=int, nargs="?", const=200, default=0,
                        help="S4: N single requests one at a time vs the model in-process at batch 1")
    parser.add_argument("--server-log", type=Path, help="folder for the servers' logs")
    parser.add_argument("--out", type=Path, help="write the results as JSON here (and the table beside it)")
    args = parser.parse_args()
    serve_args = ["--precision", args.precision, "--backend", args.backend, *args.serve_args.split()]
    if any("=" not in item for item in args.server_env):
        parser.error("--server-env takes KEY=VALUE")
    server_env = dict(item.split("=", 1) for item in args.server_env)

    servers = []
    if args.url:
        if not args.url.startswith(("http://127.0.0.1", "http://localhost")):
            parser.error("--url: loopback only (http://127.0.0.1:PORT)")
        servers.append(("url", None, None))
    if args.static:
        servers.append(("static", args.static, None))
    if args.eat:
        servers.append(("eat", args.eat, args.tuned))
    if not servers:
        parser.error("give --url, or --static and/or --eat")
    rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if not rates and not args.search and not args.overhead:
        parser.error("give --rates, --search and/or --overhead")
    if args.sigterm_after is not None and (args.url or not rates):
        parser.error("--sigterm-after needs a self-started server and --rates")
    texts = sst2_texts(args.rows)
    import torch

    from eat.timing import environment

    torch.set_num_threads(args.threads)
    report: dict = {"environment": environment(), "args": vars(args) | {"out": str(args.out),
                                                                        "server_log": str(args.server_log)},
                    "servers": {}}
    lines = [f"serve_load: {len(texts)} SST-2 dev texts, threads {args.threads}, SLO p99 <= {args.slo_ms} ms, "
             f"cpu {report['environment']['cpu']} (loopback; the load generator shares the machine)"]
    print(lines[0], flush=True)

    def log(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    for name, checkpoint, tuned in servers:
        entry: dict = {"checkpoint": checkpoint, "tuned": tuned}
        server = None
        if checkpoint is not None:
            server_log = args.server_log / f"{name}.log" if args.server_log else None
            if server_log:
                server_log.parent.mkdir(parents=True, exist_ok=True)
            server = Server(checkpoint, tuned, args.threads, serve_args, server_log, args.server_cpus, server_env)
            server.wait_ready()
            url = server.url
        else:
            url = args.url
        log(f"{name}: {url}")
        try:
            for index, rate in enumerate(rates):
                on_start = None
                if index == 0 and args.sigterm_after is not None:  # scheduled on run_rate's loop at its first send
                    on_start = lambda: asyncio.get_running_loop().call_later(  # noqa: E731
                        args.sigterm_after, server.terminate)
                result = asyncio.run(run_rate(url, texts, rate, requests=args.requests, duration=args.duration,
                                              seed=index, malformed=args.malformed, on_start=on_start))
                log(row_line(result, args.slo_ms))
                entry.setdefault("rates", []).append(asdict(result) | {"exactly_once": result.exactly_once})
                if args.sigterm_after is not None and index == 0:
                    code = server.process.wait(60)
                    log(f"  SIGTERM after {args.sigterm_after} s: server exited with {code}; "
                        f"{result.answered} answered, {result.refused} refused after shutdown, {result.lost} lost")
                    entry["sigterm_exit_code"] = code
                    break
            if args.search and (server is None or server.process.poll() is None):
                best, runs = asyncio.run(search_rate(url, texts, slo_ms=args.slo_ms, start=args.start_rate,
                                                     requests=args.requests, duration=args.duration,
                                                     steps=args.search_steps, log=log))
                entry["sustained_rate"] = best
                entry["search"] = [asdict(r) | {"exactly_once": r.exactly_once} for r in runs]
                log(f"  {name}: highest sustained rate {best:.1f}/s (p99 <= {args.slo_ms} ms)")
            if args.overhead and checkpoint is not None and server.process.poll() is None:
                from eat.serving.model import load_predictor

                knobs_source = {"tuned": tuned} if tuned else {}
                predictor = load_predictor(checkpoint, threads=args.threads, precision=args.precision,
                                           backend=args.backend, **knobs_source)
                entry["overhead"] = overhead(url, predictor, texts, args.overhead)
                o = entry["overhead"]
                log(f"  {name}: single request p50 {o['served_p50_ms']:.2f} ms vs in-process batch 1 "
                    f"{o['in_process_b1_p50_ms']:.2f} ms: {o['ratio']:.2f}x")
                if "server_total_p50_ms" in o:
                    log(f"  {name}: inside the server (Server-Timing p50) {o['server_total_p50_ms']:.2f} ms = "
                        f"parse {o.get('server_parse_p50_ms', 0):.2f} + queue {o.get('server_queue_p50_ms', 0):.2f}"
                        f" + model {o.get('server_model_p50_ms', 0):.2f} + rest; vs in-process "
                        f"{o['server_ratio']:.2f}x")
                log(f"  {name}: in-process batch 1 after {o['idle_ms']:.0f} ms idle (a server's cold call) "
                    f"{o['in_process_b1_idle_p50_ms']:.2f} ms")
        finally:
            if server is not None:
                entry["exit_code"] = server.stop()
        report["servers"][name] = entry

    static, eat = report["servers"].get("static", {}), report["servers"].get("eat", {})
    if static.get("sustained_rate") and eat.get("sustained_rate") is not None:
        half = static["sustained_rate"] / 2
        log(f"S1 EAT / static sustained rate: {eat['sustained_rate']:.1f} / {static['sustained_rate']:.1f} = "
            f"{eat['sustained_rate'] / static['sustained_rate']:.2f}x")
        report["s1_ratio"] = eat["sustained_rate"] / static["sustained_rate"]
        p50 = {}
        for name, checkpoint, tuned in servers:  # S2: both at half of static's sustainable rate, one at a time
            if name not in ("static", "eat"):
                continue
            server = Server(checkpoint, tuned, args.threads, serve_args, None, args.server_cpus, server_env)
            try:
                server.wait_ready()
                result = asyncio.run(run_rate(server.url, texts, half, requests=args.requests,
                                              duration=args.duration, seed=99))
            finally:
                server.stop()
            p50[name] = result.p50_ms
            log(f"  {name} at {half:.1f}/s:" + row_line(result, args.slo_ms)[1:])
            report["servers"][name]["half_static_rate"] = asdict(result)
        report["s2_ratio"] = p50["eat"] / p50["static"]
        log(f"S2 p50 at half of static's rate ({half:.1f}/s): EAT / static = {report['s2_ratio']:.2f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))
        args.out.with_suffix(".txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
