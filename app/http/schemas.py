"""Request and response bodies; they are also the OpenAPI schema that /docs shows and fuzzers use."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from app.engine.spec import Card


class PredictRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"text": "I'd like to rent a car in Paris next week", "top_k": 3}]},
    )
    text: StrictStr = Field(description="the user's message; cut to the model's token window if longer")
    top_k: StrictInt | None = Field(None, ge=1, description="also return the k most likely intents")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"texts": ["what's my balance", "hi"]}]})
    texts: list[StrictStr] = Field(min_length=1, description="messages, answered in the same order")
    top_k: StrictInt | None = Field(None, ge=1)


class RankedIntent(BaseModel):
    intent: str
    confidence: float = Field(ge=0.0, le=1.0)


class Prediction(BaseModel):
    intent: str = Field(description="one of the model's intents, or 'oos' (out of scope)")
    confidence: float = Field(ge=0.0, le=1.0)
    top_k: list[RankedIntent] | None = None


class PredictResponse(Prediction):
    model_version: str


class BatchResponse(BaseModel):
    predictions: list[Prediction]
    model_version: str


class Status(BaseModel):
    status: str


class ModelCardResponse(Card):
    """GET /model: the artifact's card (spec, files, provenance, metrics), its labels, and the CPU it serves on."""

    labels: list[str]
    serving: dict[str, Any] | None = None
