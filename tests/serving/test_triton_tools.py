"""What Triton's own tools send (genai-perf 0.0.16 through perf_analyzer, tensorrtllm_backend
clients), replayed exactly over gRPC streaming and HTTP against a real server: every entry point
answers, names the variant, honours what it can and refuses the rest with INVALID_ARG."""

import json
import queue
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

TYPES = {bool: ("BOOL", np.bool_), int: ("INT32", np.int32), str: ("BYTES", np.object_)}


def genai_perf_entry(model: str, max_tokens=6, streaming=True, deterministic=True) -> dict:
    """One entry of genai-perf's input file for `--endpoint-type kserve --backend tensorrtllm`
    (genai_perf/inputs/converters/tensorrtllm_converter.py): perf_analyzer sends each key whose name
    is an input of the model, shaped by the model's config. "model" is a bare string there, which
    perf_analyzer refuses as malformed if the model has an input of that name."""
    e = {
        "model": model,
        "text_input": ["Explain what a page store is."],
        "max_tokens": [max_tokens],
        "exclude_input_in_output": [True],
    }
    if streaming:
        e["stream"] = [True]
    if deterministic:
        e["min_length"] = [max_tokens]
    return e


def grpc_stream(server, model: str, entry: dict, only_inputs=True) -> list:
    """perf_analyzer -i grpc --streaming: one request on a gRPC stream; every response. Like
    perf_analyzer, it sends only the entry's keys that are inputs of the model."""
    q = queue.Queue()
    c = grpcclient.InferenceServerClient(server.grpc_url)
    names = {i.name for i in c.get_model_metadata(model).inputs}
    inputs = []
    for name, v in entry.items():
        if only_inputs and name not in names:
            continue
        assert isinstance(v, list), f"perf_analyzer refuses {name!r}: a bare string for an input of {model!r}"
        (v,) = v
        dt, np_t = TYPES[type(v)]
        i = grpcclient.InferInput(name, [1], dt)
        i.set_data_from_numpy(np.array([v.encode() if isinstance(v, str) else v], dtype=np_t))
        inputs.append(i)
    c.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        c.async_stream_infer(model, inputs, enable_empty_final_response=True)
        out = []
        while True:
            r, e = q.get(timeout=60)
            if e is not None:
                return [e]
            if r.as_numpy("text_output") is not None:
                out.append(r)
            if r.get_response().parameters["triton_final_response"].bool_param:
                return out
    finally:
        c.stop_stream()
        c.close()


def text(r) -> str:
    return r.as_numpy("text_output").reshape(-1)[0].decode()


@pytest.mark.parametrize(
    "model,streaming",
    [("ensemble", False), ("ensemble", True), ("ensemble_stream", True), ("code", False), ("code", True)],
)
def test_genai_perf_requests_are_answered_on_every_entry_point(server, model, streaming):
    out = grpc_stream(server, model, genai_perf_entry(model, streaming=streaming))
    assert out and not isinstance(out[0], Exception), out
    last = out[-1]
    assert int(last.as_numpy("output_tokens")[0]) == 6  # min_length = max_tokens: exactly 6
    assert last.as_numpy("variant")[0].decode() == ("code" if model == "code" else "base")
    if streaming and model != "ensemble":
        assert len(out) == 6  # token by token
    else:
        assert len(out) == 1


def post(server, model: str, body: dict, stream=False):
    req = urllib.request.Request(
        f"http://{server.http_url}/v2/models/{model}/generate{'_stream' if stream else ''}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            raw = r.read().decode()
            return r.status, [
                json.loads(x[5:]) for x in raw.splitlines() if x.startswith("data:")
            ] if stream else json.loads(raw)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_variant_is_its_own_http_model_and_says_who_answered(server):
    body = {"text_input": "What is a block?", "max_tokens": 4, "exclude_input_in_output": True, "min_length": 4}
    status, d = post(server, "code", body)
    assert status == 200 and d["variant"] == "code" and d["output_tokens"] == 4, d
    status, events = post(server, "code", {**body, "stream": True}, stream=True)
    assert status == 200 and len(events) == 4 and events[-1]["variant"] == "code"
    status, d = post(server, "ensemble", {"text_input": "What is a block?", "max_tokens": 2})
    assert status == 200 and d["variant"] == "base", d  # no model given: the first variant


@pytest.mark.parametrize(
    "extra,msg",
    [
        ({"beam_width": 2}, "beam_width must be 1"),
        ({"exclude_input_in_output": False}, "exclude_input_in_output must be true"),
        ({"return_log_probs": True}, "return_log_probs is not supported"),
        ({"min_length": 9}, "min_length must be in 0..max_tokens (4)"),
        ({"top_k": -1}, "top_k must be >= 0"),
        ({"bad_words": "x" * 5000}, "bad_words: at most 64 words of 4096 characters"),
    ],
)
def test_what_cannot_be_honoured_is_refused_the_same_on_http_and_grpc(server, extra, msg):
    body = {"text_input": "hi", "max_tokens": 4, **extra}
    status, d = post(server, "code", body)
    assert status == 400 and msg in d["error"], d
    out = grpc_stream(server, "code", {k: [v] for k, v in body.items()}, only_inputs=False)
    assert len(out) == 1 and isinstance(out[0], Exception) and msg in str(out[0]), out


def test_top_k_and_pad_id_and_end_id_are_accepted(server):
    status, d = post(
        server, "ensemble", {"text_input": "hi", "max_tokens": 3, "top_k": 5, "pad_id": 0, "end_id": 2, "beam_width": 1}
    )
    assert status == 200 and d["variant"] == "base" and d["output_tokens"] <= 3, d


def test_no_entry_point_has_a_model_input_for_perf_analyzer_to_fill(server):
    """genai-perf writes {"model": "ensemble", ...} (a bare string) into perf_analyzer's input file: a
    `model` input on the entry point would make perf_analyzer refuse the file as malformed. `ensemble`
    takes the variant as `variant_name`."""
    c = grpcclient.InferenceServerClient(server.grpc_url)
    for entry in ("ensemble", "ensemble_stream", "code"):
        assert "model" not in {i.name for i in c.get_model_metadata(entry).inputs}, entry
    assert "variant_name" in {i.name for i in c.get_model_metadata("ensemble").inputs}
    assert "variant_name" not in {i.name for i in c.get_model_metadata("code").inputs}
    c.close()


def test_ensemble_serves_the_variant_it_is_asked_for_on_http_and_grpc(server):
    status, d = post(server, "ensemble", {"text_input": "hi", "max_tokens": 2, "variant_name": "code"})
    assert status == 200 and d["variant"] == "code", d
    out = grpc_stream(server, "ensemble_stream", {"text_input": ["hi"], "max_tokens": [2], "variant_name": ["code"]})
    assert out and out[-1].as_numpy("variant")[0].decode() == "code", out
    status, d = post(server, "ensemble", {"text_input": "hi", "max_tokens": 2, "variant_name": "nope"})
    assert status == 400 and "unknown model 'nope'" in d["error"], d
