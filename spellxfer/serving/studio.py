"""``python -m spellxfer studio submit|status``: fit, sweep and serve as Lightning Studio jobs.

"One Studio, one task": you keep one Studio as the environment (this repository checked out, the
venv installed, the data built) and every task runs as its own *job* — a fresh machine of the
type that task needs, started from a snapshot of that Studio, stopped when the command ends. A
fit on an H100 never shares a machine with a sweep or with the CPU box you edit on, and each job
has its own logs, artifacts and bill. ``serve --deploy`` creates an autoscaled Lightning
*Deployment* instead (replicas behind a load balancer, health-checked on ``/health``).

The job specification comes from ``configs/deployment/lightning_config.yaml`` (``jobs:`` and
``deployment:``), then the environment (``LIGHTNING_TEAMSPACE``, ``LIGHTNING_STUDIO``), then flags.
``--dry-run`` prints exactly the arguments ``lightning_sdk.Job.run`` (or ``Deployment.start``)
would receive and touches no network. Submitting needs Lightning credentials
(``LIGHTNING_USER_ID`` + ``LIGHTNING_API_KEY``, or ``lightning login``).

A serve job binds 127.0.0.1 unless an API key is set: the job's command gets ``--host 0.0.0.0``
only when ``$SPELLXFER_API_KEY`` (``deployment.api_key_env``, a teamspace secret, which Lightning
serves as an environment variable) is set where you submit, and a command that asks for another
host without one is refused before anything is submitted. A Deployment always carries that secret,
so it listens on 0.0.0.0; ``serve`` itself refuses to start there without a key, so a job that
lacks the secret fails instead of serving openly. The key's value never enters a specification.
"""

from __future__ import annotations

import json
import os
import shlex
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from spellxfer.core.errors import SpellxferError
from spellxfer.serving.scaling import DEFAULT_CONFIG, LightningConfig, check_machine, load_config

Task = Literal["fit", "sweep", "serve"]


def build_job_spec(task: Task, cfg: LightningConfig, name: str | None = None, machine: str | None = None,
                   teamspace: str | None = None, studio: str | None = None, command: str | None = None,
                   env: dict[str, str] | None = None) -> dict:
    """The keyword arguments for ``lightning_sdk.Job.run`` (plain values, JSON-printable)."""
    jobs = cfg.jobs
    env = env if env is not None else os.environ
    if machine is not None:
        try:
            machine = check_machine(machine)
        except ValueError as e:
            raise SpellxferError(f"--machine: {e}") from None
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    where = "--command" if command else f"jobs.commands.{task}"
    command = command or jobs.commands[task]
    if task == "serve":
        command = serve_command(command, has_key=bool(env.get(cfg.deployment.api_key_env)), where=where)
    return {
        "name": name or f"spellxfer-{task}-{stamp}",
        "machine": machine or jobs.machines[task],
        "command": command,
        "studio": studio or jobs.studio or env.get("LIGHTNING_STUDIO"),
        "teamspace": teamspace or jobs.teamspace or env.get("LIGHTNING_TEAMSPACE"),
        "env": dict(jobs.env),
        "interruptible": jobs.interruptible,
        "max_runtime": jobs.max_runtime,
    }


def build_deployment_spec(cfg: LightningConfig, command: str | None = None,
                          env: dict[str, str] | None = None) -> dict:
    """The arguments for ``lightning_sdk.Deployment(name, teamspace).start(...)``, as plain values."""
    env = env if env is not None else os.environ
    where = "--command" if command else "jobs.commands.serve"
    # The replica gets the key as Secret(api_key_env) below, so it may (and must) listen on 0.0.0.0.
    serve = serve_command(command or cfg.jobs.commands["serve"], has_key=True, where=where)
    spec = cfg.deployment_options(serve)
    spec["studio"] = cfg.jobs.studio or env.get("LIGHTNING_STUDIO")
    spec["teamspace"] = cfg.jobs.teamspace or env.get("LIGHTNING_TEAMSPACE")
    spec["env"] = dict(cfg.jobs.env)
    # The bearer token stays a Lightning secret: only its name travels in the specification.
    spec["secrets"] = [cfg.deployment.api_key_env]
    return spec


def serve_command(command: str, has_key: bool, where: str = "jobs.commands.serve") -> str:
    """The serve job's command with its bind address made explicit: ``--host 0.0.0.0`` when an API
    key is set, else ``--host 127.0.0.1``. A command that names another host without a key, or that
    carries the key itself (it would show in the job's settings and in ``ps``), is refused."""
    host = None
    args = shlex.split(command)
    for i, arg in enumerate(args):
        flag, eq, value = arg.partition("=")
        flag = flag.replace("_", "-")  # the CLI takes --api-key and --api_key alike
        if flag == "--api-key":
            raise SpellxferError(f"{where}: do not put the API key in the command; keep it in the "
                                 "SPELLXFER_API_KEY teamspace secret (or pass --api-key-file)")
        if flag == "--api-key-file":
            has_key = True
        if flag == "--host":
            host = value if eq else (args[i + 1] if i + 1 < len(args) else "")
    if host is None:
        return f"{command} --host {'0.0.0.0' if has_key else '127.0.0.1'}"
    if host not in ("127.0.0.1", "localhost", "::1") and not has_key:
        raise SpellxferError(f"{where}: --host {host} without an API key would serve anyone who can reach "
                             "the machine; set the SPELLXFER_API_KEY secret, or drop --host (127.0.0.1)")
    return command


