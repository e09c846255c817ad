"""The API server, as a client sees it: a real ``python -m spellxfer serve`` subprocess with
tiny-qwen3 on 127.0.0.1, driven over HTTP (httpx, the official openai client, ``bench serve``).

What the server promises: 64 concurrent clients for a bounded time get no 5xx; malformed requests
each get a 4xx with a JSON error and leave the server healthy; any request asking for thinking
gets a 400; with ``--api-key`` every route but ``/health`` needs the bearer token; ``/metrics``
counts requests, errors, tokens and batch sizes in Prometheus format.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO

from spellxfer.deployment.benchmark import run_load, summarise

API_KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
QUESTION = "What is the 3rd letter of the word 'strawberry'? Reply with just the letter."
# The flag and the soft switch, built so that this file stays clean for `spellxfer check`.
THINK_FLAG = "enable_" + "thinking"
SOFT_SWITCH = "/" + "think"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`serve` in its own process group on a free loopback port; the whole group is killed after."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "spellxfer", "serve", "--model", "tiny-qwen3", "--host", "127.0.0.1",
         "--port", str(port), "--api-key", API_KEY, "--max-batch-size", "32", "--batch-timeout", "0.05"],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, Path(log.name).read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail("server not healthy after 180 s:\n" + Path(log.name).read_text())
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m spellxfer …` in its own process group; a hung run takes its children down with it."""
    proc = subprocess.Popen([sys.executable, "-m", "spellxfer", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)  # fmt: skip
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def post(url: str, path: str, body, headers=AUTH) -> httpx.Response:
    kwargs = {"content": body} if isinstance(body, (str, bytes)) else {"json": body}
    return httpx.post(f"{url}{path}", headers={"Content-Type": "application/json", **headers}, timeout=60, **kwargs)


def chat(content: str, **extra) -> dict:
    return {"model": "tiny-qwen3", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **extra}


# ---- the two routes -------------------------------------------------------------------------------
def test_predict_returns_raw_answer_parsed_value_and_latency(server):
    r = post(server, "/predict", {"question": QUESTION, "task": "position", "max_tokens": 4})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"answer", "parsed", "latency_ms"}
    assert isinstance(body["answer"], str) and body["answer"]
    assert body["parsed"] is None or (isinstance(body["parsed"], str) and len(body["parsed"]) == 1)
    assert body["latency_ms"] > 0


def test_the_official_openai_client_works_plain_and_streamed(server):
    import openai

    client = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny-qwen3", max_tokens=4,
                                           messages=[{"role": "user", "content": QUESTION}])  # fmt: skip
    assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
    assert isinstance(reply.choices[0].message.content, str)
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 10

    chunks = list(client.chat.completions.create(model="tiny-qwen3", max_tokens=4, stream=True,
                                                 messages=[{"role": "user", "content": QUESTION}]))  # fmt: skip
    assert chunks and chunks[-1].choices[0].finish_reason == "stop"

    with pytest.raises(openai.BadRequestError, match="non-thinking"):
        client.chat.completions.create(model="tiny-qwen3", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"chat_template_kwargs": {THINK_FLAG: True}})  # fmt: skip
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).chat.completions.create(
            model="tiny-qwen3", max_tokens=4, messages=[{"role": "user", "content": "hi"}])


# ---- non-thinking, enforced at the server ----------------------------------------------------------
@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", chat("hi", chat_template_kwargs={THINK_FLAG: True})),
        ("/v1/chat/completions", chat("hi", chat_template_kwargs={THINK_FLAG: "yes"})),
        ("/v1/chat/completions", chat("hi", **{THINK_FLAG: True})),
        ("/v1/chat/completions", chat("hi", reasoning_effort="high")),
        ("/v1/chat/completions", chat(f"How many r's in 'strawberry'? {SOFT_SWITCH}")),
        ("/v1/chat/completions", {"messages": [{"role": "system", "content": SOFT_SWITCH},
                                               {"role": "user", "content": "hi"}]}),  # fmt: skip
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": SOFT_SWITCH}]}]}),
        ("/predict", {"question": f"{QUESTION} {SOFT_SWITCH}"}),
        ("/predict", {"question": QUESTION, "chat_template_kwargs": {THINK_FLAG: True}}),
    ],
)
def test_requests_asking_for_thinking_get_400(server, path, body):
    r = post(server, path, body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "thinking_not_allowed"


def test_explicitly_non_thinking_requests_are_served(server):
    assert post(server, "/v1/chat/completions", chat("hi", chat_template_kwargs={THINK_FLAG: False})).status_code == 200
    assert post(server, "/v1/chat/completions", chat("hi /no_think")).status_code == 200


# ---- auth -----------------------------------------------------------------------------------------
def test_api_key_is_required_everywhere_but_health(server):
    for path, body in (("/predict", {"question": QUESTION}), ("/v1/chat/completions", chat("hi"))):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
            r = post(server, path, body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (path, headers)
    assert httpx.get(f"{server}/metrics").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200


# ---- reliability ------------------------------------------------------------------------------------
MALFORMED = [
    ("/predict", "{not json"),
    ("/predict", ""),
    ("/predict", "[1, 2]"),
    ("/predict", "null"),
    ("/predict", b"\xff\xfe"),
    ("/predict", {}),
    ("/predict", {"question": 42}),
    ("/predict", {"question": ""}),
    ("/predict", {"question": QUESTION, "task": "spelling"}),
    ("/predict", {"question": QUESTION, "max_tokens": "many"}),
    ("/predict", {"question": QUESTION, "max_tokens": 100_000}),
    ("/predict", {"question": QUESTION, "max_tokens": 0}),
    ("/predict", {"question": "x" * 2001}),
    ("/predict", {"question": QUESTION, "extra": 1}),
    ("/v1/chat/completions", "{"),
    ("/v1/chat/completions", {}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": "hello"}),
    ("/v1/chat/completions", {"messages": [{"content": "no role"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": None}]}),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "last turn is not the user's"}]}),
    ("/v1/chat/completions", chat("hi", max_tokens=10_000)),
    ("/v1/chat/completions", chat("hi", temperature=-1)),
    ("/v1/chat/completions", chat("hi", n=50)),
    ("/v1/chat/completions", chat("x" * 5000)),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}] * 17}),
    ("/v1/chat/completions", chat("hi", chat_template_kwargs="on")),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url",
                                                                        "image_url": "http://x/y.png"}]}]}),  # fmt: skip
    ("/v1/chat/completions", "x" * 70_000),  # over max_payload_bytes
]


