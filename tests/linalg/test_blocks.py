"""Block-diagonal factors against dense float64 references (the same matrices written out as block_diag)."""

from __future__ import annotations

import pytest
import torch

from hf_qn.linalg import bfgs_inverse_update, damped_cholesky_inverse, kron_precondition
from hf_qn.linalg.blocks import BlockSplit, block_diagonal, block_left, block_right, matvec_rows
from hf_qn.optim.output_side import keep_blocks, rank2_updates
from tests._helpers.dense import random_pair, random_spd

# (dim, max_block) -> (blocks, size): fewest equal blocks, padding at the end of the last
SPLITS = [((10, 4), (3, 4)), ((9, 3), (3, 3)), ((7, 7), (1, 7)), ((7, None), (1, 7)), ((1537, 512), (4, 385)),
          ((1536, 768), (2, 768)), ((5, 1), (5, 1))]


@pytest.mark.parametrize("args, expected", SPLITS)
def test_split_is_the_fewest_equal_blocks(args, expected):
    sp = BlockSplit.of(*args)
    assert (sp.blocks, sp.size) == expected
    assert 0 <= sp.pad < sp.blocks  # equal blocks: at most one padded coordinate per block
    assert sp.blocked == (sp.blocks > 1)
    eye = sp.identity(torch.float64)
    assert eye.shape == sp.factor_shape == ((sp.blocks, sp.size, sp.size) if sp.blocked else (sp.dim, sp.dim))
    torch.testing.assert_close(block_diagonal(eye, sp.dim) if sp.blocked else eye, torch.eye(sp.dim, dtype=torch.float64))


def _blocks(sp, generator=None):
    return torch.stack([random_spd(sp.size, generator=generator) for _ in range(sp.blocks)])


@pytest.mark.parametrize("dim, max_block", [(10, 4), (9, 3), (11, 5)])
def test_products_equal_the_dense_block_diagonal(dim, max_block):
    sp = BlockSplit.of(dim, max_block)
    H = _blocks(sp)
    dense = block_diagonal(H, dim)
    assert dense.shape == (dim, dim)
    X = torch.randn(dim, 6, dtype=torch.float64)
    torch.testing.assert_close(block_left(H, X), dense @ X)
    torch.testing.assert_close(block_left(H, X[:, 2]), dense @ X[:, 2])
    torch.testing.assert_close(sp.unrows(matvec_rows(H, sp.rows(X[:, 2]))), dense @ X[:, 2])
    whole = BlockSplit.of(dim, None)  # a dense factor: one row
    torch.testing.assert_close(whole.unrows(matvec_rows(dense, whole.rows(X[:, 2]))), dense @ X[:, 2])
    Y = torch.randn(6, dim, dtype=torch.float64)
    torch.testing.assert_close(block_right(Y, H), Y @ dense)
    r = torch.randn(20, dim, dtype=torch.float64)
    full = r.T @ r
    mask = block_diagonal(torch.ones(sp.blocks, sp.size, sp.size, dtype=torch.float64), dim)
    torch.testing.assert_close(block_diagonal(sp.gram(r), dim), full * mask)
    assert torch.equal(whole.gram(r), full)  # one block: the whole matrix, shaped as the factor
    assert torch.equal(sp.unrows(sp.rows(r)), r)
    assert sp.rows(r)[..., -1, sp.size - sp.pad :].abs().sum() == 0  # padding is zero


def test_kron_precondition_with_block_factors_equals_the_dense_product():
    G, A = BlockSplit.of(7, 3), BlockSplit.of(10, 4)
    H_g, H_a = _blocks(G), _blocks(A)
    X = torch.randn(7, 10, dtype=torch.float64)
    ref = block_diagonal(H_g, 7) @ X @ block_diagonal(H_a, 10)
    torch.testing.assert_close(kron_precondition(H_g, X, H_a), ref)
    torch.testing.assert_close(kron_precondition(None, X, H_a), X @ block_diagonal(H_a, 10))
    torch.testing.assert_close(kron_precondition(H_g, X, None), block_diagonal(H_g, 7) @ X)


def test_damped_cholesky_inverse_of_blocks_is_the_inverse_of_the_block_diagonal():
    """With zero padding in ``A``, the unpadded part of the batched inverse is the dense inverse."""
    sp = BlockSplit.of(10, 4)
    r = torch.randn(30, 10, dtype=torch.float64)
    A = sp.gram(r) / 30  # (3, 4, 4); the last block's last 2 rows and columns are padding (zero)
    inv = damped_cholesky_inverse(A, 0.5)
    dense = block_diagonal(A, 10) + 0.5 * torch.eye(10, dtype=torch.float64)
    torch.testing.assert_close(block_diagonal(inv, 10), torch.linalg.inv(dense))


def test_rank2_updates_of_blocks_are_the_per_block_bfgs_updates():
    """One row per block: each block gets the inverse-BFGS update of its own part of the pair; a 2-D factor
    in the same group takes one row; a block whose update is rejected keeps its old value (keep_blocks)."""
    g = torch.Generator().manual_seed(3)
    sp = BlockSplit.of(8, 3)  # 3 blocks of 3, one padded coordinate
    H3 = _blocks(sp, g)
    H3[2, -1, :], H3[2, :, -1], H3[2, -1, -1] = 0.0, 0.0, 1.0  # as a factor starts: identity on the padding
    H2 = random_spd(3, generator=g)
    pairs = [random_pair(3) for _ in range(sp.blocks + 1)]
    s = torch.stack([p[0] for p in pairs])
    y = torch.stack([p[1] for p in pairs])
    s[2, -1] = y[2, -1] = 0.0  # the padded coordinate of the last block
    Hs = [H3, H2]
    Hy = torch.cat([(H3 @ y[:3].unsqueeze(-1)).squeeze(-1), (H2 @ y[3]).unsqueeze(0)])
    sy = (s * y).sum(-1)
    new, finite = rank2_updates(Hs, s, y, Hy, sy)
    assert finite.tolist() == [True] * 4
    for j in range(3):
        torch.testing.assert_close(new[0][j], bfgs_inverse_update(H3[j], s[j], y[j]))
    torch.testing.assert_close(new[1], bfgs_inverse_update(H2, s[3], y[3]))
    assert new[0][2, -1, :-1].abs().max() == 0 and new[0][2, -1, -1] == H3[2, -1, -1]  # padding untouched
    kept = keep_blocks(new[0].clone(), H3, [True, False, True])
    assert torch.equal(kept[1], H3[1]) and torch.equal(kept[0], new[0][0])
