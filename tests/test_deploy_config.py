"""configs/deployment/lightning_config.yaml, its mapping onto LitServe and lightning-sdk, and the
Studio job specifications (built and checked against the real SDK signatures, no network)."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys

import pytest
import yaml
from conftest import REPO

from spellxfer.core.errors import SpellxferError
from spellxfer.serving.protocol import answer_kind
from spellxfer.serving.scaling import DEFAULT_CONFIG, load_config
from spellxfer.serving.studio import (
    build_deployment_spec,
    build_job_spec,
    deployment_start_kwargs,
    serve_command,
)


def write_config(tmp_path, **blocks):
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    for block, values in blocks.items():
        data[block] = {**data[block], **values}
    path = tmp_path / "lightning_config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_maps_onto_litserve(tmp_path):
    from spellxfer.serving.api import build_server

    cfg = load_config()
    server = build_server(cfg.serving)  # a real LitServer; nothing starts until run()
    api = server.lit_api
    assert (api.max_batch_size, api.batch_timeout) == (cfg.serving.max_batch_size, cfg.serving.batch_timeout)
    assert server.workers_per_device == cfg.serving.workers_per_device
    assert server.timeout == cfg.serving.timeout
    assert server.max_payload_size == cfg.serving.limits.max_payload_bytes
    routes = {r.path for r in server.app.routes}
    assert {"/v1/chat/completions", "/predict", "/health", "/metrics"} <= routes


def test_the_shipped_config_writes_no_default_twice():
    # the file names a deployment's choices; every value it resolves to is the model's default, so
    # a default lives in scaling.py only (and loading the file gives what it gave when it repeated them all)
    from spellxfer.serving.scaling import LightningConfig

    cfg = load_config()
    assert cfg == LightningConfig()
    assert (cfg.serving.model, cfg.deployment.machine, cfg.serving.limits.max_tokens) == (
        "tiny-qwen3",
        "L4",
        256,
    )
    assert (
        cfg.jobs.commands["sweep"]
        == "python -m spellxfer sweep --space configs/sweeps/demo.yaml --study demo"
    )


@pytest.mark.parametrize(
    "blocks, key",
    [
        ({"serving": {"max_batch_size": 0}}, "serving.max_batch_size"),
        ({"serving": {"batch_timeout": 90}}, "serving"),
        ({"serving": {"workers_per_devic": 2}}, "serving.workers_per_devic"),
        ({"serving": {"limits": {"max_tokens": "lots"}}}, "serving.limits.max_tokens"),
        ({"deployment": {"machine": "TPU_X_9000"}}, "deployment.machine"),
        ({"deployment": {"autoscale": {"min_replicas": 3, "max_replicas": 1}}}, "deployment.autoscale"),
        ({"deployment": {"autoscale": {"metric": "vibes"}}}, "deployment.autoscale.metric"),
        ({"deployment": {"name": "Not Valid!"}}, "deployment.name"),
        ({"jobs": {"machines": {"fit": "nope"}}}, "jobs.machines"),
    ],
)
def test_invalid_values_fail_with_one_line_naming_file_and_key(tmp_path, blocks, key):
    path = write_config(tmp_path, **blocks)
    with pytest.raises(SpellxferError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(f"{path}: {key}") and "\n" not in msg, msg


def test_job_specs_fit_the_real_lightning_sdk_signatures():
    from lightning_sdk import Deployment, Job

    cfg = load_config()
    env = {"LIGHTNING_TEAMSPACE": "me/spellxfer", "LIGHTNING_STUDIO": "spellxfer-dev"}
    for task in ("fit", "sweep", "serve"):
        spec = build_job_spec(task, cfg, env=env)
        inspect.signature(Job.run).bind(**spec)  # raises TypeError on any unknown or missing argument
        assert spec["teamspace"] == "me/spellxfer" and spec["studio"] == "spellxfer-dev"
        assert spec["name"].startswith(f"spellxfer-{task}-") and spec["command"].startswith(
            "python -m spellxfer"
        )
    fit = build_job_spec(
        "fit", cfg, machine="h100", teamspace="team/x", command="python -m spellxfer fit -c a.yaml", env=env
    )
    assert (fit["machine"], fit["teamspace"], fit["command"]) == (
        "H100",
        "team/x",
        "python -m spellxfer fit -c a.yaml",
    )

    dep = build_deployment_spec(cfg, env=env)
    kwargs = deployment_start_kwargs(dep)
    inspect.signature(Deployment.start).bind(None, **kwargs)
    assert kwargs["autoscale"].min_replicas == 0 and kwargs["health_check"].path == "/health"
    assert dep["secrets"] == ["SPELLXFER_API_KEY"]


def test_a_serve_job_binds_loopback_unless_an_api_key_is_set():
    cfg = load_config()
    assert build_job_spec("serve", cfg, env={})["command"].endswith("--host 127.0.0.1")
    assert build_job_spec("serve", cfg, env={"SPELLXFER_API_KEY": "k"})["command"].endswith("--host 0.0.0.0")
    assert "k" not in json.dumps(build_job_spec("serve", cfg, env={"SPELLXFER_API_KEY": "k"})["env"])
    # A Deployment carries the key as a secret, so its replicas listen on every interface.
    assert build_deployment_spec(cfg, env={})["command"].endswith("--host 0.0.0.0")
    # Other tasks are left alone.
    assert "--host" not in build_job_spec("fit", cfg, env={})["command"]


@pytest.mark.parametrize(
    "command, has_key, error",
    [
        ("python -m spellxfer serve --host 0.0.0.0", False, "--host 0.0.0.0 without an API key"),
        ("python -m spellxfer serve --host=::", False, "--host :: without an API key"),
        ("python -m spellxfer serve --api-key s3cret", True, "do not put the API key in the command"),
        ("python -m spellxfer serve --api_key=s3cret", True, "do not put the API key in the command"),
    ],
)
def test_serve_commands_that_would_expose_the_model_or_the_key_are_refused(command, has_key, error):
    with pytest.raises(SpellxferError, match=error):
        serve_command(command, has_key=has_key, where="--command")
    with pytest.raises(SpellxferError, match="^--command: "):
        build_job_spec(
            "serve", load_config(), command=command, env={"SPELLXFER_API_KEY": "k"} if has_key else {}
        )


def test_serve_commands_that_are_safe_pass_unchanged():
    assert serve_command("python -m spellxfer serve --host 127.0.0.1", has_key=False) == (
        "python -m spellxfer serve --host 127.0.0.1")
    assert serve_command("python -m spellxfer serve --host 0.0.0.0", has_key=True).endswith("--host 0.0.0.0")
    keyfile = "python -m spellxfer serve --api-key-file /teamspace/key"  # a key file counts as a key
    assert serve_command(keyfile, has_key=False) == keyfile + " --host 0.0.0.0"


def cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "spellxfer", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_dry_run_prints_the_spec_and_submitting_without_credentials_is_one_error_line(tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTNING_")}
    clean.update(HOME=str(tmp_path), LIGHTNING_TEAMSPACE="me/spellxfer")
    p = cli("studio", "submit", "--task", "sweep", "--machine", "A100", "--dry-run", env=clean)
    assert p.returncode == 0, p.stderr
    spec = json.loads(p.stdout)
    assert spec["api"] == "Job.run" and spec["machine"] == "A100" and spec["teamspace"] == "me/spellxfer"

    p = cli("studio", "submit", "--task", "fit", env=clean)
    assert (
        p.returncode == 2
        and p.stderr.startswith("error: no Lightning credentials")
        and p.stderr.count("\n") == 1
    )


def test_predict_answer_kind_follows_the_evaluation_templates():
    import random

    from spellxfer.tasks import templates as t

    rng = random.Random(0)
    for _ in range(20):
        assert answer_kind(t.nth_letter_question(rng, "banana", 3)[0], None, None) == "letter"
        assert answer_kind(t.letter_index_question(rng, "banana", "n")[0], None, None) == "integer"
        assert answer_kind(t.word_length_question(rng, "banana")[0], None, None) == "integer"
        assert answer_kind(t.letter_count_question(rng, "banana", "a")[0], None, None) == "integer"
    assert answer_kind("What is the 3rd letter of 'cat'?", "count", None) == "integer"
    assert answer_kind("How many a's?", None, "letter") == "letter"
