from kvrelay.triton.tokenizer_models import Postprocessing as TritonPythonModel  # noqa: F401
