"""The deployment: every setting a process takes from its environment, read once at the edge.

`Deployment.from_env()` is the one place in `mri_assets` that reads `os.environ`. The edges call
it (the `mri-assets` command, the Dagster code location `mri_assets.definitions`, the triage
server, the Celery worker) and hand the frozen object down; nothing below them reads or writes
the environment. `code_location.resources_for(deployment)` turns it into Dagster resources.

Each leaf field names the variable it comes from (`metadata["env"]`, first name wins; later
names are fallbacks); the README's Settings table is tested against these names. A bad value is
a `DeploymentError` with one line naming the variable and what it accepts.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mri_assets.core.home import DEFAULT_HOME, MriHome

PROFILES = ("local", "celery", "k8s")
DEVICES = ("auto", "cpu", "cuda")
FLAGS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
    "": False,
}
MAX_SHARDS = 1024
DEFAULT_CELERY_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_SIMULATED_PASSWORD = "Lantern-Quay-4417-demo"


class DeploymentError(ValueError):
    """A setting of the environment that cannot be used; the message names the variable."""


class ProfileError(DeploymentError):
    """An unknown or misconfigured deployment profile."""


@dataclass(frozen=True)
class Secret:
    """A secret value and the variable it came from; never shown by `repr`.

    `in_process_env` is true when the value was read from this process's own environment, so a
    Dagster resource can take it as `EnvVar(variable)` (kept out of the UI) instead of the value.
    """

    variable: str
    value: str = field(repr=False)
    in_process_env: bool = False


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ProfileError(
            f"unknown MRI_ASSETS_PROFILE {profile!r}: use one of {', '.join(PROFILES)}"
        )
    return profile


# -- parsers: (variable, text) -> value; each raises a one-line DeploymentError -------------------


def _text(_name: str, text: str) -> str:
    return text


def _optional(_name: str, text: str) -> str | None:
    return text or None


def _whole(low: int, high: int | None = None) -> Callable[[str, str], int]:
    bounds = f"from {low} to {high}" if high is not None else f"of {low} or more"

    def parse(name: str, text: str) -> int:
        try:
            value = int(text.strip())
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise DeploymentError(f"{name}={text!r}: use a whole number {bounds}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str, str], str]:
    def parse(name: str, text: str) -> str:
        if text not in allowed:
            raise DeploymentError(f"{name}={text!r}: allowed values are {', '.join(allowed)}")
        return text

    return parse


def _flag(name: str, text: str) -> bool:
    if text.strip().lower() not in FLAGS:
        raise DeploymentError(f"{name}={text!r}: use 1 or 0 (true/false, yes/no, on/off)")
    return FLAGS[text.strip().lower()]


def _web_url(name: str, text: str) -> str | None:
    url = text.strip().rstrip("/")
    if not url:
        return None
    if not url.startswith(("http://", "https://")) or len(url.split("//", 1)[1]) == 0:
        raise DeploymentError(f"{name}={text!r}: use the page's http(s) address, "
                              "e.g. http://127.0.0.1:3000")
    return url


def _words(_name: str, text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _profile(name: str, text: str) -> str:
    return check_profile(text)


def env(*names: str, parse: Callable[[str, str], Any] = _text, secret: bool = False) -> dict:
    """A field's metadata: it is read from the first set variable of `names`."""
    return {"env": names, "parse": parse, "secret": secret}


# -- the settings, grouped by what they configure -------------------------------------------------


@dataclass(frozen=True)
class ObjectStoreSettings:
    """S3-compatible store when `bucket` is set (or on `k8s`); else the folder `HOME/store`."""

    bucket: str | None = field(default=None, metadata=env("MRI_ASSETS_S3_BUCKET", parse=_optional))
    prefix: str = field(default="", metadata=env("MRI_ASSETS_S3_PREFIX"))
    endpoint_url: str | None = field(
        default=None, metadata=env("MRI_ASSETS_S3_ENDPOINT_URL", parse=_optional)
    )
    source_endpoint_url: str | None = field(
        default=None,
        metadata=env(
            "MRI_ASSETS_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", parse=_optional
        ),
    )
    region: str = field(default="us-east-1", metadata=env("AWS_REGION", "AWS_DEFAULT_REGION"))


