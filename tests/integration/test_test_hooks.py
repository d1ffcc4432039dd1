"""The fault injection points (src/handoff/test_hook.h) are in the test build
baton-test-hooks only: the shipped binary does not even hold the names of the
BATON_TEST_* variables, so no environment can make it stop itself."""
import os

from conftest import BATON_BIN, BATON_HOOKS_BIN


def _strings(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_shipped_binary_has_no_hook_variables():
    assert os.access(BATON_HOOKS_BIN, os.X_OK), "build baton-test-hooks (meson target) for the fault injection tests"
    assert b"BATON_TEST_" not in _strings(BATON_BIN)
    assert b"BATON_TEST_HANDOFF_STOP_AT" in _strings(BATON_HOOKS_BIN)

