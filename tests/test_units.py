"""units.si: the one SI-prefix formatter (cost tables: compact counts; bench: rates with a unit)."""
import pytest

from vggkit.units import si


@pytest.mark.parametrize("value,kwargs,text", [
    (3.14e12, {"unit": "FLOP/s"}, "3.1 TFLOP/s"),
    (528.1e9, {"unit": "FLOP/s"}, "528.1 GFLOP/s"),
    (512_160_000, {"digits": 2, "space": False}, "512.16M"),
    (40_960, {"digits": 2, "space": False}, "40.96K"),
    (999, {"digits": 2, "space": False}, "999"),
    (0, {"digits": 2, "space": False}, "0"),
    (12.5, {"unit": "FLOP/s"}, "12.5 FLOP/s"),
    (-2e6, {"unit": "B"}, "-2.0 MB"),
])
def test_si(value, kwargs, text):
    assert si(value, **kwargs) == text