@dataclass(frozen=True)
class MlflowSettings:
    tracking_uri: Secret | None = field(
        default=None, metadata=env("MLFLOW_TRACKING_URI", secret=True)
    )
    experiment: str = field(default="mri_assets", metadata=env("MRI_ASSETS_EXPERIMENT"))


@dataclass(frozen=True)
class ComputeSettings:
    """Device and loader settings for the celery/k8s profiles (`local` keeps the defaults)."""

    device: str = field(default="auto", metadata=env("MRI_ASSETS_DEVICE", parse=_choice(*DEVICES)))
    precision: str = field(
        default="auto",
        metadata=env("MRI_ASSETS_PRECISION", parse=_choice("auto", "fp32", "bf16", "fp16")),
    )
    batch_size: int = field(
        default=64, metadata=env("MRI_ASSETS_BATCH_SIZE", parse=_whole(1, 65536))
    )
    loader_workers: int = field(
        default=0, metadata=env("MRI_ASSETS_LOADER_WORKERS", parse=_whole(0, 256))
    )
    input_size: int | None = field(
        default=None, metadata=env("MRI_ASSETS_INPUT_SIZE", parse=_whole(32, 1024))
    )
    backbone_checkpoint: str | None = field(
        default=None, metadata=env("MRI_ASSETS_BACKBONE_CHECKPOINT", parse=_optional)
    )
    backbone_policy: str = field(
        default="first",
        metadata=env("MRI_ASSETS_BACKBONE_POLICY", parse=_choice("first", "every", "off")),
    )


@dataclass(frozen=True)
class LoopSettings:
    """How much the labeling/retraining loop asks for at a time."""

    label_batch: int = field(default=200, metadata=env("MRI_ASSETS_LABEL_BATCH", parse=_whole(1)))
    max_finetune_images: int = field(
        default=0, metadata=env("MRI_ASSETS_MAX_FINETUNE_IMAGES", parse=_whole(0))
    )
    retrain_every: int = field(
        default=500_000, metadata=env("MRI_ASSETS_RETRAIN_EVERY", parse=_whole(1))
    )
    # How often labels_sensor and retrain_sensor look: they query the label store and the
    # instance, so not every second; a clinician's last label reaches its refresh within it.
    sensor_interval_s: int = field(
        default=120, metadata=env("MRI_ASSETS_LOOP_SENSOR_INTERVAL", parse=_whole(5, 86_400))
    )


@dataclass(frozen=True)
class CelerySettings:
    broker: str = field(default=DEFAULT_CELERY_BROKER, metadata=env("MRI_ASSETS_CELERY_BROKER"))
    backend: str | None = field(
        default=None, metadata=env("MRI_ASSETS_CELERY_BACKEND", parse=_optional)
    )


@dataclass(frozen=True)
class K8sSettings:
    namespace: str = field(default="dagster", metadata=env("MRI_ASSETS_K8S_NAMESPACE"))
    max_concurrent: int = field(
        default=16, metadata=env("MRI_ASSETS_K8S_MAX_CONCURRENT", parse=_whole(1))
    )
    step_cpu: str = field(default="1", metadata=env("MRI_ASSETS_K8S_STEP_CPU"))
    step_memory: str = field(default="4Gi", metadata=env("MRI_ASSETS_K8S_STEP_MEMORY"))
    image_pull_policy: str | None = field(
        default=None,
        metadata=env(
            "MRI_ASSETS_K8S_IMAGE_PULL_POLICY", parse=_choice("Always", "IfNotPresent", "Never")
        ),
    )


