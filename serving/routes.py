"""The model server's endpoints: health and stats, the models, vLLM's adapter API, chat completions."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from serving.completions import CompletionCall, complete
from serving.engine import Engine
from serving.errors import ModelNotFound
from serving.responses import error_response
from serving.schemas import ChatCompletionRequest, LoadLoraRequest, ModelCard, ModelList, UnloadLoraRequest


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]

health = APIRouter(tags=["health"])
models = APIRouter(prefix="/v1", tags=["models"])
adapters = APIRouter(prefix="/v1", tags=["adapters"])  # vLLM's runtime LoRA API
chat = APIRouter(prefix="/v1", tags=["chat"])


@health.get("/healthz")
@health.get("/health")  # vLLM's
async def healthz(engine: EngineDep) -> JSONResponse:
    if not engine.running:
        return error_response(503, "the generation worker is not running", "server_error")
    return JSONResponse({"status": "ok", "model": engine.name, "queue": engine.queue_depth})


@health.get("/stats")
async def stats(engine: EngineDep) -> dict[str, Any]:
    return {
        **engine.stats.as_dict(),
        "queue": engine.queue_depth,
        "active": engine.active_rows,
        "max_batch": engine.max_batch,
        "max_queue": engine.max_queue,
        "quantize": engine.loaded.quantize,
    }


def _cards(engine: Engine) -> list[ModelCard]:
    cards = [ModelCard(id=engine.name, created=engine.created, root=str(engine.loaded.path))]
    for name, info in engine.adapters().items():
        cards.append(ModelCard(id=name, created=info["created"], root=info["path"], parent=engine.name))
    return cards


@models.get("/models")
async def list_models(engine: EngineDep) -> ModelList:
    return ModelList(data=_cards(engine))


@models.get("/models/{model_id:path}")
async def get_model_card(model_id: str, engine: EngineDep) -> ModelCard:
    for card in _cards(engine):
        if card.id == model_id:
            return card
    raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model")


@adapters.post("/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, engine: EngineDep) -> PlainTextResponse:
    await engine.load_adapter(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@adapters.post("/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, engine: EngineDep) -> PlainTextResponse:
    await engine.unload_adapter(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@chat.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep):
    call = CompletionCall(request, body.model, body.stream)
    try:
        with call.active():
            response = await complete(engine, body, request, call)
    except BaseException as exc:  # answered by the app's exception handlers; logged and traced here
        call.finish(exc)
        raise
    if not body.stream:  # a stream's generator finishes the call when the last chunk is sent
        call.finish()
    return response
