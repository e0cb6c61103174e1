"""CrossbarSpec limits, hand-worked: accepted at each limit, refused one past it with the field named."""
import pytest

from psq_tvm.core.crossbar import CrossbarSpec, SpecError, parse_bits, preset


@pytest.mark.parametrize("ok, bad, needle", [
    ({"rows": 65536}, {"rows": 65537}, "rows/cols above 65536 are not supported, got 65537x128"),
    ({"cols": 65536}, {"cols": 65537}, "rows/cols above 65536 are not supported, got 128x65537"),
    ({"cell_bits": 8}, {"cell_bits": 9}, "cell_bits must be 1..8, got 9"),
    ({"dac_bits": 8, "act_bits": 8}, {"dac_bits": 9, "act_bits": 8}, r"dac_bits \(9\) cannot exceed act_bits \(8\)"),
    ({"act_bits": 16}, {"act_bits": 17}, "act_bits must be 1..16, got 17"),
    ({"adc_bits": 32}, {"adc_bits": 33}, "adc_bits must be 1..32 or None"),
    ({"adc_bits": 1}, {"adc_bits": 0}, "adc_bits must be 1..32 or None"),
    ({"weight_bits": (2, 16)}, {"weight_bits": (2, 17)}, "weight bitwidth 17 is outside 2..16"),
    ({"weight_bits": (2,)}, {"weight_bits": (1, 4)}, r"bitwidth 1 is outside 2..16 \(1-bit symmetric levels hold only 0; use"),
    ({"baseline_bits": 16}, {"baseline_bits": 17}, "weight bitwidth 17 is outside 2..16"),
    ({"rows": 1}, {"rows": True}, "rows must be a positive integer, got True"),
    ({"cols": 1}, {"cols": 2.0}, "cols must be a positive integer, got 2.0"),
])
def test_limits(ok, bad, needle):
    spec = preset(**ok)
    for k, v in ok.items():
        assert getattr(spec, k) == v
    with pytest.raises(SpecError, match=needle):
        preset(**bad)


def test_weight_bits_are_sorted_and_unique():
    assert CrossbarSpec(weight_bits=[8, 2, 4, 4]).weight_bits == (2, 4, 8)
    assert CrossbarSpec.from_dict({"weight_bits": [6, 3]}).weight_bits == (3, 6)


@pytest.mark.parametrize("spec_kw, rows, lossless", [
    # peak = rows (2^dac - 1)(2^cell - 1)
    ({"cell_bits": 1, "dac_bits": 1, "adc_bits": 4}, 15, True),      # 15 <= 15
    ({"cell_bits": 1, "dac_bits": 1, "adc_bits": 4}, 16, False),     # 16 > 15
    ({"cell_bits": 4, "dac_bits": 3, "act_bits": 6, "adc_bits": 14}, 156, True),    # 156*7*15 = 16380 <= 16383
    ({"cell_bits": 4, "dac_bits": 3, "act_bits": 6, "adc_bits": 14}, 157, False),   # 16485
    ({"cell_bits": 3, "dac_bits": 2, "adc_bits": 10}, 48, True),     # 48*3*7 = 1008 <= 1023
    ({"cell_bits": 3, "dac_bits": 2, "adc_bits": 10}, 49, False),    # 1029
])
def test_adc_lossless_hand_computed(spec_kw, rows, lossless):
    spec = preset("isaac", **spec_kw)
    assert spec.adc_lossless(rows) is lossless
    assert preset("isaac", rows=rows, **spec_kw).adc_lossless() is lossless     # rows of the spec by default
    assert spec.adc_lossless(rows) != spec.adc_lossless(rows + 1) or not lossless


@pytest.mark.parametrize("text, want", [
    ("2-16", tuple(range(2, 17))), (" 3 - 5 ", (3, 4, 5)), ("2-4,8", (2, 3, 4, 8)), ("6", (6,)), ("8,8,2", (2, 8)),
])
def test_parse_bits_accepts(text, want):
    assert parse_bits(text) == want


@pytest.mark.parametrize("text, needle", [
    ("x", r"cannot parse bitwidths 'x': expected e.g. '2-8' or '2,4,8'"),
    ("2-3-4", r"cannot parse bitwidths '2-3-4'"),
    ("", r"cannot parse bitwidths '': no bitwidth given"),
    ("5-3", r"cannot parse bitwidths '5-3': no bitwidth given"),
    ("2-17", r"bitwidth 17 in '2-17' is outside 2..16"),
    ("1,4", r"bitwidth 1 in '1,4' is outside 2..16"),
])
def test_parse_bits_refuses(text, needle):
    with pytest.raises(SpecError, match=needle):
        parse_bits(text)