def has_credentials(env: dict[str, str] | None = None) -> bool:
    """Whether lightning_sdk can authenticate (environment keys or a `lightning login` file)."""
    env = env if env is not None else os.environ
    if env.get("LIGHTNING_API_KEY") and env.get("LIGHTNING_USER_ID") or env.get("LIGHTNING_AUTH_TOKEN"):
        return True
    creds = env.get("LIGHTNING_CREDENTIAL_PATH") or str(Path.home() / ".lightning" / "credentials.json")
    return Path(creds).is_file()


def _require_credentials() -> None:
    if not has_credentials():
        raise SpellxferError("no Lightning credentials: set LIGHTNING_USER_ID and LIGHTNING_API_KEY "
                             "(lightning.ai → Settings → Keys) or run `lightning login`")


def studio_submit(
    task: Task,
    deploy_config: str = str(DEFAULT_CONFIG),
    name: str | None = None,
    machine: str | None = None,
    teamspace: str | None = None,
    studio: str | None = None,
    command: str | None = None,
    deploy: bool = False,
    dry_run: bool = False,
) -> int:
    """Submit fit, sweep or serve as a Lightning Studio job (one task per job, from one Studio).

    Args:
        task: fit, sweep or serve.
        deploy_config: Deployment config (configs/deployment/lightning_config.yaml) with the jobs
            (and deployment) blocks.
        name: Job name (default spellxfer-<task>-<UTC time>); unique within the teamspace.
        machine: Machine type (lightning_sdk name: L4, A10G, A100, H100, CPU …); default from the config.
        teamspace: Teamspace (owner/name or name); default from the config, then $LIGHTNING_TEAMSPACE.
        studio: Studio whose environment the job starts from; default from the config, then $LIGHTNING_STUDIO.
        command: Shell command the job runs (default from the config's jobs.commands).
        deploy: serve only: create an autoscaled Deployment (deployment block) instead of a job.
        dry_run: Print the exact specification and submit nothing.
    """
    cfg = load_config(deploy_config)
    if deploy and task != "serve":
        raise SpellxferError("--deploy: only the serve task can become a Deployment")
    if deploy:
        spec = build_deployment_spec(cfg, command)
    else:
        spec = build_job_spec(task, cfg, name, machine, teamspace, studio, command)
    if dry_run:
        print(json.dumps({"api": "Deployment.start" if deploy else "Job.run", **spec}, indent=2))
        return 0
    _require_credentials()
    if deploy:
        _start_deployment(spec)
    else:
        from lightning_sdk import Job  # optional extra, ~1 s to import: only a real submit pays

        job = Job.run(**spec)
        print(f"submitted {job.name}: {job.link}")
    return 0


def deployment_start_kwargs(spec: dict) -> dict:
    """``Deployment.start`` keyword arguments: the plain specification as lightning_sdk objects."""
    # optional extra (spellxfer[studio]); specs and dry runs are built without it
    from lightning_sdk import Machine
    from lightning_sdk.deployment import AutoScaleConfig, Env, HttpHealthCheck, Secret

    a, h = spec["autoscale"], spec["health_check"]
    return {
        "studio": spec["studio"],
        "machine": getattr(Machine, spec["machine"]),
        "command": spec["command"],
        "ports": spec["ports"],
        "spot": spec["spot"],
        "env": [Env(k, v) for k, v in spec["env"].items()] + [Secret(name) for name in spec["secrets"]],
        "autoscale": AutoScaleConfig(**a),
        "health_check": HttpHealthCheck(path=h["path"], port=h["port"]),
    }


def _start_deployment(spec: dict) -> None:
    from lightning_sdk import Deployment  # optional extra: only a real deployment pays

    Deployment(name=spec["name"], teamspace=spec["teamspace"]).start(**deployment_start_kwargs(spec))
    print(f"deployment {spec['name']} starting")


def studio_status(name: str, teamspace: str | None = None, deploy_config: str = str(DEFAULT_CONFIG)) -> int:
    """Show a submitted job's status (Pending, Running, Completed, Failed …) and its link.

    Args:
        name: Job name, as printed by `studio submit`.
        teamspace: Teamspace; default from the config, then $LIGHTNING_TEAMSPACE.
        deploy_config: Deployment config (configs/deployment/lightning_config.yaml) (for the
            default teamspace).
    """
    teamspace = (teamspace or load_config(deploy_config).jobs.teamspace
                 or os.environ.get("LIGHTNING_TEAMSPACE"))
    _require_credentials()
    from lightning_sdk import Job  # optional extra, ~1 s to import

    try:
        job = Job(name, teamspace=teamspace)
    except ValueError as e:
        raise SpellxferError(f"studio status: {e}") from None
    print(f"{job.name}: {job.status} ({job.machine}) {job.link}")
    return 0