@dataclass(frozen=True)
class TriageServiceSettings:
    secret: Secret | None = field(
        default=None, metadata=env("MRI_ASSETS_TRIAGE_SECRET", secret=True)
    )
    metrics_token: Secret | None = field(
        default=None, metadata=env("MRI_ASSETS_METRICS_TOKEN", secret=True)
    )
    show_prediction: bool = field(
        default=False, metadata=env("MRI_ASSETS_TRIAGE_SHOW_PREDICTION", parse=_flag)
    )
    lease_seconds: int = field(
        default=300, metadata=env("MRI_ASSETS_TRIAGE_LEASE_SECONDS", parse=_whole(10, 86_400))
    )
    cookie_secure: bool = field(
        default=False, metadata=env("MRI_ASSETS_TRIAGE_COOKIE_SECURE", parse=_flag)
    )
    idle_seconds: int = field(
        default=1800, metadata=env("MRI_ASSETS_TRIAGE_IDLE_SECONDS", parse=_whole(60, 86_400))
    )
    demo: bool = field(default=False, metadata=env("MRI_ASSETS_TRIAGE_DEMO", parse=_flag))
    allowed_origins: tuple[str, ...] = field(
        default=(), metadata=env("MRI_ASSETS_TRIAGE_ALLOWED_ORIGINS", parse=_words)
    )


def _home(_name: str, text: str) -> MriHome:
    return MriHome(Path(text or DEFAULT_HOME).expanduser().resolve())


@dataclass(frozen=True)
class Deployment:
    """Everything a process of this deployment needs to know about where things are."""

    home: MriHome = field(default=None, metadata=env("MRI_ASSETS_HOME", parse=_home))
    profile: str = field(default="local", metadata=env("MRI_ASSETS_PROFILE", parse=_profile))
    salt: Secret | None = field(default=None, metadata=env("MRI_ASSETS_SALT", secret=True))
    shards: int = field(default=16, metadata=env("MRI_ASSETS_SHARDS", parse=_whole(1, MAX_SHARDS)))
    labels_url: Secret | None = field(
        default=None, metadata=env("MRI_ASSETS_LABELS_URL", secret=True)
    )
    object_store: ObjectStoreSettings = field(default_factory=ObjectStoreSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    celery: CelerySettings = field(default_factory=CelerySettings)
    k8s: K8sSettings = field(default_factory=K8sSettings)
    triage: TriageServiceSettings = field(default_factory=TriageServiceSettings)
    pushgateway_url: str | None = field(
        default=None, metadata=env("PUSHGATEWAY_URL", parse=_optional)
    )
    dagster_url: str | None = field(
        default=None, metadata=env("MRI_ASSETS_DAGSTER_URL", parse=_web_url)
    )
    dvc_executable: str | None = field(
        default=None, metadata=env("MRI_ASSETS_DVC", parse=_optional)
    )
    simulated_password: Secret | None = field(
        default=None, metadata=env("MRI_ASSETS_SIMULATED_PASSWORD", secret=True)
    )
    set_variables: frozenset[str] = field(default=frozenset(), compare=False)

    def __post_init__(self) -> None:
        if self.home is None:
            object.__setattr__(self, "home", _home("MRI_ASSETS_HOME", ""))

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        profile: str | None = None,
        home: MriHome | Path | str | None = None,
    ) -> Deployment:
        """Read every setting from `environ` (default: this process's environment).

        `profile` and `home` override the variables (the CLI's `--home`, a test's profile).
        """
        in_process = environ is None
        env = os.environ if environ is None else environ
        values, used = _read(cls, env, in_process)
        if profile is not None:
            values["profile"] = check_profile(profile)
        if home is not None:
            values["home"] = home if isinstance(home, MriHome) else _home("--home", str(home))
        return cls(**values, set_variables=frozenset(used))

    # -- what follows from the settings -----------------------------------------------------------

    @property
    def uses_s3(self) -> bool:
        return self.profile == "k8s" or self.object_store.bucket is not None

    @property
    def bucket(self) -> str:
        return self.object_store.bucket or "mri-assets"

    @property
    def dvc_remote(self) -> str:
        """The DVC remote: `s3://BUCKET/PREFIX/dvc-remote` with S3, else `HOME/dvc-remote`."""
        if not self.uses_s3:
            return str(self.home.dvc_remote)
        prefix = self.object_store.prefix.strip("/")
        return f"s3://{self.bucket}/{prefix + '/' if prefix else ''}dvc-remote"

    @property
    def input_size(self) -> int | None:
        """Side the backbone sees: 128 on `local` (CPU), 256 elsewhere; None = the stored 256 px."""
        size = self.compute.input_size or (128 if self.profile == "local" else 256)
        return None if size == 256 else size

    @property
    def labels_url_value(self) -> str:
        """The label store's SQLAlchemy URL (a secret when set): SQLite under HOME by default."""
        return self.labels_url.value if self.labels_url else f"sqlite:///{self.home.labels_db}"

    @property
    def simulated_password_value(self) -> str:
        return (
            self.simulated_password.value if self.simulated_password else DEFAULT_SIMULATED_PASSWORD
        )

    def with_defaults(self, **loop: int) -> Deployment:
        """`loop` settings replaced where their variable is not set (the demo's smaller figures)."""
        names = {f.name: f.metadata["env"][0] for f in dataclasses.fields(LoopSettings)}
        unknown = set(loop) - set(names)
        if unknown:
            raise TypeError(f"not loop settings: {sorted(unknown)}")
        chosen = {k: v for k, v in loop.items() if names[k] not in self.set_variables}
        return dataclasses.replace(self, loop=dataclasses.replace(self.loop, **chosen))

    def set_values(self, names: tuple[str, ...]) -> list[str]:
        """Which of the variables `names` this deployment was given (for step pods to inherit)."""
        return [name for name in names if name in self.set_variables]


