"""Test set-up shared by every test module.

Runs before any test imports JAX or Keras, so that:
- JAX sees 8 simulated CPU devices (for the distribution tests) and
  compiles without LLVM optimisation (faster for tiny programs);
- JAX keeps compiled programs in a persistent cache between runs;
- no test can reach the network (only loopback connections are allowed).
"""

import os
import socket

os.environ.setdefault("KERAS_BACKEND", "jax")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
# The tests run tiny programs a few times each, so XLA's compilation is
# most of their time; without LLVM's optimisation passes it costs about a
# quarter less CPU time (measured on three of the slowest JAX test files:
# 151 -> 113 CPU seconds, same results).
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TFDS_DISABLE_GCS", "1")
os.environ.setdefault("NO_GCE_CHECK", "true")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_JAX_CACHE = os.path.join(_ROOT, ".jax_cache")

import pytest  # noqa: E402

_real_connect = socket.socket.connect


def _loopback_only_connect(sock, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and (
        host in ("localhost", "::1") or host.startswith("127.")
    ):
        return _real_connect(sock, address)
    if sock.family == getattr(socket, "AF_UNIX", None):
        return _real_connect(sock, address)
    raise OSError(f"Network access is disabled in tests (tried {address!r}).")


socket.socket.connect = _loopback_only_connect

if os.environ["KERAS_BACKEND"] == "jax":
    import jax

    jax.config.update("jax_compilation_cache_dir", _JAX_CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with a fresh Keras session and a float32 policy."""
    import keras

    keras.config.set_dtype_policy("float32")
    # free_memory=False skips a full gc.collect() per test (~0.5 s each).
    keras.utils.clear_session(free_memory=False)
    yield
    keras.config.set_dtype_policy("float32")
