import numpy as np

from psq_tvm import Layer, preset, psq_search, rtn_per_tile, uniform_crossbars
from psq_tvm.core.packing import pack
from psq_tvm.core.tables import crossbar_cells, read_tile, tile_levels


def test_full_tiles_each_own_set():
    pl = pack([128, 128], [128, 128], [4, 4], 128, 128, 1)
    assert pl.n_crossbars == 8
    assert pl.crossbar_ids(0).tolist() == [[0], [1], [2], [3]]
    assert pl.crossbar_ids(1).tolist() == [[4], [5], [6], [7]]


def test_partial_tiles_share_block_diagonally():
    # four 60x30 tiles, 3 slices each: two fit on one crossbar (rows 120 <= 128), so 2 sets x 3 slices
    pl = pack([60] * 4, [30] * 4, [3] * 4, 128, 128, 1)
    assert pl.n_crossbars == 6
    assert pl.set_of_tile.tolist() == [0, 0, 1, 1]
    assert pl.row_off.tolist() == [0, 60, 0, 60] and pl.col_off.tolist() == [0, 30, 0, 30]


def test_different_slice_counts_do_not_share():
    pl = pack([10, 10], [10, 10], [2, 3], 128, 128, 2)
    assert pl.n_crossbars == (2 + 3) * 2


def test_full_row_tile_cannot_share():
    # a 128x10 tile fills every wordline; the 10x10 one needs its own crossbar
    pl = pack([128, 10], [10, 10], [1, 1], 128, 128, 1)
    assert pl.n_crossbars == 2


def test_hand_computed_model_counts():
    # dense 300x70 on 128x128: tiles 128x70,128x70,44x70 ; all cols<128 -> packable
    # rows 128 are not packable (fill all wordlines); 44x70 alone -> 3 sets
    layers = [Layer("d", np.ones((300, 70), np.float32))]
    for enc, per in (("offset", 8), ("differential", 16)):   # 16-bit: 8 slices (offset), 2*8 (diff, 15 bits)
        spec = preset(encoding=enc)
        assert uniform_crossbars(__import__("psq_tvm").ModelTiles(layers, 128, 128), spec, 16) == 3 * per
    # two small layers of 8-bit tiles share: 20x30 + 50x40 -> one set of 4 slices (offset, 2-bit cells)
    layers = [Layer("a", np.ones((20, 30), np.float32)), Layer("b", np.ones((50, 40), np.float32))]
    r = rtn_per_tile(layers, preset(), 8)
    assert r.crossbars == 4
    assert abs(r.cell_utilization() - (20 * 30 + 50 * 40) * 4 / (4 * 128 * 128)) < 1e-12


def test_cells_roundtrip_packed(rng):
    layers = [Layer("a", rng.normal(size=(300, 70)).astype(np.float32)),
              Layer("g", rng.normal(size=(32, 4, 3, 3)).astype(np.float32), "conv2d", 8)]
    for enc in ("offset", "differential"):
        for cell in (1, 2, 4):
            r = psq_search(layers, preset(encoding=enc, cell_bits=cell), budget="avg-bits=5")
            cells = crossbar_cells(r)
            assert cells.shape == (r.crossbars, 128, 128)
            assert cells.max() < 2 ** cell
            lv = tile_levels(r)
            for t in range(r.tiles.n_tiles):
                assert np.array_equal(read_tile(cells, r, t), lv[t])


def _cells_per_tile(r):
    """Reference: every tile encoded and placed on its own (the straightforward algorithm)."""
    from psq_tvm.core.tables import encode_tile
    spec, pl, tiles = r.spec, r.placement, r.tiles
    cells = np.zeros((pl.n_crossbars, spec.rows, spec.cols), dtype=np.uint8)
    for t, q in enumerate(tile_levels(r)):
        enc = encode_tile(q, int(r.bits[t]), spec.encoding, spec.cell_bits, int(r.slices[t]))
        ro, co = int(pl.row_off[t]), int(pl.col_off[t])
        nr, nc = q.shape
        cells[pl.crossbar_ids(t).ravel(), ro:ro + nr, co:co + nc] = enc.reshape(-1, nr, nc)
    return cells


def test_cells_blockwise_equal_per_tile_reference(rng):
    # full tiles of several bitwidths (scaled row blocks), edge tiles, packed tiles, a grouped conv,
    # dense and conv layouts, per-tile and per-column scales
    w = rng.normal(size=(700, 300)).astype(np.float32) * np.repeat(rng.uniform(0.01, 10, 6), 117)[:700, None]
    layers = [Layer("d", w),
              Layer("c", rng.normal(size=(260, 64, 3, 3)).astype(np.float32), "conv2d"),
              Layer("g", rng.normal(size=(32, 4, 3, 3)).astype(np.float32), "conv2d", 8)]
    for enc in ("offset", "differential"):
        for gran in ("tile", "column"):
            from psq_tvm import SearchConfig
            r = psq_search(layers, preset(encoding=enc), budget="avg-bits=5",
                           config=SearchConfig(objective="mse", granularity=gran))
            assert len(np.unique(r.bits)) > 1
            assert np.array_equal(crossbar_cells(r), _cells_per_tile(r))
