"""The transferkit routes in the OpenAPI document BentoML serves (``/docs.json``, and the Swagger page at ``/``).

BentoML 1.4.40 documents its own ``@bentoml.api`` methods and, of the ASGI apps mounted with ``bentoml.asgi_app``,
only FastAPI ones (``_bentoml_sdk/service/openapi.py``: ``generate_spec`` calls FastAPI's ``get_openapi`` on them).
transferkit's routes are a plain Starlette app (service/http.py says why), and FastAPI is not a dependency of the
served bento, so BentoML has no hook for them. :func:`install` wraps ``generate_spec`` once, in this one place: the
wrapper adds the paths and schemas of every mounted app that carries a document (:func:`attach`). If BentoML moves
``generate_spec``, :func:`install` raises at import rather than serving a page without the routes, and
tests/test_operability.py fails.

The document is OpenAPI 3.0 (BentoML's version): a multipart upload form for ``/predict`` (with ``top_k``), JSON
schemas for ``/v2``'s infer request and answer, and the one error body every refusal uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transferkit.service.settings import ServiceSettings

OPENAPI_ATTR = "transferkit_openapi"  # the attribute of a mounted app that returns its paths and schemas
TAG, V2_TAG = "transferkit", "Open Inference Protocol (v2)"
REF = "#/components/schemas/"
# A 1x1 grey PNG, base64: a /v2 request that Swagger's "Try it out" can send as it is.
PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNoaGgAAAMEAYFL09IQAAAAAElFTkSuQmCC"
ERRORS = {
    400: "Bad request: the request (an image, a field, the JSON, top_k) cannot be answered as sent",
    401: "A bearer token is required (TRANSFERKIT_API_TOKEN)",
    404: "No such route, model or version",
    413: "Too large: the body, an image's pixels, or too many images",
    415: "Not multipart/form-data",
    429: "Too many requests in flight: retry after Retry-After seconds",
    500: "Server fault (logged; the message is generic)",
    503: "Warming up, shutting down, overloaded or no model: retry after Retry-After seconds when given",
    504: "The model did not answer within TRANSFERKIT_TIMEOUT_S",
}


def attach(app: Any, document: Callable[[], dict]) -> None:
    """Give ``app`` its OpenAPI fragment (``{"paths", "components"}``), asked for each time the document is built,
    and make sure BentoML's document includes it (:func:`install`)."""
    setattr(app, OPENAPI_ATTR, document)
    install()


def install() -> None:
    """Wrap BentoML's ``generate_spec`` (once per process) so that mounted apps with a fragment are documented."""
    from _bentoml_sdk.service import openapi as bentoml_openapi

    original = bentoml_openapi.generate_spec
    if getattr(original, "__transferkit__", False):
        return

    def generate_spec(svc: Any, **kwargs: Any) -> Any:
        spec = original(svc, **kwargs)
        for app, path, _ in svc.mount_apps:
            document = getattr(app, OPENAPI_ATTR, None)
            if document is not None:  # the mount path without the service's prefix, as BentoML does for FastAPI
                merge(spec, document(), path[len(svc.path_prefix):] if svc.path_prefix else path)
        return spec

    generate_spec.__transferkit__ = True  # type: ignore[attr-defined]
    # Service.openapi_spec imports generate_spec from this module each time it is read: replacing the module's
    # attribute is enough (and the only reference there is).
    bentoml_openapi.generate_spec = generate_spec


def merge(spec: Any, fragment: dict, mount_path: str) -> None:
    """Add ``fragment``'s paths (under ``mount_path``) and schemas to BentoML's specification object, and make
    BentoML's own schemas valid OpenAPI 3.0 (:func:`openapi_30`)."""
    from bentoml._internal.service.openapi.specification import PathItem
    from bentoml._internal.utils.cattr import bentoml_cattr

    prefix = mount_path.rstrip("/")
    for route, operations in fragment["paths"].items():
        spec.paths[prefix + route] = PathItem(**operations)  # operations as dicts, as BentoML writes its own
    # generate_spec passes a dict of components, new on each call (the class it annotates, Components, would do too).
    components = spec.components
    schemas = components.setdefault("schemas", {}) if isinstance(components, dict) else components.schemas
    for name, schema in schemas.items():  # copies: BentoML keeps some of these objects for every call
        schemas[name] = openapi_30(bentoml_cattr.unstructure(schema))
    schemas.update(fragment["components"]["schemas"])


