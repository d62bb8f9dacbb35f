from kvrelay.triton.orchestrator import TritonPythonModel  # noqa: F401
