"""BlockSparseWeight: packing, exact round trip, transposed index, validation."""
import math

import pytest
import torch

from sparsekit.formats.block_sparse import BlockSparseWeight, block_grid, keep_count

BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (16, 64), (64, 16), (128, 32), (32, 128)]
DENSITIES = [0.0, 0.05, 0.5, 1.0]


def _shape_for(bs):
    # odd sizes, not multiples of either block side, a few blocks each way
    bm, bk = bs
    return 3 * bm - 5, 2 * bk + 7


def _check_transposed(s: BlockSparseWeight):
    nb, kb = s.grid
    crow, col = s.crow.tolist(), s.col.tolist()
    rows = [r for r in range(nb) for _ in range(crow[r], crow[r + 1])]
    want = sorted(range(s.nnzb), key=lambda b: (col[b], rows[b]))
    assert s.tblk.tolist() == want
    assert s.trow.tolist() == [rows[b] for b in want]
    ptr = s.tcol_ptr.tolist()
    assert ptr[0] == 0 and ptr[-1] == s.nnzb
    for c in range(kb):
        assert all(col[b] == c for b in s.tblk.tolist()[ptr[c]:ptr[c + 1]])


@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize("density", DENSITIES)
def test_round_trip_every_block_size(bs, density):
    n, k = _shape_for(bs)
    w = torch.randn(n, k)
    s = BlockSparseWeight.from_dense_magnitude(w, bs, sparsity=1.0 - density)
    nb, kb = block_grid((n, k), bs)
    assert s.grid == (nb, kb) == (math.ceil(n / bs[0]), math.ceil(k / bs[1]))
    assert s.nnzb == keep_count(nb * kb, 1.0 - density)
    assert s.blocks.shape == (s.nnzb, *bs) and s.block_size == bs and s.shape == (n, k)
    for t in s.index_tensors():
        assert t.dtype == torch.int32
    mask = s.mask()
    assert mask.shape == (n, k)
    assert torch.equal(s.to_dense(), w * mask)
    assert abs(s.density - s.nnzb / (nb * kb)) < 1e-12
    _check_transposed(s)
    # repacking the pruned dense weight (no mask) finds the same blocks
    s2 = BlockSparseWeight.from_dense(s.to_dense(), bs)
    assert torch.equal(s2.block_mask(), s.block_mask())
    assert torch.equal(s2.blocks, s.blocks)
    # and the explicit mask reproduces it too
    s3 = BlockSparseWeight.from_dense(w, bs, block_mask=s.block_mask())
    assert torch.equal(s3.to_dense(), s.to_dense())


def test_block_mask_keeps_exactly_those_blocks_and_drops_the_rest():
    w = torch.randn(40, 50)  # grid 3 x 4 with 16x16 blocks
    bm = torch.zeros(3, 4, dtype=torch.bool)
    bm[0, 1] = bm[2, 0] = bm[2, 3] = True
    w[16:32] = 0.0              # block-row 1 is empty anyway
    s = BlockSparseWeight.from_dense(w, (16, 16), block_mask=bm)
    assert s.nnzb == 3 and s.crow.tolist() == [0, 1, 1, 3] and s.col.tolist() == [1, 0, 3]
    assert torch.equal(s.block_mask(), bm)
    d = s.to_dense()
    assert torch.equal(d[0:16, 16:32], w[0:16, 16:32])
    assert torch.equal(d[32:40, 48:50], w[32:40, 48:50])
    assert int((d != 0).sum()) == 16 * 16 + 8 * 16 + 8 * 2
    # a kept all-zero block is stored (the mask decides, not the values)
    z = BlockSparseWeight.from_dense(torch.zeros(40, 50), (16, 16), block_mask=bm)
    assert z.nnzb == 3 and float(z.blocks.abs().sum()) == 0.0


def test_empty_rows_and_no_blocks():
    w = torch.randn(70, 33)
    w[:32] = 0.0
    s = BlockSparseWeight.from_dense(w, (32, 16))
    assert s.crow.tolist()[:2] == [0, 0]
    assert torch.equal(s.to_dense(), w)
    e = BlockSparseWeight.from_dense(torch.zeros(17, 19), 16)
    assert e.nnzb == 0 and e.blocks.shape == (0, 16, 16) and e.density == 0.0
    assert e.crow.tolist() == [0, 0, 0] and e.tcol_ptr.tolist() == [0, 0, 0]
    assert torch.equal(e.to_dense(), torch.zeros(17, 19))
    _check_transposed(e)


