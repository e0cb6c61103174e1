import pytest

from psq_tvm.core.crossbar import PRESETS, CrossbarSpec, SpecError, parse_bits, preset


def test_presets_valid_and_named():
    assert set(PRESETS) == {"isaac", "puma", "prime", "neurosim", "mnsim"}
    assert preset().name == "isaac"
    for name, spec in PRESETS.items():
        assert spec.name == name
        assert CrossbarSpec.from_dict(spec.to_dict()) == spec


@pytest.mark.parametrize("enc,cell,bits,slices,xbars", [
    ("offset", 2, 16, 8, 8),       # ISAAC: 16-bit weights on 2-bit cells
    ("offset", 2, 8, 4, 4),
    ("offset", 2, 5, 3, 3),
    ("offset", 1, 4, 4, 4),
    ("differential", 2, 8, 4, 8),  # 7 magnitude bits -> 4 slices, x2 polarities
    ("differential", 4, 8, 2, 4),
    ("differential", 2, 3, 1, 2),
    ("differential", 1, 2, 1, 2),
])
def test_slices_hand_computed(enc, cell, bits, slices, xbars):
    spec = preset(encoding=enc, cell_bits=cell)
    assert spec.slices(bits) == slices
    assert spec.crossbars_per_tile(bits) == xbars


@pytest.mark.parametrize("override,needle", [
    ({"rows": 0}, "rows"),
    ({"cols": -3}, "cols"),
    ({"cell_bits": 0}, "cell_bits"),
    ({"encoding": "twos"}, "encoding"),
    ({"weight_bits": (1, 4)}, "outside 2..16"),
    ({"weight_bits": (4, 17)}, "outside 2..16"),
    ({"weight_bits": ()}, "at least one"),
    ({"dac_bits": 9}, "dac_bits"),
    ({"adc_bits": 0}, "adc_bits"),
])
def test_invalid_specs_rejected(override, needle):
    with pytest.raises(SpecError, match=needle):
        preset(**override)


def test_unknown_preset_and_option():
    with pytest.raises(SpecError, match="unknown crossbar preset"):
        preset("nope")
    with pytest.raises(SpecError, match="unknown crossbar option"):
        preset(colums=3)


def test_adc_lossless_rule():
    # 128 rows * 1 * 3 = 384 <= 511 (9 bits): lossless; 8 bits (255) is not
    assert preset("isaac").adc_lossless()
    assert not preset("puma").adc_lossless()
    assert preset(adc_bits=None).adc_lossless()


def test_parse_bits():
    assert parse_bits("2-5") == (2, 3, 4, 5)
    assert parse_bits("8,2,4") == (2, 4, 8)
    for bad in ("1-4", "x", "", "3-17"):
        with pytest.raises(SpecError):
            parse_bits(bad)
