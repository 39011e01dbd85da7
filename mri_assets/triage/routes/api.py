"""The labelling page's JSON API. Every state-changing call echoes the session's CSRF token in
`X-CSRF-Token`; bodies are strict (unknown fields refused, item ids bounded). With
`lease_next_held` an answer also carries the next item, so one round trip labels and leases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from mri_assets.resources import label_store as store_errors
from mri_assets.resources.label_store import MAX_HELD, MAX_ITEM_ID, utc_now
from mri_assets.triage import auth
from mri_assets.triage.context import Context, TriageContext

router = APIRouter()
ItemId = Annotated[int, Field(ge=1, le=MAX_ITEM_ID, strict=True)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemAction(_Body):
    item_id: ItemId


class ItemActionThenNext(ItemAction):
    lease_next_held: list[ItemId] | None = Field(default=None, max_length=MAX_HELD)


class LabelSubmission(ItemActionThenNext):
    label: str = Field(min_length=1, max_length=128)
    seconds_spent: float = Field(default=0.0, ge=0, le=86_400, allow_inf_nan=False)


class LeaseRenewal(_Body):
    item_ids: list[ItemId] = Field(max_length=MAX_HELD)


def parse_held(held: str) -> list[int]:
    parts = [part for part in held.split(",") if part]
    if len(parts) > MAX_HELD:
        raise HTTPException(422, f"held lists at most {MAX_HELD} item ids")
    ids = [int(part) for part in parts]  # the query pattern allows digits only
    if any(not 1 <= i <= MAX_ITEM_ID for i in ids):
        raise HTTPException(422, f"held item ids are 1..{MAX_ITEM_ID}")
    return ids


def next_answer(ctx: TriageContext, user: str, held: list[int]) -> dict:
    item = ctx.label_store.lease_next(user, ctx.settings.lease_seconds, held=held)
    if item is None:
        return {"item": None, **ctx.label_store.queue_status()}
    return {"item": ctx.item_payload(item, utc_now())}


def answer_then_next(ctx: TriageContext, user: str, body: ItemActionThenNext, **answer) -> dict:
    """With `lease_next_held` the answer also carries the next item (one round trip)."""
    if body.lease_next_held is not None:
        upcoming = next_answer(ctx, user, body.lease_next_held)
        answer["next"] = upcoming.pop("item")
        answer.update(upcoming)
    return {"ok": True, **answer}


def checked(request: Request) -> None:
    auth.check_csrf(request, request.headers.get(auth.CSRF_HEADER))


@router.get("/api/next")
def next_item(
    ctx: Context,
    held: Annotated[str, Query(max_length=1024, pattern=r"^[0-9,]*$")] = "",
    user: str = Depends(auth.api_user),
):
    return next_answer(ctx, user, parse_held(held))


@router.post("/api/label")
def post_label(
    request: Request, ctx: Context, body: LabelSubmission, user: str = Depends(auth.api_user)
):
    checked(request)
    store = ctx.label_store
    try:
        label_id = store.submit_label(body.item_id, user, body.label, body.seconds_spent)
    except store_errors.BudgetExhausted:
        try:
            store.release(body.item_id, user)
        except store_errors.LabelStoreError:
            pass
        raise
    return answer_then_next(ctx, user, body, label_id=label_id)


@router.post("/api/skip")
def post_skip(
    request: Request, ctx: Context, body: ItemActionThenNext, user: str = Depends(auth.api_user)
):
    checked(request)
    ctx.label_store.skip(body.item_id, user)
    return answer_then_next(ctx, user, body)


@router.post("/api/unsure")
def post_unsure(
    request: Request, ctx: Context, body: ItemActionThenNext, user: str = Depends(auth.api_user)
):
    checked(request)
    ctx.label_store.mark_unsure(body.item_id, user)
    return answer_then_next(ctx, user, body)


@router.post("/api/undo")
def post_undo(
    request: Request, ctx: Context, body: ItemAction, user: str = Depends(auth.api_user)
):
    checked(request)
    item = ctx.label_store.undo(body.item_id, user)
    return {"ok": True, "item": ctx.item_payload(item, utc_now())}


@router.post("/api/renew")
def post_renew(
    request: Request, ctx: Context, body: LeaseRenewal, user: str = Depends(auth.api_user)
):
    checked(request)
    lease_seconds = ctx.settings.lease_seconds
    renewed = ctx.label_store.renew_leases(user, body.item_ids, lease_seconds)
    return {
        "renewed": {str(i): at.isoformat() + "Z" for i, at in renewed.items()},
        "lost": [i for i in body.item_ids if i not in renewed],
        "lease_seconds": lease_seconds,
    }


@router.get("/api/progress")
def progress(request: Request, ctx: Context, user: str = Depends(auth.api_user)):
    session = auth.session_of(request)
    return ctx.label_store.progress(user, since=session.created_at)
