"""Reading and writing Triton tensors for kvrelay's Python-backend models (runs inside the stub).

Bad input raises BadInput, which the models turn into an INVALID_ARG response.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from kvrelay.errors import KvRelayError


class BadInput(KvRelayError):
    pass


def params(args: dict) -> dict:
    cfg = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}


def _get(request, name):
    return pb_utils.get_input_tensor_by_name(request, name)


def scalar(request, name, kind, default=None, required=False):
    t = _get(request, name)
    if t is None:
        if required:
            raise BadInput(f"input {name!r} is required")
        return default
    a = t.as_numpy()
    if a.size != 1:
        raise BadInput(f"input {name!r} must hold exactly one value, got shape {list(a.shape)}")
    v = a.reshape(-1)[0]
    try:
        if kind is str:
            return v.decode("utf-8") if isinstance(v, bytes) else str(v)
        if kind is bool:
            return bool(v)
        if kind is int:
            if not np.issubdtype(a.dtype, np.integer):
                raise BadInput(f"input {name!r} must be an integer tensor, got {a.dtype}")
            return int(v)
        if kind is float:
            if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
                raise BadInput(f"input {name!r} must be numeric, got {a.dtype}")
            return float(v)
    except UnicodeDecodeError:
        raise BadInput(f"input {name!r} is not valid UTF-8") from None
    raise TypeError(kind)


def strings(request, name) -> list[str]:
    t = _get(request, name)
    if t is None:
        return []
    try:
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in t.as_numpy().reshape(-1)]
    except UnicodeDecodeError:
        raise BadInput(f"input {name!r} is not valid UTF-8") from None


def ints(request, name, required=False) -> list[int]:
    t = _get(request, name)
    if t is None:
        if required:
            raise BadInput(f"input {name!r} is required")
        return []
    a = t.as_numpy()
    if not np.issubdtype(a.dtype, np.integer):
        raise BadInput(f"input {name!r} must be an integer tensor, got {a.dtype}")
    return a.reshape(-1).astype(np.int64).tolist()


def tensor(name, value) -> "pb_utils.Tensor":
    if isinstance(value, str):
        return pb_utils.Tensor(name, np.array([value.encode()], dtype=np.object_))
    return pb_utils.Tensor(name, np.asarray(value))


_SEND = threading.Lock()


def send(sender, response, flags: int = 0) -> None:
    """Every response of this stub goes out one at a time: concurrent sends from worker threads
    crashed tritonserver 2.51's Python backend (seen with 16 concurrent streams)."""
    with _SEND:
        if response is None:
            sender.send(flags=flags)
        else:
            sender.send(response, flags=flags)


def error_response(message: str, code=None) -> "pb_utils.InferenceResponse":
    """INVALID_ARG unless told otherwise: a refusal of the caller's input."""
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code or pb_utils.TritonError.INVALID_ARG))


def send_error(sender, message: str, code=None) -> None:
    send(sender, error_response(message, code), pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
