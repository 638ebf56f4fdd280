r"""Limited-memory BFGS: a ring buffer of curvature pairs, the two-loop recursion and the compact form.

The inverse-Hessian approximation ``H`` defined by ``m`` pairs ``(s_i, y_i)`` (oldest first) is the
result of ``m`` inverse-BFGS updates of ``H_0 = γ I``. Two ways to apply it are provided and tested to
agree with the explicit matrix:

* :meth:`LBFGSHistory.two_loop` – Nocedal & Wright, Algorithm 7.4, for one vector;
* :meth:`LBFGSHistory.apply` – the compact representation of Byrd, Nocedal & Schnabel (1994),
  Theorem 2.2, which applies ``H`` to a vector or to many right-hand sides at once with four matrix
  products over the stored history instead of ``4m`` vector passes:

  .. math::
      H = γI + [S\;\; γY]
          \begin{bmatrix} R^{-\top}(D + γ Y^\top Y) R^{-1} & -R^{-\top} \\ -R^{-1} & 0 \end{bmatrix}
          \begin{bmatrix} S^\top \\ γ Y^\top \end{bmatrix},

  with ``R`` the upper triangle of ``SᵀY`` (``R_ij = s_iᵀ y_j``, ``i ≤ j``) and ``D = diag(s_iᵀ y_i)``.

The small ``m × m`` products ``SᵀY`` and ``YᵀY`` are maintained incrementally at each push (O(m·n)) and
kept in float64; the history itself is kept in ``dtype`` (float32 by default, bfloat16 to halve it).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .bfgs import _dot64_t, dot64

__all__ = ["LBFGSHistory"]

# Chunk length (elements of a history row) for histories stored in a dtype other than the compute
# dtype: limits the temporary up-cast copy to m * chunk values. On a CPU a short chunk costs nothing;
# on a GPU every chunk is several kernel launches, and 1M-element chunks cut GPT-2 small's bf16 history
# into about 145 pieces (the embedding alone 37), which made its step 1.6x slower than with a float32
# history. There the chunk is 8x longer: 10 pairs x 8M float32 values, 320 MB of S and as much of Y.
_CHUNK = 1 << 20
_CHUNK_ACCELERATOR = 1 << 23


def _chunk(device: torch.device) -> int:
    return _CHUNK if device.type == "cpu" else _CHUNK_ACCELERATOR


class LBFGSHistory:
    """The last ``history_size`` curvature pairs of vectors of length ``dim``.

    Args:
        history_size: number of pairs kept (``m``); the oldest is dropped when full.
        dim: length of the vectors (``n``).
        gamma: initial scaling ``H_0 = γ I``: a positive float, or ``"auto"`` for the newest pair's
            ``sᵀy / yᵀy`` (Nocedal & Wright eq. 7.20); with no pair stored ``"auto"`` gives ``γ = 1``.
        dtype: storage dtype of ``S`` and ``Y`` (default: float32).
        compute_dtype: dtype of the matrix products (default: float32).
        device: where the history lives.
    """

    def __init__(
        self,
        history_size: int,
        dim: int,
        gamma: float | str = "auto",
        dtype: torch.dtype = torch.float32,
        compute_dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        if history_size < 1:
            raise ValueError(f"Invalid history_size: {history_size} (must be >= 1)")
        if dim < 0:
            raise ValueError(f"Invalid dim: {dim} (must be >= 0; 0 for a rank that holds none of a block)")
        if isinstance(gamma, str):
            if gamma != "auto":
                raise ValueError(f"Invalid gamma: {gamma!r} (must be 'auto' or a positive float)")
        elif not gamma > 0:
            raise ValueError(f"Invalid gamma: {gamma} (must be 'auto' or a positive float)")
        self.m = int(history_size)
        self.n = int(dim)
        self.gamma_mode = gamma
        self.compute_dtype = compute_dtype
        self.S = torch.zeros(self.m, self.n, dtype=dtype, device=device)
        self.Y = torch.zeros(self.m, self.n, dtype=dtype, device=device)
        # Small matrices in ring order: SY[i, j] = s_i^T y_j, YY[i, j] = y_i^T y_j.
        self.SY = torch.zeros(self.m, self.m, dtype=torch.float64, device=device)
        self.YY = torch.zeros(self.m, self.m, dtype=torch.float64, device=device)
        self.count = 0  # pairs stored
        self.head = 0  # ring index the next pair is written to

    @classmethod
    def from_state(
        cls,
        state: dict[str, Tensor],
        gamma: float | str = "auto",
        compute_dtype: torch.dtype = torch.float32,
    ) -> LBFGSHistory:
        """A history that *shares* the tensors of :meth:`state_dict` output (no copy, no allocation).

        Pushes write into those tensors in place; ``count``/``head`` must be read back from
        :meth:`state_dict` afterwards.
        """
        self = cls.__new__(cls)
        self.S, self.Y, self.SY, self.YY = state["S"], state["Y"], state["SY"], state["YY"]
        self.m, self.n = int(self.S.shape[0]), int(self.S.shape[1])
        self.gamma_mode = gamma
        self.compute_dtype = compute_dtype
        self.count = int(state["count"])
        self.head = int(state["head"])
        return self

    # ------------------------------------------------------------------ bookkeeping
    def __len__(self) -> int:
        return self.count

    def order(self) -> list[int]:
        """Ring indices of the stored pairs, oldest first."""
        return [(self.head - self.count + i) % self.m for i in range(self.count)]

    def newest(self) -> int:
        """Ring index of the newest pair (requires ``count > 0``)."""
        return (self.head - 1) % self.m

    def gamma(self) -> float | Tensor:
        """The initial scaling ``γ`` in use now: ``s_kᵀy_k / y_kᵀy_k`` of the newest pair as a 0-dim float64
        tensor on the history's device (no host sync: on a GPU, one per block and step added up), or a float
        (no pair yet, or a fixed ``gamma``)."""
        if isinstance(self.gamma_mode, str):
            if self.count == 0:
                return 1.0
            j = self.newest()
            return self.SY[j, j] / self.YY[j, j]
        return float(self.gamma_mode)

    def reset(self) -> None:
        """Forget every pair."""
        self.S.zero_()
        self.Y.zero_()
        self.SY.zero_()
        self.YY.zero_()
        self.count = 0
        self.head = 0

    def push(self, s: Tensor, y: Tensor) -> None:
        """Store a pair (the caller has checked ``sᵀy > 0``), dropping the oldest if full."""
        self.commit_push(self.write_pair(s, y))

    def write_pair(self, s: Tensor, y: Tensor) -> Tensor:
        """First half of :meth:`push`: write the pair into the ring row the next push fills and return its
        products with the history, ``[Sᵀy_new, Yᵀs_new, Yᵀy_new, s_newᵀy_new, y_newᵀy_new]`` (``3m + 2`` values,
        float64, formed from the *stored*, possibly rounded, vectors so that the compact form stays consistent).
        A history split over ranks sums these over the ranks before :meth:`commit_push`."""
        idx = self.head
        self.S[idx].copy_(s.reshape(-1))
        self.Y[idx].copy_(y.reshape(-1))
        s_st, y_st = self.S[idx], self.Y[idx]
        return torch.cat([
            self._rows_dot(self.S, y_st),  # s_i^T y_new
            self._rows_dot(self.Y, s_st),  # y_i^T s_new
            self._rows_dot(self.Y, y_st),  # y_i^T y_new
            torch.stack([_dot64_t(s_st, y_st), _dot64_t(y_st, y_st)]),  # device scalars: no host sync
        ])

    def commit_push(self, products: Tensor) -> None:
        """Second half of :meth:`push`: enter :meth:`write_pair`'s products into ``SᵀY`` and ``YᵀY`` and advance
        the ring."""
        m, idx = self.m, self.head
        Sy, Ys, Yy = products[:m], products[m : 2 * m], products[2 * m : 3 * m]
        mask = torch.zeros(m, dtype=torch.bool, device=self.SY.device)
        mask[: min(self.count + 1, m)] = True  # stored rows plus the new one (head == count until full)
        self.SY[:, idx] = torch.where(mask, Sy, torch.zeros_like(Sy))
        self.SY[idx, :] = torch.where(mask, Ys, torch.zeros_like(Ys))
        self.YY[:, idx] = torch.where(mask, Yy, torch.zeros_like(Yy))
        self.YY[idx, :] = self.YY[:, idx]
        self.SY[idx, idx] = products[3 * m]
        self.YY[idx, idx] = products[3 * m + 1]
        self.head = (self.head + 1) % m
        self.count = min(self.count + 1, m)

    def _rows_dot(self, M: Tensor, v: Tensor) -> Tensor:
        """``M @ v`` in float64 output, computed in ``compute_dtype``; chunk by chunk only when ``M`` needs an
        up-cast copy (a 50257 x 768 embedding block would otherwise take 37 chunks of 5 small kernels)."""
        if M.dtype == self.compute_dtype:
            return (M @ v.to(self.compute_dtype)).double()
        out = torch.zeros(M.shape[0], dtype=torch.float64, device=M.device)
        step = _chunk(M.device)
        for lo in range(0, self.n, step):
            hi = min(lo + step, self.n)
            out += (M[:, lo:hi].to(self.compute_dtype) @ v[lo:hi].to(self.compute_dtype)).double()
        return out

    # ------------------------------------------------------------------ products
    def middle(self) -> tuple[Tensor, float | Tensor]:
        """The compact form's ``2c × 2c`` middle matrix in ring-row order, and ``γ``: ``H V = γ V +
        [S; Y]ᵀ M [S V; Y V]`` over the ``c`` stored rows (float64).

        In chronological order ``M = [[R⁻ᵀ(D + γ YᵀY) R⁻¹, −γ R⁻ᵀ], [−γ R⁻¹, 0]]`` (the module docstring's
        matrix with the ``γ`` of ``[S γY]`` folded in); rows and columns are then permuted to the ring rows
        the pairs are stored in, so applying ``H`` needs no re-ordering. It depends on the history only:
        a caller that applies ``H`` at every step and pushes every ``k`` steps can keep it between pushes
        (``apply(V, middle=...)``) and save the small solves and gathers, most of the work for small blocks.
        """
        c = self.count
        gamma = self.gamma()
        if c == 0:
            return torch.zeros(0, 0, dtype=torch.float64, device=self.SY.device), gamma
        pos = torch.tensor(self.order(), device=self.SY.device)  # chrono i -> ring row
        SYc = self.SY[pos][:, pos]
        YYc = self.YY[pos][:, pos]
        R = torch.triu(SYc)
        eye = torch.eye(c, dtype=R.dtype, device=R.device)
        Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
        top_left = Rinv.T @ (torch.diag(torch.diagonal(SYc)) + gamma * YYc) @ Rinv
        M = torch.zeros(2 * c, 2 * c, dtype=torch.float64, device=R.device)
        M[:c, :c] = top_left
        M[:c, c:] = -gamma * Rinv.T
        M[c:, :c] = -gamma * Rinv
        ring = torch.cat([pos, pos + c])
        out = torch.empty_like(M)
        out[ring[:, None], ring[None, :]] = M
        return out, gamma

    def apply(self, V: Tensor, middle: tuple[Tensor, float | Tensor] | None = None) -> Tensor:
        """``H @ V`` by the compact representation; ``V`` is ``(n,)`` or ``(n, k)``. ``middle`` is
        :meth:`middle`'s result for the current history, when the caller keeps it."""
        return self.finish(V, self.project(V), middle)

    def project(self, V: Tensor) -> Tensor:
        """First half of :meth:`apply`: ``[S V; Y V]`` over the stored rows, ``(2c, k)`` in float64. A history
        split over ranks (each holding some columns of ``S`` and ``Y`` and the same rows of ``V``) sums these
        over the ranks before :meth:`finish`."""
        return self._project(self._as_matrix(V), self.count)

    def finish(self, V: Tensor, P: Tensor, middle: tuple[Tensor, float | Tensor] | None = None) -> Tensor:
        """Second half of :meth:`apply`: ``γ V + [S; Y]ᵀ M P`` from :meth:`project`'s ``P``."""
        Vm = self._as_matrix(V)
        M, gamma = self.middle() if middle is None else middle
        c = self.count
        out = gamma * Vm
        if c > 0:
            Q = (M @ P).to(Vm.dtype)  # [S V; Y V] in float64, ring order, then M
            self._reconstruct_into(out, Q[:c], Q[c:], c)
        out = out.reshape(V.shape)
        return out if out.dtype == V.dtype else out.to(V.dtype)

    def _as_matrix(self, V: Tensor) -> Tensor:
        """``V`` as ``(n, k)`` in the compute dtype (``n`` may be 0: a rank holding none of a block's elements)."""
        Vm = V.reshape(self.n, -1) if self.n else V.reshape(0, 1)
        return Vm if Vm.dtype == self.compute_dtype else Vm.to(self.compute_dtype)

    def _project(self, Vm: Tensor, c: int) -> Tensor:
        """``[S V; Y V]`` over the ``c`` stored rows, ``(2c, k)`` in float64."""
        S, Y = self.S[:c], self.Y[:c]
        if S.dtype == self.compute_dtype:
            return torch.cat([S @ Vm, Y @ Vm]).double()
        P = torch.zeros(2 * c, Vm.shape[1], dtype=torch.float64, device=Vm.device)
        step = _chunk(Vm.device)
        for lo in range(0, self.n, step):
            hi = min(lo + step, self.n)
            P[:c] += (S[:, lo:hi].to(self.compute_dtype) @ Vm[lo:hi]).double()
            P[c:] += (Y[:, lo:hi].to(self.compute_dtype) @ Vm[lo:hi]).double()
        return P

    def _reconstruct_into(self, out: Tensor, q1: Tensor, q2: Tensor, c: int) -> None:
        """``out += Sᵀ q1 + Yᵀ q2`` over the ``c`` stored rows (``out``, ``q1``, ``q2`` in the compute dtype)."""
        S, Y = self.S[:c], self.Y[:c]
        if S.dtype == out.dtype:
            out.addmm_(S.T, q1).addmm_(Y.T, q2)
            return
        step = _chunk(out.device)
        for lo in range(0, self.n, step):
            hi = min(lo + step, self.n)
            out[lo:hi].addmm_(S[:, lo:hi].to(out.dtype).T, q1).addmm_(Y[:, lo:hi].to(out.dtype).T, q2)

    def two_loop(self, v: Tensor) -> Tensor:
        """``H @ v`` by the two-loop recursion (Nocedal & Wright, Algorithm 7.4); ``v`` is ``(n,)``.

        Slower than :meth:`apply` for large ``n`` (``4m`` passes over the history); kept as the
        textbook reference and for very small histories.
        """
        q = v.reshape(-1).to(self.compute_dtype).clone()
        ring = self.order()
        alphas: list[float] = []
        for i in reversed(ring):
            s, y = self.S[i].to(q.dtype), self.Y[i].to(q.dtype)
            a = dot64(s, q) / float(self.SY[i, i])
            alphas.append(a)
            q -= a * y
        q *= self.gamma()
        for i, a in zip(ring, reversed(alphas)):
            s, y = self.S[i].to(q.dtype), self.Y[i].to(q.dtype)
            b = dot64(y, q) / float(self.SY[i, i])
            q += (a - b) * s
        return q.reshape(v.shape).to(v.dtype)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (``weights_only``-safe); counters as int64 0-dim tensors."""
        return {
            "S": self.S,
            "Y": self.Y,
            "SY": self.SY,
            "YY": self.YY,
            "count": torch.tensor(self.count, dtype=torch.int64),
            "head": torch.tensor(self.head, dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict`, keeping this history's own dtypes and device."""
        for key in ("S", "Y", "SY", "YY"):
            src = state[key]
            dst = getattr(self, key)
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(
                    f"L-BFGS history {key} has shape {tuple(src.shape)} in the state, expected "
                    f"{tuple(dst.shape)}: history_size or the block layout changed since it was saved"
                )
            dst.copy_(src.to(dtype=dst.dtype, device=dst.device))
        self.count = int(state["count"])
        self.head = int(state["head"])
