from kvrelay.triton.tokenizer_models import Preprocessing as TritonPythonModel  # noqa: F401
