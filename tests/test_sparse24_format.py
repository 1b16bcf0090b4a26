"""2:4 mask and compressed format: round trips, layout, errors."""
import pytest
import torch

from sparsekit.formats import Sparse24Weight
from sparsekit.formats.sparse24 import padded_k
from sparsekit.prune import is_2to4, mask_2to4
from sparsekit.testing import random_2to4

SHAPES = [(1, 1), (1, 4), (3, 5), (7, 8), (5, 13), (16, 64), (33, 100), (2, 4099)]


@pytest.mark.parametrize("n,k", SHAPES)
def test_mask_keeps_two_largest_per_group(n, k):
    w = torch.randn(n, k)
    m = mask_2to4(w)
    assert m.shape == w.shape and m.dtype == torch.bool
    kp = (k + 3) // 4 * 4
    mp = torch.nn.functional.pad(m, (0, kp - k)).reshape(n, -1, 4)
    real = torch.nn.functional.pad(torch.ones(n, k, dtype=torch.bool), (0, kp - k)).reshape(n, -1, 4)
    # every group keeps exactly min(2, #real entries)
    assert torch.equal(mp.sum(-1), real.sum(-1).clamp(max=2))
    # kept entries are at least as large as every dropped real entry of the group
    a = torch.nn.functional.pad(w.abs(), (0, kp - k)).reshape(n, -1, 4)
    kept_min = torch.where(mp, a, torch.full_like(a, float("inf"))).amin(-1)
    dropped_max = torch.where(~mp & real, a, torch.full_like(a, -1.0)).amax(-1)
    assert bool((kept_min >= dropped_max).all())
    assert is_2to4(w * m)


def test_mask_uses_scores():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    scores = torch.tensor([[9.0, 8.0, 1.0, 0.0]])
    assert mask_2to4(w, scores).tolist() == [[True, True, False, False]]
    assert mask_2to4(w).tolist() == [[False, False, True, True]]


def test_mask_errors():
    with pytest.raises(ValueError, match="2-D"):
        mask_2to4(torch.randn(4))
    with pytest.raises(TypeError, match="floating"):
        mask_2to4(torch.ones(2, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="scores shape"):
        mask_2to4(torch.randn(2, 8), torch.randn(2, 4))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_exact(n, k, dtype):
    w = random_2to4(n, k, dtype=dtype)
    s = Sparse24Weight.from_dense(w)
    kp = padded_k(k)
    assert s.values.shape == (n, kp // 2) and s.values.dtype == dtype
    assert s.meta.shape == (n, kp // 8) and s.meta.dtype == torch.uint8
    assert torch.equal(s.to_dense(), w)
    assert s.nbytes() == n * (kp // 2) * w.element_size() + n * kp // 8
    # the mask covers every non-zero
    assert bool(s.mask()[w != 0].all())


def test_round_trip_with_zero_groups_and_single_nonzeros():
    w = torch.zeros(2, 8)
    w[0, 3] = 5.0        # one non-zero in group 0
    w[1, 5] = -1.0       # group 1 of row 1: positions 1 and 2
    w[1, 6] = 2.0
    s = Sparse24Weight.from_dense(w)
    assert torch.equal(s.to_dense(), w)


def test_layout_is_documented_layout():
    # row 0: group 0 keeps columns 1, 3; group 1 keeps 4, 6 (positions 0, 2)
    w = torch.zeros(1, 8)
    w[0, 1], w[0, 3], w[0, 4], w[0, 6] = 1.0, 2.0, 3.0, 4.0
    s = Sparse24Weight.from_dense(w)
    assert s.values.tolist() == [[1.0, 2.0, 3.0, 4.0]]
    code0 = 1 | (3 << 2)
    code1 = 0 | (2 << 2)
    assert s.meta.tolist() == [[code0 | (code1 << 4)]]


def test_mask_argument_applies_mask():
    w = torch.randn(4, 12)
    m = mask_2to4(w)
    s = Sparse24Weight.from_dense(w, mask=m)
    assert torch.equal(s.to_dense(), w * m)


def test_not_2to4_error_names_group():
    w = random_2to4(3, 16)
    w[2, 9] = 1.0
    w[2, 10] = 1.0
    w[2, 11] = 1.0
    with pytest.raises(ValueError, match=r"row 2, columns 8\.\.11 hold [34] non-zeros"):
        Sparse24Weight.from_dense(w)


def test_partial_tail_group_must_be_2to4():
    w = torch.zeros(1, 7)
    w[0, 4:7] = 1.0  # three non-zeros in the padded tail group
    with pytest.raises(ValueError, match="columns 4..6"):
        Sparse24Weight.from_dense(w)


@pytest.mark.parametrize("bad,exc,msg", [
    (torch.randn(8), ValueError, "2-D"),
    (torch.ones(2, 8, dtype=torch.int64), TypeError, "floating"),
    ("not a tensor", TypeError, "torch.Tensor"),
])
def test_from_dense_bad_input(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        Sparse24Weight.from_dense(bad)


def test_constructor_validates_shapes():
    s = Sparse24Weight.from_dense(random_2to4(4, 16))
    with pytest.raises(ValueError, match="values must have shape"):
        Sparse24Weight(s.values[:, :-1], s.meta, (4, 16))
    with pytest.raises(ValueError, match="meta must have shape"):
        Sparse24Weight(s.values, s.meta[:, :1].contiguous()[:, :0], (4, 16))
    with pytest.raises(TypeError, match="uint8"):
        Sparse24Weight(s.values, s.meta.to(torch.int32), (4, 16))


def test_to_casts_values_keeps_meta():
    s = Sparse24Weight.from_dense(random_2to4(4, 16))
    h = s.to(torch.float16)
    assert h.values.dtype == torch.float16 and h.meta.dtype == torch.uint8
    assert torch.equal(h.to_dense(), s.to_dense().half())
