"""The public names: what `kerb_jupyter` exports, and errors that show their public path in tracebacks."""

from __future__ import annotations

import kerb_jupyter
from kerb_jupyter.core import errors


def test_all_is_the_error_tree_and_the_version():
    assert sorted(kerb_jupyter.__all__) == sorted([*errors.__all__, "__version__"])
    for name in errors.__all__:
        cls = getattr(kerb_jupyter, name)
        assert cls.__module__ == "kerb_jupyter" and issubclass(cls, kerb_jupyter.KerbJupyterError)


def test_error_codes_are_stable_and_distinct():
    codes = {getattr(errors, n).code for n in errors.__all__}
    assert len(codes) == len(errors.__all__)
    assert {"no_ticket", "ticket_expired", "kdc_unreachable", "unknown_cluster", "config_error"} <= codes
