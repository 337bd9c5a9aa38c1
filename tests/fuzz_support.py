"""Shared machinery of the fuzz tests (tests/test_fuzz_*.py): budgets, mutations, oracles, counts.

Budgets. Hypothesis profiles: ``segnn-default`` (a small example budget, every test run) and
``segnn-large`` (the large campaign), chosen with ``SEGNN_FUZZ=large`` in the environment. The
default profile is derandomised: every run of the default suite draws the same examples, so a
commit passes or fails the same way each time. The large campaign explores new inputs, its draws
differ from run to run::

    SEGNN_FUZZ=large python -m pytest -m "not slow" -p no:randomly tests/test_fuzz_*.py

Tests that only make sense with a large budget (many subprocesses) carry ``@pytest.mark.fuzz`` and
are excluded by default like ``slow``: ``-m fuzz`` runs them.

Oracle. :func:`check_reader` calls a reader on one (mutated) input: it must either return a result
that passes the test's validity check, or raise one of the reader's documented exceptions with a
message naming the file; anything else (KeyError, IndexError, UnicodeDecodeError, ...) fails the
test, and so does an example running longer than :data:`HANG_SECONDS` (no hangs).

Counts. With ``SEGNN_FUZZ_LOG=<file.jsonl>`` every checked example appends one line
``{"target", "outcome"}`` (outcome "accepted" or the exception type), from which
``benchmarks/reliability.py`` builds the reliability table.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LARGE = os.environ.get("SEGNN_FUZZ", "") == "large"
DEFAULT_EXAMPLES = 25
LARGE_EXAMPLES = int(os.environ.get("SEGNN_FUZZ_EXAMPLES", "400"))
# Generous: the shared 2-core machine is loaded; a healthy example takes milliseconds.
HANG_SECONDS = 60

_COMMON = {"deadline": None, "database": None, "print_blob": True,
               "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.function_scoped_fixture,
                                      HealthCheck.filter_too_much]}
settings.register_profile("segnn-default", max_examples=DEFAULT_EXAMPLES, derandomize=True,
                          **_COMMON)
settings.register_profile("segnn-large", max_examples=LARGE_EXAMPLES, **_COMMON)
settings.load_profile("segnn-large" if LARGE else "segnn-default")


def budget(scale: float = 1.0) -> settings:
    """Settings of the active profile with ``max_examples`` scaled (for expensive targets)."""
    n = LARGE_EXAMPLES if LARGE else DEFAULT_EXAMPLES
    return settings(max_examples=max(3, int(n * scale)))


class Hang(BaseException):
    """An example ran past HANG_SECONDS. A BaseException, so readers' ``except Exception`` cannot
    swallow it."""


@contextlib.contextmanager
def no_hang(seconds: float = HANG_SECONDS):
    def alarm(signum, frame):
        raise Hang(f"no result after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def record(target: str, outcome: str) -> None:
    path = os.environ.get("SEGNN_FUZZ_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"target": target, "outcome": outcome}) + "\n")


def check_reader(target: str, read: Callable[[], Any], documented: tuple[type[BaseException], ...],
                 names: Sequence[str], validate: Callable[[Any], None] | None = None) -> Any:
    """Runs ``read()``; returns its result (validated) or None after a documented exception.

    Args:
        target: name of the reader or builder, for the counts.
        read: the call under test.
        documented: exceptions the reader documents for bad input.
        names: the exception message must contain one of these (the file's path or name).
        validate: called on a result; raises AssertionError if the result is wrong.
    """
    try:
        with no_hang():
            result = read()
    except documented as error:
        message = str(error)
        assert any(name in message for name in names), (
            f"{type(error).__name__} does not name the file ({names}): {message}")
        assert len(message) > len(min(names, key=len)) + 5, f"message says nothing: {message!r}"
        record(target, type(error).__name__)
        return None
    if validate is not None:
        validate(result)
    record(target, "accepted")
    return result


# ------------------------------------------------------------------------------------------------
# Mutations of valid fixtures


@st.composite
def mutated_bytes(draw, data: bytes, max_ops: int = 4) -> bytes:
    """``data`` after 1..max_ops random edits: byte flips, truncation, garbage insertion, deletion,
    duplication of a chunk, or a run of zero bytes."""
    data = bytearray(data)
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "duplicate", "zero"]))
        n = len(data)
        # Drawn independently of the length, so that inputs whose size varies from run to run
        # (a cache file naming a temporary folder) still replay deterministically.
        pos = draw(st.integers(0, 2**31)) % max(n, 1)
        if op == "flip" and n:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete" and n:
            del data[pos:pos + draw(st.integers(1, 64))]
        elif op == "duplicate" and n:
            chunk = data[pos:pos + draw(st.integers(1, 256))]
            data[pos:pos] = chunk
        elif op == "zero" and n:
            length = draw(st.integers(1, 64))
            data[pos:pos + length] = bytes(len(data[pos:pos + length]))
    return bytes(data)


_TOKENS = ["", " ", "\t", "0", "-1", "1e309", "nan", "inf", "-0.0", "1.5*^-3", "9" * 25, "gdb",
           "H", "Xx", "é", "\x00", ",", '"', "[", "]", "'", "\n", "2147483648", "-2147483649"]


@st.composite
def mutated_text(draw, text: str, max_ops: int = 3) -> bytes:
    """``text`` (UTF-8 encoded) after line and token level edits (delete, duplicate or swap lines,
    replace a whitespace or comma separated token by a nasty one), sometimes also byte edits."""
    lines = text.split("\n")
    for _ in range(draw(st.integers(1, max_ops))):
        op = draw(st.sampled_from(["token", "token", "delete_line", "duplicate_line", "swap_lines",
                                   "random_line"]))
        i = draw(st.integers(0, 2**31)) % max(len(lines), 1)
        if op == "token" and lines:
            sep = "," if "," in lines[i] else ("\t" if "\t" in lines[i] else " ")
            tokens = lines[i].split(sep)
            j = draw(st.integers(0, 2**31)) % len(tokens)
            tokens[j] = draw(st.sampled_from(_TOKENS) | st.text(max_size=8))
            lines[i] = sep.join(tokens)
        elif op == "delete_line" and lines:
            del lines[i]
        elif op == "duplicate_line" and lines:
            lines.insert(i, lines[i])
        elif op == "swap_lines" and len(lines) > 1:
            j = draw(st.integers(0, 2**31)) % len(lines)
            lines[i], lines[j] = lines[j], lines[i]
        elif op == "random_line":
            lines.insert(i, draw(st.text(max_size=40)))
    data = "\n".join(lines).encode("utf-8", errors="surrogatepass")
    if draw(st.booleans()):
        data = draw(mutated_bytes(data, max_ops=2))
    return data
