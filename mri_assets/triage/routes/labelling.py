"""The labelling page and the images it shows: a leased item's 256 px PNG and its slice at the
original values (to its leaseholder or an admin), and the example slice of a class. An item
whose pixels cannot be read is flagged for the admin and skipped for everyone."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import JSONResponse, Response

from mri_assets.resources.label_store import MAX_ITEM_ID
from mri_assets.triage import auth
from mri_assets.triage.classes import DEFINITIONS
from mri_assets.triage.context import Context, TriageContext

log = logging.getLogger(__name__)
router = APIRouter()
ImageItemId = Annotated[int, PathParam(ge=1, le=MAX_ITEM_ID)]


@router.get("/")
def labeling_page(request: Request, ctx: Context, user: str = Depends(auth.page_user)):
    return ctx.page(
        request,
        "label.html",
        show_prediction=ctx.settings.show_prediction,
        lease_seconds=ctx.settings.lease_seconds,
        definitions=DEFINITIONS,
    )


def visible_item(request: Request, ctx: TriageContext, item_id: int, user: str) -> dict:
    """The item, when `user` holds its lease or is an admin; else 404."""
    item = ctx.label_store.item(item_id)
    may_see = item is not None and (
        item["lease_owner"] == user or auth.session_of(request).role == "admin"
    )
    if not may_see:
        raise HTTPException(404, f"no item {item_id} leased to you")
    return item


def missing_pixels(item_id: int, why: str) -> JSONResponse:
    return JSONResponse(
        {
            "error": "MissingPixels",
            "detail": f"case {item_id} cannot be shown: {why}. It is flagged for the admin "
            "and skipped for everyone.",
        },
        404,
    )


@router.get("/image/{item_id}.png")
def item_image(
    request: Request, ctx: Context, item_id: ImageItemId, user: str = Depends(auth.api_user)
):
    item = visible_item(request, ctx, item_id, user)
    if item["flag"] is not None:
        return missing_pixels(item_id, "it is flagged as having no readable pixels")
    try:
        png = ctx.load_slice_png(item["wave"], item["image_id"])
    except (LookupError, OSError, ValueError) as error:
        log.warning("item %s (%s/%s): no pixels: %s", item_id, item["wave"],
                    item["image_id"], error)
        ctx.label_store.flag_missing_pixels(item_id, by=user)
        return missing_pixels(item_id, "its pixels cannot be read")
    return Response(png, media_type="image/png")


@router.get("/api/example.png")
def class_example(
    ctx: Context,
    label: Annotated[str, Query(min_length=1, max_length=128)],
    user: str = Depends(auth.api_user),
):
    """The slice of the latest expert label of class `label`: its example beside the
    class definition (an image clinicians have labelled already, never a new case)."""
    example = ctx.label_store.example_of(label)
    if example is None:
        raise HTTPException(404, f"no expert label {label!r} yet")
    try:
        png = ctx.load_slice_png(*example)
    except (LookupError, OSError, ValueError) as error:
        raise HTTPException(404, "the example's pixels cannot be read") from error
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=600"})


@router.get("/image/{item_id}.raw")
def item_raw_slice(
    request: Request, ctx: Context, item_id: ImageItemId, user: str = Depends(auth.api_user)
):
    item = visible_item(request, ctx, item_id, user)
    if ctx.load_raw_slice is None:
        raise HTTPException(404, "this server reads no raw objects: use the PNG")
    try:
        body, headers = ctx.load_raw_slice(item["wave"], item["image_id"]).encode()
    except (LookupError, OSError, ValueError) as error:
        return JSONResponse({"error": "NoRawSlice", "detail": str(error)[:300]}, 404)
    return Response(body, media_type="application/octet-stream", headers=headers)
