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


def test_tiles_that_exactly_fill_a_crossbar_share_it():
    # 64 + 64 rows and 64 + 64 columns fill a 128x128 crossbar exactly: one set, block-diagonal
    pl = pack([64, 64], [64, 64], [2, 2], 128, 128, 1)
    assert pl.n_crossbars == 2 and pl.set_of_tile.tolist() == [0, 0]
    assert pl.row_off.tolist() == [0, 64] and pl.col_off.tolist() == [0, 64]
    # columns exactly full, rows not (and the reverse): still one set; one more row or column: two
    assert pack([30, 40], [100, 28], [1, 1], 128, 128, 1).n_crossbars == 1
    assert pack([100, 28], [30, 40], [1, 1], 128, 128, 1).n_crossbars == 1
    assert pack([100, 29], [30, 40], [1, 1], 128, 128, 1).n_crossbars == 2
    assert pack([30, 40], [100, 29], [1, 1], 128, 128, 1).n_crossbars == 2


def test_random_packings_are_valid_and_first_fit(rng):
    """Brute-force check of every placement: inside the crossbar, disjoint rows and columns within a
    set, equal slice counts, and no set could have taken a tile that opened a later set."""
    for _ in range(30):
        T = int(rng.integers(1, 25))
        R, C = int(rng.integers(8, 40)), int(rng.integers(8, 40))
        nr, nc = rng.integers(1, R + 1, T), rng.integers(1, C + 1, T)
        sl = rng.integers(1, 3, T)
        pl = pack(nr, nc, sl, R, C, 2)
        used = {}
        for t in range(T):
            s = int(pl.set_of_tile[t])
            assert 0 <= pl.row_off[t] and pl.row_off[t] + nr[t] <= R and pl.col_off[t] + nc[t] <= C
            used.setdefault(s, []).append(t)
        for s, ts in used.items():
            assert len({int(sl[t]) for t in ts}) == 1
            rows, cols = np.zeros(R, int), np.zeros(C, int)
            for t in ts:
                rows[pl.row_off[t]:pl.row_off[t] + nr[t]] += 1
                cols[pl.col_off[t]:pl.col_off[t] + nc[t]] += 1
            assert rows.max() <= 1 and cols.max() <= 1, (s, ts)
        assert pl.n_crossbars == sum(int(sl[ts[0]]) * 2 for ts in used.values())
        for s, ts in used.items():
            assert pl.tiles_of_set(s).tolist() == sorted(ts)
        # first fit: the tile that opened a set (first of its members in largest-first order) fitted
        # in no set of its slice count that already existed at that moment
        key = lambda t: (-max(nr[t] / R, nc[t] / C), t)
        packable = lambda t: nr[t] < R and nc[t] < C
        for s, ts in used.items():
            t0 = min(ts, key=key)
            if not packable(t0):
                continue
            for s2, ts2 in used.items():
                before = [t for t in ts2 if key(t) < key(t0)]
                if s2 == s or not before or sl[ts2[0]] != sl[t0] or not packable(ts2[0]):
                    continue
                fits = sum(nr[t] for t in before) + nr[t0] <= R and sum(nc[t] for t in before) + nc[t0] <= C
                assert not fits, (s, s2, t0)


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


def test_cell_and_level_dtypes(rng):
    """Cells are uint8 (the package's crossbar blob; docs/package_format.md), levels integers."""
    from psq_tvm.core.tables import decode_tile, encode_tile
    layers = [Layer("fc", rng.standard_normal((150, 40)).astype(np.float32))]
    r = psq_search(layers, preset(), budget="avg-bits=5")
    cells = crossbar_cells(r)
    assert cells.dtype == np.uint8 and cells.shape == (r.crossbars, 128, 128)
    q = np.array([[7, -8], [0, 3]])
    for enc in ("offset", "differential"):
        e = encode_tile(q if enc == "offset" else np.clip(q, -7, 7), 4, enc, 2, 2)
        assert e.dtype == np.uint8
        back = decode_tile(e, 4, enc, 2)
        assert back.dtype.kind == "i" and back.tolist() == (q if enc == "offset" else np.clip(q, -7, 7)).tolist()
    assert read_tile(cells, r, 0).dtype.kind == "i"
