"""The host-memory policy: freed blocks are reused instead of mapped and page-faulted again.

Each case runs in a fresh interpreter: the policy is process-wide and acts on later allocations.
"""

import platform
import subprocess
import sys
import textwrap

import pytest

from segnn_jax import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Allocates, touches and frees a 64 MB block twice (the size of a training step's scratch buffer,
# above glibc's largest mmap threshold) and prints the minor page faults of the second round,
# the one that can reuse the first round's pages. Threads stand in for XLA's worker threads.
_SCRIPT = textwrap.dedent("""
    import ctypes, importlib.util, resource, threading
    spec = importlib.util.spec_from_file_location("host_memory", {path!r})
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # by its file: importing segnn_jax would import JAX
    applied = module.retain_freed_memory() if {apply} else False
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 << 20
    faults = []

    def allocate_and_touch():
        block = libc.malloc(size)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        ctypes.memset(block, 1, size)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        libc.free(block)

    for _ in range(2):
        thread = threading.Thread(target=allocate_and_touch)
        thread.start()
        thread.join()
    print(applied, faults[1])
""")


def _second_round_faults(apply: bool, env=None) -> tuple:
    script = _SCRIPT.format(path=host_memory.__file__, apply=apply)
    done = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, check=True, env=env)
    applied, faults = done.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the policy applies to glibc's malloc only")
def test_retained_memory_is_reused_without_page_faults():
    pages = (64 << 20) // 4096
    applied, faults = _second_round_faults(apply=True)
    assert applied
    assert faults < pages // 100  # reused: no fresh pages
    # The default policy maps and unmaps the block, so every page faults again: the test can tell.
    applied, faults = _second_round_faults(apply=False)
    assert not applied
    assert faults > pages // 2


@pytest.mark.skipif(not GLIBC, reason="the policy applies to glibc's malloc only")
def test_environment_variable_keeps_the_default_policy():
    import os

    env = dict(os.environ, **{host_memory.DISABLE_VARIABLE: "1"})
    applied, faults = _second_round_faults(apply=True, env=env)
    assert not applied
    assert faults > (64 << 20) // 4096 // 2


def test_elsewhere_it_reports_not_applied(monkeypatch):
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.retain_freed_memory() is False


def test_entry_points_apply_it_only_on_request(monkeypatch):
    """The segnn command and the benchmarks call retain_freed_memory_if_requested: glibc's
    default unless SEGNN_RETAIN_FREED_MEMORY=1."""
    calls = []
    monkeypatch.setattr(host_memory, "_applied", False)
    monkeypatch.setattr(host_memory, "retain_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.delenv(host_memory.REQUEST_VARIABLE, raising=False)
    assert host_memory.retain_freed_memory_if_requested() is False
    monkeypatch.setenv(host_memory.REQUEST_VARIABLE, "0")
    assert host_memory.retain_freed_memory_if_requested() is False
    assert calls == []
    monkeypatch.setenv(host_memory.REQUEST_VARIABLE, "1")
    assert host_memory.retain_freed_memory_if_requested() is True
    assert calls == [1]
