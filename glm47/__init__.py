"""glm47: a readable, fast, from-scratch implementation of GLM-4.7 (model, prompt format, engine, serving)."""

import logging

from glm47.config import PRESETS, ModelConfig, preset

__version__ = "0.1.0"


class _NoCudaRuntimeNote(logging.Filter):
    """Importing torch.utils.cpp_extension, which builds the CPU kernels (glm47.kernels), makes the CUDA build of
    torch warn "No CUDA runtime is found, using CUDA_HOME=..." on a machine without a GPU that has nvcc or
    CUDA_HOME: noise for a CPU build, printed by every command that loads a model. Only that line is dropped. It is
    set here, before anything imports torch: set later (beside the build in glm47.kernels), it did not take with
    torch 2.14.1's CUDA build (tests/cli/test_cli_quiet.py failed there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")


logging.getLogger("torch.utils.cpp_extension").addFilter(_NoCudaRuntimeNote())


def load_model(path, dtype="bfloat16", device="cpu", **kwargs):
    """Loads a checkpoint directory into a `Glm4MoeForCausalLM` (see glm47.checkpoint.loader.load_model)."""
    from glm47.checkpoint.loader import load_model as _load

    return _load(path, dtype=dtype, device=device, **kwargs)


def __getattr__(name: str):
    # The engine's front door, imported on first use so that `import glm47` stays light (no torch).
    if name == "LLM":
        from glm47.llm import LLM

        return LLM
    if name == "SamplingParams":
        from glm47.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'glm47' has no attribute {name!r}")


__all__ = ["ModelConfig", "PRESETS", "preset", "load_model", "LLM", "SamplingParams", "__version__"]
