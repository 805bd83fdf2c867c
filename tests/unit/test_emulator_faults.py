"""Fault settings are checked before they take effect."""

from __future__ import annotations

import pytest

from emulator.faults import FaultError, Faults


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"failure_rat": 0.1}, "unknown fault 'failure_rat'"),
        ({"failure_rate": 1.5}, "failure_rate must be in 0..1"),
        ({"drop_rate": -0.1}, "drop_rate must be in 0..1"),
        ({"latency_s": -1}, "latency_s must be >= 0"),
        ({"latency_s": "fast"}, "latency_s must be a number"),
        ({"submit_error_status": 404}, "submit_error_status must be 429 or a 5xx"),
        ({"webhook_retries": 1.5}, "webhook_retries must be an integer"),
        ({"duplicate_new_id": 1}, "duplicate_new_id must be a boolean"),
        ({"fail_models": "x"}, "fail_models must be a list of strings"),
        ({"latency_s": None}, "latency_s may not be null"),
    ],
)
def test_bad_fault_is_refused_by_name(changes: dict[str, object], named: str) -> None:
    """Each bad setting raises FaultError naming the setting."""
    with pytest.raises(FaultError, match=named.replace("(", r"\(").replace(".", r"\.")):
        Faults().updated(changes)


def test_update_is_all_or_nothing() -> None:
    """A batch with one bad value changes nothing."""
    faults = Faults()
    with pytest.raises(FaultError):
        faults.updated({"latency_s": 3.0, "drop_rate": 9})
    assert faults.latency_s == Faults().latency_s


def test_update_coerces_and_keeps_others() -> None:
    """Integral floats become ints, optional values accept null, the rest stays."""
    faults = Faults().updated({"webhook_retries": 5.0, "output_ttl_s": None, "fail_models": ["m"]})
    assert faults.webhook_retries == 5 and faults.output_ttl_s is None
    assert faults.fail_models == ("m",) and faults.latency_s == Faults().latency_s
