"""``GET /v1/models``: what the registry holds and which model this server has loaded."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from model import Registry

from ..dependencies import EngineDep, SettingsDep, require_api_key
from ..engine import InferenceEngine
from ..errors import error_responses
from ..schemas import LoadedModel, ModelsResponse

router = APIRouter(prefix="/v1", tags=["models"], dependencies=[Depends(require_api_key)])


def describe(engine: InferenceEngine) -> LoadedModel:
    pipe = engine.pipeline
    loaded = LoadedModel(state=engine.state.value, ref=engine.settings.model, error=engine.error)
    if pipe is None:
        return loaded
    return loaded.model_copy(
        update={
            "name": pipe.name,
            "version": pipe.version,
            **pipe.describe_path(),
            "scale": pipe.scale,
            "default_steps": pipe.config.inference_steps,
            "max_steps": pipe.schedule.num_steps,
            "tile_sizes": list(pipe.tile_sizes),
            "tile_seconds": pipe.tile_seconds,
            "batch_sizes": engine.batch_sizes,
        }
    )


@router.get("/models", summary="Registry contents and the loaded model", responses=error_responses(401))
async def list_models(engine: EngineDep, settings: SettingsDep) -> ModelsResponse:
    registry = Registry(settings.registry)
    return ModelsResponse(loaded=describe(engine), models=await run_in_threadpool(registry.list))
