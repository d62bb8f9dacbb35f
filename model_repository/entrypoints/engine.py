from kvrelay.triton.engine_model import TritonPythonModel  # noqa: F401