def _read(cls, env: Mapping[str, str], in_process: bool) -> tuple[dict[str, Any], set[str]]:
    values: dict[str, Any] = {}
    used: set[str] = set()
    for spec in dataclasses.fields(cls):
        if "env" not in spec.metadata:
            if dataclasses.is_dataclass(spec.default_factory):
                group, inner = _read(spec.default_factory, env, in_process)
                values[spec.name] = spec.default_factory(**group)
                used |= inner
            continue
        name = next((n for n in spec.metadata["env"] if env.get(n) not in (None, "")), None)
        if name is None:
            continue
        used.add(name)
        text = env[name]
        if spec.metadata["secret"]:
            values[spec.name] = Secret(name, text, in_process_env=in_process)
        else:
            values[spec.name] = spec.metadata["parse"](name, text)
    return values, used


def variables() -> dict[str, str]:
    """Every variable a deployment reads, with the field it sets (`object_store.bucket`, ...)."""
    found: dict[str, str] = {}

    def walk(cls, path: str) -> None:
        for spec in dataclasses.fields(cls):
            if "env" in spec.metadata:
                for name in spec.metadata["env"]:
                    found.setdefault(name, path + spec.name)
            elif dataclasses.is_dataclass(spec.default_factory):
                walk(spec.default_factory, f"{path}{spec.name}.")

    walk(Deployment, "")
    return found


def shards_from_env(environ: Mapping[str, str] | None = None) -> int:
    """MRI_ASSETS_SHARDS alone: the size of Dagster's static shard dimension, fixed when the code
    location is imported (see `partitions`). Waves keep their own count in their layout."""
    env = os.environ if environ is None else environ
    text = env.get("MRI_ASSETS_SHARDS")
    return _whole(1, MAX_SHARDS)("MRI_ASSETS_SHARDS", text) if text else 16


def child_environment(
    overrides: Mapping[str, str] | None = None, without: Collection[str] = ()
) -> dict[str, str]:
    """This process's environment without the variables in `without` and with `overrides`, for a
    child process: one that is an edge itself (a Celery worker builds its own `Deployment` from
    it) or a tool with its own environment (the `dvc` program must not see our PYTHONPATH)."""
    kept = {key: value for key, value in os.environ.items() if key not in without}
    return {**kept, **dict(overrides or {})}
