"""The bodies the server accepts (pydantic): what a client may send, checked before any
other code sees it. A body that fails here is a 400 with the field and the reason."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MIN_TEMPERATURE = 0.01  # below it sampling divides logits into inf: 0 (greedy) or this much


class Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)  # None: the
    # server's --temperature (0, greedy, unless set: as `softprompt generate` answers)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = Field(1, ge=1, le=1)

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data):
        """Every string of the body must be text that UTF-8 can hold (no lone surrogate
        such as "\\udc80", which JSON can carry and no tokenizer can read)."""
        todo = [data]
        while todo:
            item = todo.pop()
            if isinstance(item, dict):
                todo += [*item.keys(), *item.values()]
            elif isinstance(item, list):
                todo += item
            elif isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    raise ValueError(
                        "the body holds a lone surrogate (e.g. \\udc80): not valid Unicode text"
                    ) from None
        return data

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"use 0 (greedy) or a temperature of {MIN_TEMPERATURE} to 2")
        return value


class CompletionBody(Body):
    prompt: str | list[str]
    fields: dict[str, str | int | float | bool] | None = None  # the template's other fields


class ContentPart(BaseModel):
    """An OpenAI content part; the text ones are read, others (images...) are left out."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):  # OpenAI content parts: keep the text ones
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class ChatBody(Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
