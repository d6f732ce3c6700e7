"""``GET /concept_ablation/patch_info?name=...``: a patch's metadata for the Load Ablation Patch preview."""

from __future__ import annotations

import logging

from ablation_core import PatchError, describe_patch, load_patch

from .ablation_nodes import patch_file_path

log = logging.getLogger(__name__)
ROUTE = "/concept_ablation/patch_info"


def patch_info(name: str) -> dict:
    try:
        info = describe_patch(load_patch(patch_file_path(name)))
    except PatchError as err:
        return {"error": str(err)}
    info.pop("keys")
    return info


def register_routes() -> None:
    try:
        from aiohttp import web
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return

    @PromptServer.instance.routes.get(ROUTE)
    async def _patch_info(request):
        return web.json_response(patch_info(request.query.get("name", "")))
