"""The triage server's settings (`TriageSettings`), from the deployment (MRI_ASSETS_TRIAGE_*)."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from mri_assets.deployment import Deployment
from mri_assets.resources.label_store import LoginPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TriageSettings:
    secret_key: str
    metrics_token: str | None = None
    show_prediction: bool = False
    lease_seconds: int = 300
    session_max_age_s: int = 8 * 3600
    session_idle_s: int = 30 * 60
    session_touch_s: float = 60.0
    cookie_secure: bool = False
    demo: bool = False
    max_body_bytes: int = 64 * 1024
    allowed_origins: tuple[str, ...] = ()
    login_policy: LoginPolicy = field(default_factory=LoginPolicy)

    @classmethod
    def from_deployment(cls, deployment: Deployment) -> TriageSettings:
        """The settings of the deployment's triage server (MRI_ASSETS_TRIAGE_*)."""
        triage = deployment.triage
        secret = triage.secret.value if triage.secret else ""
        if not secret and triage.demo:
            log.warning(
                "demo mode and MRI_ASSETS_TRIAGE_SECRET is not set: using a random session "
                "secret, so clinicians must log in again after a restart"
            )
            secret = secrets.token_urlsafe(32)
        return cls(
            secret_key=secret,
            metrics_token=triage.metrics_token.value if triage.metrics_token else None,
            show_prediction=triage.show_prediction,
            lease_seconds=triage.lease_seconds,
            session_idle_s=triage.idle_seconds,
            cookie_secure=triage.cookie_secure,
            demo=triage.demo,
            allowed_origins=triage.allowed_origins,
        )
