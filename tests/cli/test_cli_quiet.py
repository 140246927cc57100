"""The CLI prints none of torch's own noise on a CPU machine. With the CUDA build of torch (pip's default) and no
GPU, importing torch.utils.cpp_extension, which builds the CPU kernels, warns "No CUDA runtime is found, using
CUDA_HOME=..." whenever it finds nvcc or CUDA_HOME; glm47 drops that one line (glm47/__init__.py)."""

import os
import subprocess
import sys

import torch

NOTE = "No CUDA runtime is found"


def run(args, cuda_home):
    # CUDA_HOME set: torch's CUDA build then finds a toolkit on every machine, as it does where nvcc is installed.
    env = {**os.environ, "CUDA_HOME": str(cuda_home)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600)


def test_torch_would_print_the_note_here_without_glm47():
    """The control: where torch is a CUDA build on a machine without a GPU, the note does appear without glm47
    (so that a reworded note cannot leave the test below passing for nothing)."""
    out = run(["-c", "import torch.utils.cpp_extension"], cuda_home=sys.prefix)
    if torch.version.cuda and not torch.cuda.is_available():
        assert NOTE in out.stderr
    else:
        assert NOTE not in out.stderr


def test_a_command_that_loads_the_model_prints_no_cuda_runtime_note(tmp_path):
    out = run(["-m", "glm47", "generate", "--raw", "--max-tokens", "1", "--seed", "0", "2 + 2 ="], cuda_home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert NOTE not in out.stderr
    # The kernels are built only on CPUs with AVX512-BF16: the import that warns, on every CPU.
    out = run(["-c", "import glm47, torch.utils.cpp_extension"], cuda_home=tmp_path)
    assert out.returncode == 0 and NOTE not in out.stderr, out.stderr
