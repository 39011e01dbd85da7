"""The triage app's routes, one `APIRouter` per concern; each handler takes the app's
`TriageContext` through the `Context` dependency (`triage/context.py`).

| module | routes |
| --- | --- |
| `login.py` | `/login`, `/logout` (the only public route is the login form) |
| `labelling.py` | the labelling page `/`, the item images `/image/{id}.png` and `.raw`, class examples |
| `api.py` | the labelling page's JSON API: `/api/next`, `label`, `skip`, `unsure`, `undo`, `renew`, `progress` |
| `admin.py` | `/admin`, `/admin/users`, `/admin/sessions`, `/admin/audit` (admins only) |
| `metrics.py` | `/metrics` for Prometheus (bearer token) |
"""

from __future__ import annotations

from mri_assets.triage.routes import admin, api, labelling, login, metrics

ROUTERS = (login.router, labelling.router, api.router, metrics.router, admin.router)
