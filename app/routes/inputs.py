"""Reading image inputs from either body form: multipart upload (`file`) or JSON with base64."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from app.errors import BodyTooLarge, InvalidInput, UnsupportedMediaType, ValidationFailed, validation_message

MULTIPART_FIELDS_LIMIT = 32


def decode_base64(text: str, field: str = "image_base64") -> bytes:
    if text.startswith("data:") and "," in text:  # a data: URL from a browser
        text = text.split(",", 1)[1]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{field} is not valid base64") from None
    if not data:
        raise InvalidInput(f"{field} is empty")
    return data


def _validation_error(exc: ValidationError) -> ValidationFailed:
    return ValidationFailed(validation_message(exc.errors()))


def parse_model(model: type[BaseModel], data: Any) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc) from None


async def read_image_request(request: Request, json_model: type[BaseModel],
                             form_model: type[BaseModel]) -> tuple[Any, bytes | None]:
    """(validated options, image bytes or None). Multipart: the image is the `file` part and the
    other fields are options (`form_model`); JSON: the body is `json_model`, whose `image_base64`
    is decoded here."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=1, max_fields=MULTIPART_FIELDS_LIMIT)
        except BodyTooLarge:
            raise
        except Exception as exc:  # noqa: BLE001 - malformed multipart bodies are the client's
            raise InvalidInput(f"malformed multipart body: {type(exc).__name__}") from None
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("multipart body needs an image in the field 'file'")
        data = await upload.read()
        fields: dict[str, Any] = {k: v for k, v in form.items() if k != "file" and isinstance(v, str)}
        if "filters" in fields:
            try:
                fields["filters"] = json.loads(fields["filters"])
            except json.JSONDecodeError:
                raise InvalidInput("filters must be a JSON list") from None
        return parse_model(form_model, fields), data
    if content_type.startswith("application/json") or not content_type:
        body = await request.body()
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidInput("body is not valid JSON") from None
        options = parse_model(json_model, payload)
        raw = getattr(options, "image_base64", None)
        return options, decode_base64(raw) if raw is not None else None
    raise UnsupportedMediaType("send multipart/form-data (field 'file') or application/json")


def image_body_openapi(json_schema_ref: str, form_fields: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI for an endpoint taking either body form."""
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": f"#/components/schemas/{json_schema_ref}"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {"file": {"type": "string", "format": "binary"}, **form_fields},
                    }
                },
            },
        }
    }
