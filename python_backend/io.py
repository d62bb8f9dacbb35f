"""Reading and writing Triton tensors for kvrelay's Python-backend models (runs inside the stub).

Bad input raises BadInput, which the models turn into an INVALID_ARG response.
"""
from __future__ import annotations

import json
import threading

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from kvrelay.errors import KvRelayError
from kvrelay.kv_format import KVPages


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
            return (v.decode("utf-8") if isinstance(v, bytes) else str(v))
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
    if isinstance(value, torch.Tensor):
        return pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(value.contiguous()))
    if isinstance(value, str):
        return pb_utils.Tensor(name, np.array([value.encode()], dtype=np.object_))
    return pb_utils.Tensor(name, np.asarray(value))


def to_torch(t) -> torch.Tensor:
    return dlpack.from_dlpack(t.to_dlpack())


# --- pages as tensors: <prefix>_kv, <prefix>_e, <prefix>_tokens, <prefix>_meta ------------------

def pages_tensors(prefix: str, pages: KVPages | None, dtype: torch.dtype) -> list:
    """Pages as the <prefix>_* tensors of a model whose config declares its KV tensors as `dtype`."""
    if pages is None:  # every declared output present, empty: BLS callers read them uniformly
        empty = torch.zeros((0,), dtype=dtype)
        return [tensor(f"{prefix}_kv", empty), tensor(f"{prefix}_e", empty),
                tensor(f"{prefix}_tokens", np.zeros((0,), np.int32)), tensor(f"{prefix}_meta", "")]
    return [tensor(f"{prefix}_kv", pages.kv.to(dtype)), tensor(f"{prefix}_e", pages.e.to(dtype)),
            tensor(f"{prefix}_tokens", np.asarray(pages.tokens, np.int32)),
            tensor(f"{prefix}_meta", json.dumps(pages.meta()))]


def pages_from(source, prefix: str, get=None, copy: bool = False) -> KVPages | None:
    """Pages carried by a request or a BLS response (get = the by-name accessor for it). copy=True
    when they must outlive `source`: dlpack views point into its shared memory."""
    get = get or pb_utils.get_input_tensor_by_name
    meta_t = get(source, f"{prefix}_meta")
    if meta_t is None:
        return None
    meta_s = meta_t.as_numpy().reshape(-1)
    meta_s = meta_s[0].decode() if len(meta_s) and isinstance(meta_s[0], bytes) else (str(meta_s[0]) if len(meta_s) else "")
    if not meta_s:
        return None
    try:
        meta = json.loads(meta_s)
    except json.JSONDecodeError:
        raise BadInput(f"{prefix}_meta is not JSON") from None
    kv, e = to_torch(get(source, f"{prefix}_kv")), to_torch(get(source, f"{prefix}_e"))
    if copy:
        kv, e = kv.clone(), e.clone()
    toks = get(source, f"{prefix}_tokens").as_numpy().reshape(-1).tolist()
    return KVPages.from_parts(meta, toks, kv, e)


_SEND = threading.Lock()


def send(sender, response, flags: int = 0) -> None:
    """Every response of this stub goes out one at a time: concurrent sends from worker threads
    crash tritonserver 2.51's Python backend (seen with 16 concurrent streams)."""
    with _SEND:
        sender.send(response, flags=flags)


INTERNAL_PREFIXES = ("internal error:", "engine failure:")


def error_code(message: str):
    """Our failures are prefixed (INTERNAL_PREFIXES); every other refusal is the caller's input.
    Decided from the message because a BLS response's error code arrives as INTERNAL in 2.51."""
    internal = message.startswith(INTERNAL_PREFIXES)
    return pb_utils.TritonError.INTERNAL if internal else pb_utils.TritonError.INVALID_ARG


def error_response(message: str, code=None) -> "pb_utils.InferenceResponse":
    code = error_code(message) if code is None else code
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))


def send_error(sender, message: str, code=None) -> None:
    send(sender, error_response(message, code), pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
