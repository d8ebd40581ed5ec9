import os

# Nothing in the test suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Shared CPUs: OpenMP threads sleep instead of spinning when they wait (set before torch is imported; the
# subprocesses of the tests inherit it). The trainer's CLI does the same unless the user chose otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Under pytest-xdist (`pytest -n 2`, the README's command) each worker takes one core: one OpenMP thread per
# worker, or two workers' threads contend for the same cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# Without a GPU, every Triton kernel runs under Triton's interpreter on CPU tensors: the kernel tests and the
# trainer tests exercise the real kernel code. This must happen before anything imports triton.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

# On a GPU host the in-process runs with deterministic=true go to CUDA, where deterministic cuBLAS needs this set
# before the first cuBLAS handle exists (the trainer sets it too, but a handle may predate it in this process).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_collection_modifyitems(config, items):
    """The default run (the README's test command) leaves out the tests marked `slow` (multi-process runs, benchmark
    scripts end to end) so it stays within minutes on two cores; `-m slow` runs exactly them (`.ci/run` runs both), any
    `-m` expression decides for itself, and a test named by its node id always runs."""
    if config.getoption("markexpr") or any("::" in arg for arg in config.args):
        return
    slow = [item for item in items if item.get_closest_marker("slow")]
    if slow:
        config.hook.pytest_deselected(items=slow)
        items[:] = [item for item in items if not item.get_closest_marker("slow")]