def test_magnitude_keeps_largest_blocks_ties_by_index():
    w = torch.ones(32, 64)           # 2 x 4 blocks of 16x16, all the same norm
    w[16:, 48:] = 3.0                 # block (1, 3) is the largest
    s = BlockSparseWeight.from_dense_magnitude(w, 16, sparsity=0.75)   # keep round(0.25 * 8) = 2
    assert s.block_mask().nonzero().tolist() == [[0, 0], [1, 3]]
    s = BlockSparseWeight.from_dense_magnitude(w, 16, sparsity=0.65)   # keep round(2.8) = 3
    assert s.block_mask().nonzero().tolist() == [[0, 0], [0, 1], [1, 3]]
    s = BlockSparseWeight.from_dense_magnitude(w, 16, sparsity=0.7)    # keep round(2.4) = 2
    assert s.nnzb == keep_count(8, 0.7) == 2
    assert BlockSparseWeight.from_dense_magnitude(w, 16, sparsity=0.0).nnzb == 8
    assert BlockSparseWeight.from_dense_magnitude(w, 16, sparsity=1.0).nnzb == 0
    with pytest.raises(ValueError, match="sparsity"):
        BlockSparseWeight.from_dense_magnitude(w, 16, sparsity=1.5)


def test_to_nbytes_repr():
    s = BlockSparseWeight.from_dense_magnitude(torch.randn(33, 65), (16, 32), 0.5)
    h = s.to(torch.float16)
    assert h.dtype == torch.float16 and h.crow.dtype == torch.int32
    assert torch.equal(h.to_dense(), s.to_dense().half())
    assert s.nbytes() == s.blocks.numel() * 4 + 4 * (s.crow.numel() + 3 * s.nnzb + s.tcol_ptr.numel())
    assert "BlockSparseWeight(shape=(33, 65)" in repr(s)
    assert s.out_features == 33 and s.in_features == 65


@pytest.mark.parametrize("bad", [8, 48, 256, (16, 24), (32, 0), (16, 16, 16), "32"])
def test_bad_block_size(bad):
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseWeight.from_dense(torch.randn(32, 32), bad)
    with pytest.raises(ValueError, match="block_size"):
        block_grid((32, 32), bad)


def test_bad_arguments_to_from_dense():
    with pytest.raises(TypeError, match="torch.Tensor"):
        BlockSparseWeight.from_dense([[1.0]], 16)
    with pytest.raises(ValueError, match="2-D"):
        BlockSparseWeight.from_dense(torch.randn(4, 4, 4), 16)
    with pytest.raises(TypeError, match="floating point"):
        BlockSparseWeight.from_dense(torch.ones(4, 4, dtype=torch.int32), 16)
    with pytest.raises(ValueError, match=r"block_mask must have shape \(2, 3\)"):
        BlockSparseWeight.from_dense(torch.randn(20, 40), 16, block_mask=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        BlockSparseWeight.from_dense(torch.randn(20, 40), 16, block_mask=torch.ones(2, 3))


def _parts(s):
    return dict(blocks=s.blocks, crow=s.crow, col=s.col, tcol_ptr=s.tcol_ptr, trow=s.trow, tblk=s.tblk,
                shape=s.shape, block_size=s.block_size)


def test_validation_of_index_arrays():
    w = torch.randn(48, 48)
    bm = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    s = BlockSparseWeight.from_dense(w, 16, block_mask=bm)
    BlockSparseWeight(**_parts(s))   # consistent: fine

    def bad(match, exc=ValueError, **kw):
        p = _parts(s)
        p.update(kw)
        with pytest.raises(exc, match=match):
            BlockSparseWeight(**p)

    bad("int32", TypeError, crow=s.crow.long())
    bad("int32", TypeError, col=s.col.long())
    bad(r"crow must have shape \(4,\)", crow=s.crow[:-1])
    bad(r"col must have shape \(5,\)", col=s.col[:4])
    bad(r"tcol_ptr must have shape \(4,\)", tcol_ptr=s.tcol_ptr[:3])
    bad(r"blocks must have shape \(nnzb, 16, 16\)", blocks=s.blocks[:, :8])
    bad("non-decreasing", crow=torch.tensor([0, 3, 2, 5], dtype=torch.int32))
    bad("start at 0", crow=torch.tensor([1, 2, 4, 5], dtype=torch.int32))
    bad("out of range", col=torch.tensor([0, 3, 1, 2, 0], dtype=torch.int32))
    bad("strictly increasing", col=torch.tensor([2, 0, 1, 2, 0], dtype=torch.int32))
    bad("transposed index", trow=s.trow.flip(0).contiguous())
    bad("floating point", TypeError, blocks=s.blocks.to(torch.int32))
    bad("shape must be", shape=(48,))
    bad("block_size", block_size=(16, 20))
    # from_blocks rebuilds the transposed index
    r = BlockSparseWeight.from_blocks(s.blocks, s.crow, s.col, s.shape)
    assert torch.equal(r.tblk, s.tblk) and torch.equal(r.to_dense(), s.to_dense())
