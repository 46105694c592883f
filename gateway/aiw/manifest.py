"""The AIW manifest (`GET /.well-known/aiw-manifest.json`): what this gateway serves, and how.

An agent reads it first: which protocol version (`aiw_version`), whose twin (`service.id`, the
twin id events carry), where each endpoint is (relative URLs: the manifest does not know the
name a proxy serves it under), which schemas there are, what needs a token, and every limit
a client can hit, so that it can size its requests instead of learning them from 400s.

The endpoints are those the app really serves (gateway/aiw/openapi.py walks the router), so
the manifest cannot list a route that is not there. Pure: no I/O.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from gateway import __version__
from gateway.aiw.events import twin_id
from gateway.aiw.schemas import SCHEMAS
from gateway.config.model import SiteConfig

__all__ = ["AIW_VERSION", "SERVICE_NAME", "Manifest", "build_manifest"]

AIW_VERSION = "0.3"
SERVICE_NAME = "opstwin-gateway"
DEFAULT_SITE_TYPE = "manufacturing"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Service(_Model):
    """Who answers: the software, its version, and the twin it serves."""

    name: str
    version: str
    id: str = Field(description="The twin id, `site_id/gateway_id`, as events carry it.")


class AuthModes(_Model):
    """What each kind of request needs: `open` (nothing) or `token` (a bearer token or user)."""

    read: Literal["open", "token"] = Field(
        description="Twin, history, events, schemas (`http.read_access`)."
    )
    write: Literal["token"] = Field(description="Ingest; always a token whose role allows it.")
    action: Literal["token"] = Field(
        description="Proposals, approvals, rollbacks, simulations: always a token or user."
    )
    schemes: list[str] = Field(description="HTTP authentication schemes accepted.")


class Manifest(_Model):
    """The manifest document."""

    aiw_version: str
    service: Service
    site_type: str
    endpoints: dict[str, str] = Field(description="Endpoint name → relative URL (a template).")
    schemas: list[str] = Field(description="Schema names; each at `endpoints.schema`.")
    auth: AuthModes
    limits: dict[str, float | int] = Field(description="Every bound a client can meet.")


def build_manifest(
    config: SiteConfig, endpoints: dict[str, str], limits: dict[str, float | int]
) -> Manifest:
    """The manifest of a gateway with `config`, serving `endpoints`, bound by `limits`."""
    return Manifest(
        aiw_version=AIW_VERSION,
        service=Service(
            name=SERVICE_NAME,
            version=__version__,
            id=twin_id(config.site_id, config.gateway_id),
        ),
        # The site config has no site type yet; when it grows one, it wins.
        site_type=str(getattr(config, "site_type", None) or DEFAULT_SITE_TYPE),
        endpoints=dict(endpoints),
        schemas=list(SCHEMAS),
        auth=AuthModes(
            read=config.http.read_access,
            write="token",
            action="token",
            schemes=["bearer", "basic"],
        ),
        limits=dict(limits),
    )
