"""Serving, autoscaling and job settings (``configs/deployment/lightning_config.yaml``), validated
in one place and mapped onto the options of the libraries that act on them.

=====================  ==================================================================
YAML block             becomes
=====================  ==================================================================
``serving``            ``LitAPI(max_batch_size, batch_timeout)``, ``LitServer(accelerator,
                       devices, workers_per_device, timeout, max_payload_size)``,
                       ``LitServer.run(num_api_servers)`` and the API's request limits
``deployment``         ``lightning_sdk.Deployment.start(machine, autoscale=AutoScaleConfig(…),
                       ports, health_check=HttpHealthCheck(…), spot, command, env)``
``jobs``               ``lightning_sdk.Job.run(machine, studio, teamspace, env, interruptible,
                       max_runtime)`` per task (fit, sweep, serve)
``benchmark``          which hosts ``bench serve`` may load besides loopback
=====================  ==================================================================

A wrong value fails before anything starts, with one line naming the file and the key
(:func:`spellxfer.core.configs.load_file`, which reads the sweep space files too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from spellxfer.core.configs import load_file, shipped
from spellxfer.serving.protocol import Limits

DEFAULT_CONFIG = shipped("deployment/lightning_config.yaml")


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServingSettings(_Block):
    model: str = "tiny-qwen3"
    adapter: str | None = None
    accelerator: Literal["auto", "cpu", "cuda"] = "auto"
    devices: int | Literal["auto"] = "auto"
    workers_per_device: int = Field(1, ge=1, le=16)
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_timeout: float = Field(0.05, ge=0, le=10)  # seconds the first request waits for company
    timeout: float = Field(60, gt=0)  # seconds a request may wait for a worker before a 504
    num_api_servers: int = Field(1, ge=1, le=16)
    limits: Limits = Limits()

    @model_validator(mode="after")
    def _batch_timeout_below_timeout(self):
        if self.batch_timeout >= self.timeout:
            raise ValueError(f"batch_timeout ({self.batch_timeout} s) must be below "
                             f"timeout ({self.timeout} s)")
        return self

    def litserve_options(self) -> dict[str, dict]:
        """Keyword arguments for ``LitAPI(...)``, ``LitServer(...)`` and ``LitServer.run(...)``."""
        return {
            "lit_api": {"max_batch_size": self.max_batch_size, "batch_timeout": self.batch_timeout},
            "server": {"accelerator": self.accelerator, "devices": self.devices,
                       "workers_per_device": self.workers_per_device, "timeout": self.timeout,
                       "max_payload_size": self.limits.max_payload_bytes},
            "run": {"num_api_servers": self.num_api_servers},
        }


class AutoscaleSettings(_Block):
    min_replicas: int = Field(0, ge=0)  # 0: scale to zero when idle (no cost, cold start on the next request)
    max_replicas: int = Field(2, ge=1)
    metric: Literal["CPU", "GPU", "RPM"] = "RPM"
    threshold: float = Field(60, gt=0)  # per replica: % utilisation for CPU/GPU, requests/minute for RPM
    idle_threshold_seconds: int = Field(600, ge=0)

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        return self


class DeploymentSettings(_Block):
    name: str = Field("spellxfer-api", pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    machine: str = "L4"
    port: int = Field(8000, ge=1024, le=65535)
    spot: bool = False
    health_check_path: str = "/health"
    api_key_env: str = "SPELLXFER_API_KEY"  # the replica reads the bearer token from this variable
    autoscale: AutoscaleSettings = AutoscaleSettings()

    @field_validator("machine")
    @classmethod
    def _machine(cls, v):
        return check_machine(v)


class JobSettings(_Block):
    teamspace: str | None = None  # falls back to $LIGHTNING_TEAMSPACE
    studio: str | None = None  # the Studio whose environment jobs run in; falls back to $LIGHTNING_STUDIO
    machines: dict[Literal["fit", "sweep", "serve"], str] = {"fit": "L4", "sweep": "L4", "serve": "L4"}
    commands: dict[Literal["fit", "sweep", "serve"], str] = {
        "fit": "python -m spellxfer fit --config configs/r16.yaml",
        # add --storage to share one study between several jobs
        "sweep": "python -m spellxfer sweep --space configs/sweeps/demo.yaml --study demo",
        "serve": "python -m spellxfer serve --port 8000",  # --host: added per key, see serve_command
    }
    interruptible: bool = False  # spot machines: cheaper, may be preempted (fit resumes from last.ckpt)
    max_runtime: int | None = Field(None, gt=0)  # seconds; DWS reservation for top-end GPUs
    env: dict[str, str] = {"WANDB_MODE": "offline"}

    @field_validator("machines")
    @classmethod
    def _machines(cls, v):
        return {task: check_machine(m) for task, m in v.items()}


class BenchmarkSettings(_Block):
    allowed_hosts: list[str] = []  # the project's own deployments (besides loopback) bench may load


class LightningConfig(_Block):
    serving: ServingSettings = ServingSettings()
    deployment: DeploymentSettings = DeploymentSettings()
    jobs: JobSettings = JobSettings()
    benchmark: BenchmarkSettings = BenchmarkSettings()

    def deployment_options(self, command: str) -> dict:
        """``lightning_sdk.Deployment.start`` arguments, as plain values (``--dry-run`` prints them)."""
        d, a = self.deployment, self.deployment.autoscale
        return {
            "name": d.name,
            "machine": d.machine,
            "command": command,
            "ports": [d.port],
            "spot": d.spot,
            "autoscale": {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "metric": a.metric,
                          "threshold": a.threshold, "idle_threshold_seconds": str(a.idle_threshold_seconds)},
            "health_check": {"path": d.health_check_path, "port": d.port},
        }


def check_machine(name: str) -> str:
    """A machine name lightning_sdk knows (``L4``, ``A100_X_8``, ``CPU`` …), upper-cased. Without
    the studio extra (lightning-sdk) the name is only upper-cased: ``serve`` reads this config too,
    and the ``studio`` commands, which need the extra, check it before anything is submitted."""
    try:
        from lightning_sdk import Machine
    except ModuleNotFoundError:
        return name.upper()

    key = name.upper()
    if not isinstance(getattr(Machine, key, None), Machine):
        known = sorted(k for k, v in vars(Machine).items() if isinstance(v, Machine))
        raise ValueError(f"unknown machine {name!r}; lightning_sdk knows e.g. {', '.join(known[:12])}, …")
    return key


def load_config(path: str | Path = DEFAULT_CONFIG) -> LightningConfig:
    """Read and validate the deployment config; any mistake is one ``file: key: problem`` line."""
    return load_file(LightningConfig, path, "deployment config")
