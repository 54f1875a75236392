import pytest

from ratplus_titan.pattern import Pattern, resolve_patterns


@pytest.mark.parametrize("kwargs,field", [
    ({"dilation": 0}, "dilation"), ({"dilation": -2}, "dilation"),
    ({"local_window": -1}, "local_window"), ({"sinks": -3}, "sinks"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Pattern(**kwargs)


def test_parse_and_str_round_trip():
    for spec in ["dense", "d16w256s4", "d-1w128s4", "d64w0s0"]:
        assert str(Pattern.parse(spec)) == spec
    with pytest.raises(ValueError, match="d<dilation>w<window>s<sinks>"):
        Pattern.parse("16/256/4")


def test_per_layer_lists():
    patterns = resolve_patterns(3, [1, 16, 16], 256, [0, 4, 4])
    assert patterns == [Pattern(1, 256, 0), Pattern(16, 256, 4), Pattern(16, 256, 4)]
    with pytest.raises(ValueError, match="dilation has 2 values but the model has 3 layers"):
        resolve_patterns(3, [1, 16], 0, 0)
    with pytest.raises(ValueError, match=r"^dilation\[1\]=0 is invalid: allowed values are -1"):
        resolve_patterns(2, [1, 0], 0, 0)
    with pytest.raises(ValueError, match=r"^ratplus.sinks=-1 is invalid: allowed values are >= 0"):
        resolve_patterns(2, 1, 0, -1, "ratplus.")


def test_cache_rows_formula():
    assert Pattern(16, 256, 4).cache_rows(4096) == 4 + 256 + 256
    assert Pattern(-1, 256, 4).cache_rows(4096) == 260
    assert Pattern(1).cache_rows(4096) == 4096
    assert Pattern(64, 256, 4).cache_rows(100) == 100  # never more rows than tokens