def openapi_30(schema: Any) -> Any:
    """``schema`` with pydantic 2's optional fields, ``anyOf: [X, {"type": "null"}]``, spelled as OpenAPI 3.0 (the
    version BentoML's document declares) spells them: X with ``nullable: true``. BentoML 1.4.40's own
    ``TaskStatusResponse`` is written the first way, and a validator refuses the whole document for it."""
    if isinstance(schema, list):
        return [openapi_30(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    any_of = schema.get("anyOf")
    if isinstance(any_of, list) and {"type": "null"} in any_of:
        others = [item for item in any_of if item != {"type": "null"}]
        schema = {key: value for key, value in schema.items() if key != "anyOf"}
        schema.update(others[0] if len(others) == 1 else {"anyOf": others})
        schema["nullable"] = True
    return {key: openapi_30(value) for key, value in schema.items()}


# --- the document ----------------------------------------------------------------------------------------------


def _ref(name: str) -> dict:
    return {"$ref": REF + name}


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    """The error answers of an operation: every one the same JSON body (service/errors.py)."""
    answers = {}
    for status in (*statuses, 401, 500):
        answer = _json(_ref("TransferkitError"), ERRORS[status])
        if status in (429, 503):
            answer["headers"] = {"Retry-After": {"description": "seconds to wait before retrying, when it helps",
                                                 "schema": {"type": "integer", "minimum": 1}}}
        answers[str(status)] = answer
    return answers


def _top_k_schema(classes: int | None, default: int) -> dict:
    schema: dict = {"type": "integer", "minimum": 1, "description": (
        f"Labels per image, 1 to the number of classes{f' ({classes})' if classes else ''}; the server's "
        f"TRANSFERKIT_TOP_K ({default}) when absent. Give it once: as a query parameter or as a form field.")}
    if classes:
        schema["maximum"] = classes
    return schema


def _model_parameter(names: list[str]) -> dict:
    schema: dict = {"type": "string"}
    if names:
        schema["enum"] = names
    return {"name": "model", "in": "query", "required": False, "schema": schema,
            "description": "The served model to ask (GET /metadata lists them); absent: the default model, 400 "
                           "model_required where several are served and none is the default"}


def _predict_operation(settings: ServiceSettings, classes: int | None, names: list[str]) -> dict:
    form = {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "minItems": 1, "maxItems": settings.max_images,
                   "description": "Image files (JPEG, PNG, BMP, GIF, WebP); the bytes decide, not the Content-Type",
                   "items": {"type": "string", "format": "binary"}},
        "top_k": _top_k_schema(classes, settings.top_k)}}
    return {"post": {
        "tags": [TAG], "operationId": "transferkit__predict", "summary": "Classify uploaded images",
        "description": "One answer per image, in order: the best label, its score and the top-k labels.",
        "parameters": [{"name": "top_k", "in": "query", "required": False,
                        "schema": _top_k_schema(classes, settings.top_k)}, _model_parameter(names)],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}},
        "responses": {"200": _json({"type": "array", "items": _ref("PredictAnswer")}),
                      **_errors(400, 404, 413, 415, 429, 503, 504)}}}


def _explain_operation(settings: ServiceSettings, names: list[str]) -> dict:
    form = {"type": "object", "required": ["images"], "properties": {
        "images": {"type": "array", "minItems": 1, "maxItems": settings.max_images,
                   "description": "Image files; one for the PNG answer, any number (to the limit) for JSON",
                   "items": {"type": "string", "format": "binary"}}}}
    return {"post": {
        "tags": [TAG], "operationId": "transferkit__explain",
        "summary": "Where the model looked (class activation map)",
        "description": "The top class's activation map: a PNG overlay on the image the model saw (one image; the "
                       "label and score in X-Label and X-Score), or with format=json per image the label, score and "
                       "the map (raw and normalised to 0-1). 404 no_class_activation_map for a head without one.",
        "parameters": [{"name": "format", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": ["png", "json"], "default": "png"}},
                       _model_parameter(names)],
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": form}}},
        "responses": {"200": {"description": "The overlay (png) or the maps (json)", "content": {
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "array", "items": _ref("ExplainAnswer")}}}},
            **_errors(400, 404, 413, 415, 429, 503, 504)}}}


