import os

import torch

# Without a GPU, Triton kernels run through Triton's interpreter; the variable must
# be set before any kernel is defined (i.e. before loraplex.kernels is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The test models are tiny: one thread beats torch's intra-op pool, whose
# synchronisation costs more than the matmuls on a 2-core CI machine.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture
def host_buffer_pool(monkeypatch):
    """An empty pool of adapter host buffers (host_buffer.py) for this test: blocks freed or
    reserved by earlier tests in the process do not decide which memory a lease gets."""
    from loraplex.core.lora import host_buffer
    pool = host_buffer._Pool()
    monkeypatch.setattr(host_buffer, "_POOL", pool)
    return pool


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`tiny_checkpoint(arch="llama", **kwargs) -> Path`: a tiny HF checkpoint from
    tests/models.py make_tiny_checkpoint, built once per session for each set of arguments."""
    from models import make_tiny_checkpoint

    built: dict[tuple, object] = {}

    def get(arch: str = "llama", **kwargs):
        key = (arch, repr(sorted(kwargs.items())))
        if key not in built:
            built[key] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-{arch}"), arch, **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A tiny LLaVA checkpoint (tests/mm_models.py), built once per session."""
    from mm_models import make_tiny_llava
    return make_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="session")
def tiny_granite_speech(tmp_path_factory):
    """A tiny Granite Speech checkpoint (tests/mm_models.py), built once per session."""
    from mm_models import make_tiny_granite_speech
    return make_tiny_granite_speech(tmp_path_factory.mktemp("tiny-granite-speech"))
