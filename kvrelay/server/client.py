"""A small Triton client for kvrelay's ensemble (HTTP and gRPC, one-shot and streaming)."""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import numpy as np

from kvrelay.errors import KvRelayError

INT_OUTPUTS = ("kv_reused_layers", "kv_recomputed_layers", "kv_reused_tokens", "output_tokens", "first_token_time_ns")
STR_OUTPUTS = ("kv_donor_model", "kv_route", "variant")


@dataclass
class Result:
    text: str
    info: dict = field(default_factory=dict)
    latency_s: float = 0.0
    ttft_s: float | None = None  # streaming only: time to the first token at the client
    chunks: int = 0


def _inputs(
    mod,
    text,
    max_tokens,
    model=None,
    context=None,
    stream=None,
    temperature=None,
    top_p=None,
    seed=None,
    stop_words=None,
    request_id=None,
    tenant=None,
    lora_path=None,
):
    def inp(name, value, dtype):
        arr = np.array(value if isinstance(value, list) else [value], dtype=dtype)
        i = mod.InferInput(
            name,
            list(arr.shape),
            {np.object_: "BYTES", np.int32: "INT32", np.int64: "INT64", np.float32: "FP32", np.bool_: "BOOL"}[dtype],
        )
        i.set_data_from_numpy(arr)
        return i

    out = [inp("text_input", text.encode(), np.object_), inp("max_tokens", max_tokens, np.int32)]
    for name, v, dt in (
        ("variant_name", model, np.object_),
        ("context", context, np.object_),
        ("stream", stream, np.bool_),
        ("temperature", temperature, np.float32),
        ("top_p", top_p, np.float32),
        ("random_seed", seed, np.int64),
        ("request_id", request_id, np.object_),
        ("tenant", tenant, np.object_),
        ("lora_path", lora_path, np.object_),
    ):
        if v is not None:
            out.append(inp(name, v.encode() if isinstance(v, str) else v, dt))
    if stop_words:
        out.append(inp("stop_words", [w.encode() for w in stop_words], np.object_))
    return out


def _info(res) -> dict:
    info = {}
    for n in INT_OUTPUTS:
        a = res.as_numpy(n)
        if a is not None:
            info[n] = int(a.reshape(-1)[0])
    for n in STR_OUTPUTS:
        a = res.as_numpy(n)
        if a is not None:
            v = a.reshape(-1)[0]
            info[n] = v.decode() if isinstance(v, bytes) else str(v)
    return info


def _text(res) -> str:
    v = res.as_numpy("text_output").reshape(-1)[0]
    return v.decode() if isinstance(v, bytes) else str(v)


def infer(url: str, text: str, max_tokens: int, protocol: str = "http", timeout_s: float = 300, **kw) -> Result:
    """One request to `ensemble`, one response."""
    mod = _module(protocol)
    t0 = time.perf_counter()
    c = (
        mod.InferenceServerClient(url, network_timeout=timeout_s)
        if protocol == "http"
        else mod.InferenceServerClient(url)
    )
    try:
        res = (
            c.infer("ensemble", _inputs(mod, text, max_tokens, **kw), client_timeout=timeout_s)
            if protocol == "grpc"
            else c.infer("ensemble", _inputs(mod, text, max_tokens, **kw))
        )
    except Exception as e:
        raise KvRelayError(_explain(url, protocol, _message(e))) from None
    finally:
        c.close()
    return Result(_text(res), _info(res), time.perf_counter() - t0)


def stream(url: str, text: str, max_tokens: int, on_text=None, timeout_s: float = 300, **kw) -> Result:
    """Streaming over gRPC to `ensemble_stream`: tokens as they come; TTFT measured at the client."""
    import tritonclient.grpc as grpcclient

    q: queue.Queue = queue.Queue()
    c = grpcclient.InferenceServerClient(url)
    t0 = time.perf_counter()
    ttft, parts, info, chunks = None, [], {}, 0
    try:
        c.start_stream(callback=lambda result, error: q.put((result, error)))
        try:
            c.async_stream_infer(
                "ensemble_stream",
                _inputs(grpcclient, text, max_tokens, stream=True, **kw),
                enable_empty_final_response=True,
            )
        except Exception:  # the stream already failed: its cause comes through the callback
            pass
        while True:
            try:
                res, err = q.get(timeout=timeout_s)
            except queue.Empty:
                raise KvRelayError(f"no response within {timeout_s}s") from None
            if err is not None:
                raise KvRelayError(_explain(url, "grpc", _message(err)))
            resp = res.get_response()
            if res.as_numpy("text_output") is not None:
                piece = _text(res)
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(piece)
                chunks += 1
                info = _info(res)
                if on_text:
                    on_text(piece)
            if resp.parameters.get("triton_final_response") and resp.parameters["triton_final_response"].bool_param:
                break
    finally:
        c.stop_stream()
        c.close()
    return Result("".join(parts), info, time.perf_counter() - t0, ttft, chunks)


def _module(protocol: str):
    if protocol == "http":
        import tritonclient.http as m
    elif protocol == "grpc":
        import tritonclient.grpc as m
    else:
        raise KvRelayError(f"protocol must be http or grpc, got {protocol!r}")
    return m


UNREACHABLE = ("Connection refused", "failed to connect", "Name or service not known", "Failed to connect")


def _explain(url: str, protocol: str, message: str) -> str:
    """A refused connection says where we looked and what to do, not just errno 111."""
    if any(u in message for u in UNREACHABLE):
        return (
            f"no kvrelay server answers at {url} ({protocol.upper()}); start one with `kvrelay serve` "
            f"or give its address with --url"
        )
    return message


def _message(e) -> str:
    return getattr(e, "message", lambda: str(e))() if callable(getattr(e, "message", None)) else str(e)
