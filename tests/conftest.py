import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests import their helpers (factories) by module name

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for the whole module (the planted-signal tests: fast and reproducible on a shared machine)."""
    from task_factories import single_thread

    with single_thread():
        yield


@pytest.fixture(scope="module")
def planted(one_thread):
    """The planted-signal model (task_factories.planted_signal_model, seed 0), built once per module."""
    from task_factories import planted_signal_model

    return planted_signal_model(0)