def _metadata_operation(names: list[str]) -> dict:
    return {"get": {"tags": [TAG], "operationId": "transferkit__metadata", "summary": "The served bundle and setup",
                    "description": "The bundle (name, version, classes, checksums), the backend and layout chosen "
                                   "and why, the limits and the runtime, and the list of every served model; "
                                   "where several are served and none is the default, the list alone.",
                    "parameters": [_model_parameter(names)],
                    "responses": {"200": _json(_ref("Metadata")), **_errors(400, 404, 503)}}}


def _path_parameters(model: Any, versioned: bool, served: list[str]) -> list[dict]:
    """``{name}`` (the served names, when known) and ``{version}``, with the default model's values as examples."""
    names = [("name", "The model's name", served[0] if served else None)]
    if versioned:
        names.append(("version", "The model's version", getattr(model, "version", None)))
    parameters = []
    for name, description, example in names:
        parameter: dict = {"name": name, "in": "path", "required": True, "description": description,
                           "schema": {"type": "string", **({"enum": served} if name == "name" and served else {})}}
        if example:
            parameter["example"] = example
        parameters.append(parameter)
    return parameters


def _infer_operation(operation_id: str, parameters: list[dict]) -> dict:
    header = {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
              "description": "Binary-data extension: the length of the JSON head; the tensors' bytes follow it",
              "schema": {"type": "integer", "minimum": 1}}
    example = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": [PNG_1X1]}],
               "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}]}
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"post": {
        "tags": [V2_TAG], "operationId": operation_id, "summary": "Classify (KServe v2 / Triton infer)",
        "description": "One input: 'images' (BYTES [N], base64 in JSON) or 'pixels' (UINT8 [N,S,S,3]). The output "
                       "'probabilities' is FP32 [N,C], or with parameters.classification = k, BYTES [N,k] "
                       "'score:index:label'.",
        "parameters": [*parameters, header],
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": _ref("InferRequest"), "example": example},
            "application/octet-stream": binary}},
        "responses": {"200": {"description": "OK", "content": {"application/json": {"schema": _ref("InferResponse")},
                                                               "application/octet-stream": binary}},
                      **_errors(400, 404, 413, 429, 503, 504)}}}


def _status_only(operation_id: str, summary: str, parameters: list[dict] | None = None,
                 extra: tuple[int, ...] = ()) -> dict:
    operation: dict = {"tags": [V2_TAG], "operationId": operation_id, "summary": summary,
                       "responses": {"200": {"description": "Yes"}, "503": {"description": "Not (yet, or any more)"},
                                     **{str(s): _json(_ref("TransferkitError"), ERRORS[s]) for s in extra}}}
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


def _v2_paths(model: Any, names: list[str]) -> dict:
    paths = {
        "/v2": {"get": {"tags": [V2_TAG], "operationId": "v2__server_metadata", "summary": "Server metadata",
                        "responses": {"200": _json(_ref("ServerMetadata"))}}},
        "/v2/health/live": _status_only("v2__live", "Is the server live?"),
        "/v2/health/ready": _status_only("v2__ready", "Is the server ready?"),
    }
    for prefix, versioned, key in (("/v2/models/{name}", False, "model"),
                                   ("/v2/models/{name}/versions/{version}", True, "model_version")):
        parameters = _path_parameters(model, versioned, names)
        paths[prefix] = {"get": {"tags": [V2_TAG], "operationId": f"v2__{key}_metadata", "summary": "Model metadata",
                                 "parameters": parameters,
                                 "responses": {"200": _json(_ref("ModelMetadata")), **_errors(404, 503)}}}
        paths[prefix + "/ready"] = _status_only(f"v2__{key}_ready", "Is the model ready?", parameters, (404,))
        paths[prefix + "/infer"] = _infer_operation(f"v2__{key}_infer", parameters)
    return paths


def document(get_entry: Callable[[], Any], settings: ServiceSettings) -> dict:
    """The fragment for service/http.py's app: every route, with the served models' names and the default model's
    version and class count filled in where they are known (not while ``bentoml build`` writes the bento's copy)."""
    try:
        models = get_entry().models
        names = models.names
        model = models.select(None).manifest if models.default else None
    except Exception:  # no service instance in this process (the build, the arbiter)
        names, model = [], None
    classes = len(model.class_names) if model is not None else None
    return {"paths": {"/predict": _predict_operation(settings, classes, names),
                      "/explain": _explain_operation(settings, names), "/metadata": _metadata_operation(names),
                      **_v2_paths(model, names)},
            "components": {"schemas": schemas(settings)}}


