"""Dependencies of the routes, as Annotated aliases."""

from __future__ import annotations

from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, Request

from federated_learning.bus.blobs import BlobStore
from federated_learning.config import Settings
from federated_learning.protocol.keys import Keys
from federated_learning.records.agents import AgentRegistry
from federated_learning.records.organisations import Organisations
from federated_learning.records.trainings import TrainingViews
from federated_learning.records.versions import VersionIndex
from federated_learning.services.runtime import ServiceContext


def _ctx(request: Request) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def _redis(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> aioredis.Redis:
    return ctx.redis


def _settings(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> Settings:
    return ctx.settings


def _keys(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> Keys:
    return ctx.keys


def _trainings(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> TrainingViews:
    return TrainingViews(ctx.redis, ctx.keys)


def _agents(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> AgentRegistry:
    return AgentRegistry(ctx.redis, ctx.keys, ctx.settings.heartbeat_timeout_s)


def _versions(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> VersionIndex:
    return VersionIndex(ctx.redis, ctx.keys)


def _organisations(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> Organisations:
    return Organisations(ctx.redis, ctx.keys)


def _blobs(ctx: Annotated[ServiceContext, Depends(_ctx)]) -> BlobStore:
    return ctx.blobs


Context = Annotated[ServiceContext, Depends(_ctx)]
Redis = Annotated[aioredis.Redis, Depends(_redis)]
AppSettings = Annotated[Settings, Depends(_settings)]
AppKeys = Annotated[Keys, Depends(_keys)]
Trainings = Annotated[TrainingViews, Depends(_trainings)]
Agents = Annotated[AgentRegistry, Depends(_agents)]
Versions = Annotated[VersionIndex, Depends(_versions)]
Blobs = Annotated[BlobStore, Depends(_blobs)]
Orgs = Annotated[Organisations, Depends(_organisations)]
