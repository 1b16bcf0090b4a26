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


# ----------------------------------------------------------------------------- torch sparse BSR
def _same(a: BlockSparseWeight, b: BlockSparseWeight):
    assert a.shape == b.shape and a.block_size == b.block_size and a.dtype == b.dtype
    for x, y in zip((a.blocks,) + a.index_tensors(), (b.blocks,) + b.index_tensors()):
        assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bs", [(16, 16), (32, 16), (16, 64), (128, 32)])
@pytest.mark.parametrize("odd", [False, True])
def test_torch_bsr_round_trip(dtype, bs, odd):
    torch.manual_seed(0)
    bm, bk = bs
    n, k = _shape_for(bs) if odd else (3 * bm, 2 * bk)
    w = torch.randn(n, k).to(dtype)
    s = BlockSparseWeight.from_dense_magnitude(w, bs, sparsity=0.5)
    nb, kb = s.grid
    if odd:
        with pytest.raises(ValueError, match=r"not a multiple of block_size .*pad=True"):
            s.to_torch_bsr()
    for index_dtype in (torch.int64, torch.int32):
        t = s.to_torch_bsr(pad=odd, index_dtype=index_dtype)
        assert t.layout == torch.sparse_bsr and t.dtype == dtype and tuple(t.shape) == (nb * bm, kb * bk)
        assert t.crow_indices().dtype == index_dtype and t.col_indices().dtype == index_dtype
        assert tuple(t.values().shape) == (s.nnzb, bm, bk)
        dense = t.to_dense()                         # torch's own expansion
        assert torch.equal(dense[:n, :k], s.to_dense())
        assert not bool(dense[n:].any()) and not bool(dense[:, k:].any())
        if not odd:
            assert t.values().data_ptr() == s.blocks.data_ptr()      # no copy
        back = BlockSparseWeight.from_torch_bsr(t, shape=(n, k) if odd else None)
        _same(back, s)
        _check_transposed(back)
    # torch's own packing of a dense weight
    wt = torch.zeros(nb * bm, kb * bk, dtype=dtype)
    wt[:n, :k] = s.to_dense()
    tb = wt.to_sparse_bsr((bm, bk))
    got = BlockSparseWeight.from_torch_bsr(tb, shape=(n, k))
    assert torch.equal(got.to_dense(), s.to_dense())
    _same(got, s)        # torch keeps the same (non-zero) blocks in the same order


def test_torch_bsr_padding_is_zeroed_and_empty_patterns():
    # finite junk in the padding of the edge blocks (allowed by the format) is not exported
    w = torch.randn(20, 20)
    s = BlockSparseWeight.from_dense(w, 16)
    blocks = s.blocks.clone()
    blocks[:, 4:, :] = 7.0
    blocks[:, :, 4:] = 7.0
    junk = BlockSparseWeight.from_blocks(blocks, s.crow, s.col, (20, 20), 16)
    t = junk.to_torch_bsr(pad=True)
    assert torch.equal(t.to_dense()[:20, :20], junk.to_dense())
    assert not bool(t.to_dense()[20:].any()) and not bool(t.to_dense()[:, 20:].any())
    assert torch.equal(junk.blocks, blocks)                    # the weight itself is unchanged
    # no kept blocks, and empty block-rows
    empty = BlockSparseWeight.from_dense(torch.zeros(32, 48), 16)
    te = empty.to_torch_bsr()
    assert te.values().shape == (0, 16, 16) and not bool(te.to_dense().any())
    _same(BlockSparseWeight.from_torch_bsr(te), empty)
    holes = torch.zeros(64, 32)
    holes[16:32, 16:] = 1.0
    sh = BlockSparseWeight.from_dense(holes, 16)
    _same(BlockSparseWeight.from_torch_bsr(sh.to_torch_bsr()), sh)


def test_from_torch_bsr_errors():
    w = torch.randn(32, 32)
    with pytest.raises(TypeError, match="torch.Tensor"):
        BlockSparseWeight.from_torch_bsr(w.numpy())
    for other in (w, w.to_sparse_csr(), w.to_sparse_bsc((16, 16)), w.to_sparse()):
        with pytest.raises(ValueError, match=r"layout torch.sparse_bsr, got torch\.(strided|sparse_csr|sparse_bsc|"
                                             r"sparse_coo)"):
            BlockSparseWeight.from_torch_bsr(other)
    for bad in ((8, 8), (16, 8), (32, 2)):
        with pytest.raises(ValueError, match=r"blocksize \(\d+, \d+\) is not supported.*16, 32, 64, 128"):
            BlockSparseWeight.from_torch_bsr(w.to_sparse_bsr(bad))
    with pytest.raises(ValueError, match="without batch or dense dimensions"):
        BlockSparseWeight.from_torch_bsr(torch.randn(2, 32, 32).to_sparse_bsr((16, 16)))
    with pytest.raises(TypeError, match="floating point"):
        BlockSparseWeight.from_torch_bsr(torch.ones(32, 32, dtype=torch.int32).to_sparse_bsr((16, 16)))
    t = w.to_sparse_bsr((16, 16))
    with pytest.raises(ValueError, match=r"does not hold a \(10, 32\) weight"):
        BlockSparseWeight.from_torch_bsr(t, shape=(10, 32))
    with pytest.raises(ValueError, match=r"does not hold a \(40, 32\) weight"):
        BlockSparseWeight.from_torch_bsr(t, shape=(40, 32))
    # unsorted block columns in a row (torch does not check them unless asked): refused with the entry
    bad = torch.sparse_bsr_tensor(torch.tensor([0, 2, 2]), torch.tensor([1, 0]), torch.randn(2, 16, 16),
                                  size=(32, 32), check_invariants=False)
    with pytest.raises(ValueError, match="col"):
        BlockSparseWeight.from_torch_bsr(bad)
    s = BlockSparseWeight.from_dense(w, 16)
    with pytest.raises(ValueError, match="index_dtype"):
        s.to_torch_bsr(index_dtype=torch.int16)
    with pytest.raises(TypeError, match="pad"):
        s.to_torch_bsr(pad=1)