def _tensor(names: list[str], datatypes: list[str], with_data: bool) -> dict:
    properties: dict = {"name": {"type": "string", "enum": names},
                        "datatype": {"type": "string", "enum": datatypes},
                        "shape": {"type": "array", "maxItems": 8, "items": {"type": "integer", "minimum": -1}},
                        "parameters": {"type": "object", "properties": {
                            "binary_data_size": {"type": "integer", "minimum": 0}}}}
    if with_data:
        properties["data"] = {"type": "array", "items": {},
                              "description": "Row-major values, flat or nested: base64 strings for BYTES"}
    return {"type": "object", "required": ["name", "datatype", "shape"], "properties": properties}


def schemas(settings: ServiceSettings) -> dict:
    """The component schemas the operations refer to (names prefixed or specific: BentoML's own sit beside them)."""
    label = {"type": "object", "required": ["label", "score"],
             "properties": {"label": {"type": "string"}, "score": {"type": "number"}}}
    string_list = {"type": "array", "items": {"type": "string"}}
    return {
        "TransferkitError": {"type": "object", "required": ["error", "reason"], "properties": {
            "error": {"type": "string", "description": "One line for a person"},
            "reason": {"type": "string", "description": "Machine-readable, e.g. invalid_image, bad_top_k"}}},
        "ExplainAnswer": {"type": "object", "required": ["label", "score", "cam"], "properties": {
            "label": {"type": "string"}, "score": {"type": "number"},
            "cam": {"type": "object", "required": ["resolution", "values", "normalized"], "properties": {
                "resolution": {"type": "array", "items": {"type": "integer"}},
                "values": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                "normalized": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}}}}}},
        "PredictAnswer": {"type": "object", "required": ["label", "score", "top_k"], "properties": {
            "label": {"type": "string"}, "score": {"type": "number"},
            "top_k": {"type": "array", "items": label}}},
        "Metadata": {"type": "object", "additionalProperties": True, "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "backbone": {"type": "string"},
            "classes": string_list, "image_size": {"type": "integer"}, "backend": {"type": "string"},
            "top_k": {"type": "integer"}, "layout": {"type": "object", "additionalProperties": True},
            "limits": {"type": "object", "additionalProperties": True},
            "models": {"type": "array", "items": {"type": "object", "additionalProperties": True, "properties": {
                "name": {"type": "string"}, "version": {"type": "string", "nullable": True},
                "backend": {"type": "string", "nullable": True}, "state": {"type": "string", "nullable": True},
                "default": {"type": "boolean"}}}}}},
        "ServerMetadata": {"type": "object", "required": ["name", "version", "extensions"], "properties": {
            "name": {"type": "string"}, "version": {"type": "string"}, "extensions": string_list}},
        "ModelMetadata": {"type": "object", "required": ["name", "platform", "inputs", "outputs"], "properties": {
            "name": {"type": "string"}, "versions": string_list, "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _tensor(["images", "pixels"], ["BYTES", "UINT8"], False)},
            "outputs": {"type": "array", "items": _tensor(["probabilities", "cam"], ["FP32"], False)},
            "parameters": {"type": "object", "additionalProperties": True}}},
        "InferRequest": {"type": "object", "required": ["inputs"], "properties": {
            "id": {"type": "string", "maxLength": 1024},
            "parameters": {"type": "object", "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 1, "maxItems": 1,
                       "items": _tensor(["images", "pixels"], ["BYTES", "UINT8"], True)},
            "outputs": {"type": "array", "maxItems": 1, "items": {
                "type": "object", "required": ["name"], "properties": {
                    "name": {"type": "string", "enum": ["probabilities"]},
                    "parameters": {"type": "object", "properties": {
                        "classification": {"type": "integer", "minimum": 0,
                                           "description": "k > 0: the k best labels as 'score:index:label'"},
                        "binary_data": {"type": "boolean"}}}}}}}},
        "InferResponse": {"type": "object", "required": ["model_name", "outputs"], "properties": {
            "model_name": {"type": "string"}, "model_version": {"type": "string"}, "id": {"type": "string"},
            "outputs": {"type": "array", "items": _tensor(["probabilities", "cam"], ["FP32", "BYTES"], True)}}},
    }