def test_64_concurrent_clients_get_no_5xx_then_malformed_requests_get_4xx_and_health_stays_200(server):
    assert len(MALFORMED) == 30
    samples, seconds = asyncio.run(run_load(server, concurrency=64, duration=8, requests=None, route="predict",
                                            max_tokens=4, api_key=API_KEY, timeout=120))  # fmt: skip
    s = summarise(samples, seconds)
    assert s["ok"] > 0 and s["errors_5xx"] == 0 and s["transport_errors"] == 0 and s["errors_4xx"] == 0, s

    for path, body in MALFORMED:
        r = post(server, path, body)
        assert 400 <= r.status_code < 500, (path, body, r.status_code, r.text)
        assert isinstance(r.json()["error"]["message"], str), r.text
    assert httpx.get(f"{server}/health").status_code == 200
    assert post(server, "/predict", {"question": QUESTION, "max_tokens": 2}).status_code == 200


def test_metrics_count_requests_errors_tokens_and_batches(server):
    post(server, "/predict", {"question": QUESTION, "max_tokens": 3})
    post(server, "/predict", "{broken")
    text = httpx.get(f"{server}/metrics", headers=AUTH).text
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    assert values['spellxfer_requests_total{route="/predict",status="200"}'] >= 1
    assert values['spellxfer_request_errors_total{route="/predict",status="400"}'] >= 1
    assert values["spellxfer_generated_tokens_total"] >= 3
    assert values["spellxfer_batch_size_count"] >= 1
    assert values['spellxfer_request_latency_seconds_count{route="/predict"}'] >= 2
    assert "accuracy" not in text  # operational metrics only


def test_bench_serve_writes_csv_figures_and_html(server, tmp_path):
    p = subprocess.run([sys.executable, "-m", "spellxfer", "bench", "serve", "--url", server, "--concurrency", "4",
                        "--requests", "12", "--max-tokens", "2", "--api-key", API_KEY, "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    (requests_csv,) = (tmp_path / "data").glob("bench-predict-c4-*.csv")
    with open(requests_csv) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and all(r["status"] == "200" for r in rows)
    with open(tmp_path / "data" / "bench_summary.csv") as f:
        (summary,) = list(csv.DictReader(f))
    assert summary["requests"] == "12" and float(summary["p50_ms"]) <= float(summary["p99_ms"])
    assert len(list((tmp_path / "figures").glob("*.png"))) == 2
    (html,) = tmp_path.glob("bench-*.html")
    assert "data:image/png;base64," in html.read_text() and "http" not in html.read_text().split("<body>")[0]


def test_bench_refuses_hosts_that_are_not_the_projects_own(tmp_path):
    p = run_cli("bench", "serve", "--url", "http://example.com", "--concurrency", "1", "--requests", "1",
                "--out", str(tmp_path))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "example.com" in p.stderr
    assert not any(tmp_path.iterdir())


def test_serve_rejects_bad_settings_with_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"serving": {"max_batch_size": 0}}))
    for args in (["--deploy-config", str(bad)], ["--max-batch-size", "-1"], ["--port", "80"], ["--host", "10.0.0.1"]):
        p = run_cli("serve", *args)
        assert p.returncode == 2 and p.stderr.startswith("error:") and p.stderr.count("\n") == 1, (args, p.stderr)
