"""Orthogonal matrices for rotation folding: Hadamard matrices of every order this module can
construct, randomized signs, seeded random orthogonal blocks, and the one factored form that the
passes fold into weights and the online transform applies to activations.

Every rotation has the factored form ``Q = diag(s) · (H_p ⊗ B) · c``:

- ``s``: ``±1`` signs drawn from the seed (``None`` for ``kind="random"``);
- ``H_p``: the unnormalized Sylvester Hadamard matrix of the power-of-two part ``p`` (applied as a
  butterfly, ``O(n log p)``);
- ``B``: an ``m × m`` block (``m = n / p``) or ``None`` (``m = 1``): the unnormalized ``±1``
  Hadamard matrix of order ``m`` (exact in every float dtype) or a seeded random orthogonal block;
- ``c``: the scalar that makes ``Q`` orthonormal (``1/√n`` with a Hadamard block, ``1/√p`` with a
  random one).

Hadamard orders covered (``hadamard_matrix``): ``n = 2^a · m`` with ``m = 1`` (Sylvester), ``m = q + 1``
for a prime power ``q ≡ 3 (mod 4)`` (Paley I: 12, 20, 24, 28, 44, 48, 60, 68, 72, 80, 84, 104,
108, 132, 140, 152, 164, 168, 180, …, 244 = 3⁵ + 1, 344 = 7³ + 1, …), ``m = 2(q + 1)`` for a prime
power ``q ≡ 1 (mod 4)`` (Paley II: 12, 20, 28, 36, 52 (q = 25), 60, 76, 84, 100 (q = 49), 108,
124, 148, 164, 180, 196, …) and Kronecker products of these. Of the multiples of 4 below 400 only
92, 116, 156, 172, 184, 188, 232, 236, 260, 268, 292, 324, 356, 372 and 376 are not constructed
(their known Hadamard matrices are Williamson-type or sporadic). Model sizes: every power of two,
384 = 32·12, 576 = 16·36, 896 = 32·28, 1536 = 128·12, 3072 = 256·12, 4864 = 64·76,
5632 = 128·44, 8960 = 64·140, 11008 = 32·344 (Paley I over GF(7³)), 13824 = 128·108,
14336 = 512·28, 18944 = 128·148 are Hadamard orders here. Sizes that are not (172 = 4·43, 9, …)
get ``H_p ⊗ R`` with ``p`` the largest power of two dividing ``n`` and ``R`` a seeded random
orthogonal block of the odd part; odd ``n`` get a dense seeded random orthogonal matrix. So every ``n`` has a rotation (:func:`covered` says
which kind).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

KINDS = ("hadamard", "random")
"""``rotation(kind=...)``: Hadamard-based (random signs × Hadamard, or Hadamard ⊗ random block
where no Hadamard matrix of the size is constructed) or a dense random orthogonal matrix."""

MAX_CORE = 4096
"""Largest non-power-of-two Hadamard core constructed (Paley over GF(q), q < MAX_CORE)."""


# ----------------------------------------------------------------------------- small number theory
def is_power_of_two(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k``, ``p`` prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _two_adic(n: int) -> int:
    """The largest power of two dividing ``n``."""
    return n & -n


# ----------------------------------------------------------------------------- finite fields
class _GF:
    """GF(p^k): elements are the integers 0..q-1, read as base-p digit vectors (coefficients of
    a polynomial modulo a monic irreducible polynomial of degree k)."""

    def __init__(self, p: int, k: int):
        self.p, self.k, self.q = p, k, p ** k
        self.modulus = _irreducible(p, k)

    def digits(self, a: np.ndarray) -> np.ndarray:
        return np.stack([(a // self.p ** i) % self.p for i in range(self.k)], axis=-1)

    def from_digits(self, d: np.ndarray) -> np.ndarray:
        return sum(d[..., i].astype(np.int64) * self.p ** i for i in range(self.k))

    def mul(self, a: int, b: int) -> int:
        da, db = self.digits(np.array(a)), self.digits(np.array(b))
        prod = [0] * (2 * self.k - 1)
        for i, j in itertools.product(range(self.k), repeat=2):
            prod[i + j] = (prod[i + j] + int(da[i]) * int(db[j])) % self.p
        for deg in range(2 * self.k - 2, self.k - 1, -1):  # reduce by the monic modulus
            c = prod[deg]
            if c:
                for i in range(self.k + 1):
                    prod[deg - self.k + i] = (prod[deg - self.k + i] - c * self.modulus[i]) % self.p
        return int(self.from_digits(np.array(prod[: self.k])))

    def quadratic_character(self) -> np.ndarray:
        """χ(a) for every element: 0 at 0, 1 on nonzero squares, -1 otherwise."""
        chi = -np.ones(self.q, dtype=np.int64)
        chi[0] = 0
        for y in range(1, self.q):
            chi[self.mul(y, y)] = 1
        return chi

    def jacobsthal(self) -> np.ndarray:
        """``Q[i, j] = χ(a_i − a_j)``."""
        chi = self.quadratic_character()
        d = self.digits(np.arange(self.q))
        diff = (d[:, None, :] - d[None, :, :]) % self.p
        return chi[self.from_digits(diff)]


def _irreducible(p: int, k: int) -> list[int]:
    """Coefficients (low to high, monic) of the first irreducible polynomial of degree ``k``
    over GF(p), by trial division."""
    if k == 1:
        return [0, 1]

    def polys(deg: int):
        for low in itertools.product(range(p), repeat=deg):
            yield [*low, 1]

    def divides(f: list[int], g: list[int]) -> bool:
        r = list(g)
        for deg in range(len(r) - 1, len(f) - 2, -1):
            c = r[deg]
            if c:
                for i in range(len(f)):
                    r[deg - len(f) + 1 + i] = (r[deg - len(f) + 1 + i] - c * f[i]) % p
        return not any(r[: len(f) - 1])

    for g in polys(k):
        if g[0] == 0:
            continue
        if not any(divides(f, g) for deg in range(1, k // 2 + 1) for f in polys(deg)):
            return g
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover


# ----------------------------------------------------------------------------- Hadamard matrices
@functools.lru_cache(maxsize=64)
def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int8)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley1(q: int) -> np.ndarray:
    """Order q + 1, q ≡ 3 (mod 4) a prime power: ``I + [[0, 1ᵀ], [−1, Q]]``."""
    p, k = _prime_power(q)
    jac = _GF(p, k).jacobsthal()
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
    return (s + np.eye(q + 1, dtype=np.int64)).astype(np.int8)


def _paley2(q: int) -> np.ndarray:
    """Order 2(q + 1), q ≡ 1 (mod 4) a prime power: the conference matrix
    ``C = [[0, 1ᵀ], [1, Q]]`` gives ``C ⊗ [[1, −1], [−1, −1]] + I ⊗ [[1, 1], [1, −1]]``."""
    p, k = _prime_power(q)
    jac = _GF(p, k).jacobsthal()
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jac
    h = np.kron(c, np.array([[1, -1], [-1, -1]])) + np.kron(np.eye(q + 1, dtype=np.int64), np.array([[1, 1], [1, -1]]))
    return h.astype(np.int8)


@functools.cache
def _core_recipe(m: int) -> tuple | None:
    """How to build a Hadamard matrix of order ``m`` (``m`` = 1, 2 or a multiple of 4), or None:
    ``("sylvester",)``, ``("paley1", q)``, ``("paley2", q)``, ``("kron", a, b)``."""
    if is_power_of_two(m):
        return ("sylvester",)
    if m % 4 or m > MAX_CORE:
        return None
    pp = _prime_power(m - 1)
    if pp is not None and (m - 1) % 4 == 3:
        return ("paley1", m - 1)
    pp = _prime_power(m // 2 - 1)
    if pp is not None and (m // 2 - 1) % 4 == 1:
        return ("paley2", m // 2 - 1)
    for a in range(2, math.isqrt(m) + 1):
        if m % a == 0 and _core_recipe(a) is not None and _core_recipe(m // a) is not None:
            return ("kron", a, m // a)
    return None


@functools.lru_cache(maxsize=32)
def _core(m: int) -> np.ndarray:
    recipe = _core_recipe(m)
    if recipe is None:
        raise ValueError(f"no Hadamard construction of order {m}")
    if recipe[0] == "sylvester":
        return _sylvester(m)
    if recipe[0] == "paley1":
        return _paley1(recipe[1])
    if recipe[0] == "paley2":
        return _paley2(recipe[1])
    return np.kron(_core(recipe[1]), _core(recipe[2])).astype(np.int8)


@functools.cache
def hadamard_split(n: int) -> tuple[int, int] | None:
    """``(p, m)`` with ``n = p · m``, ``p`` a power of two and ``m`` the smallest Hadamard core
    this module constructs (``m = 1`` for powers of two), or None when no Hadamard matrix of order
    ``n`` is constructed."""
    if n < 1:
        return None
    p = _two_adic(n)
    while p >= 1:
        m = n // p
        if m == 1 or (_core_recipe(m) is not None and not is_power_of_two(m)):
            return p, m
        p //= 2
    return None


def hadamard_matrix(n: int) -> torch.Tensor:
    """The unnormalized ``±1`` Hadamard matrix of order ``n`` (``H Hᵀ = n I``), float64:
    ``H_p ⊗ H_m`` with ``(p, m) = hadamard_split(n)`` (Sylvester for powers of two, Paley I/II
    cores otherwise). Raises ValueError for an order this module does not construct."""
    split = hadamard_split(n)
    if split is None:
        raise ValueError(f"no Hadamard matrix of order {n} is constructed here ({describe(n)})")
    p, m = split
    h = _sylvester(p) if m == 1 else np.kron(_sylvester(p), _core(m))
    return torch.from_numpy(h.astype(np.float64))


def covered(n: int) -> str:
    """Which kind of rotation ``rotation(n, kind="hadamard")`` gives: ``"hadamard"`` (a Hadamard
    matrix of order n), ``"hadamard-random"`` (Hadamard of the power-of-two part ⊗ a random
    orthogonal block of the odd part) or ``"random"`` (odd n: a dense random orthogonal matrix)."""
    if hadamard_split(n) is not None:
        return "hadamard"
    return "hadamard-random" if n % 2 == 0 else "random"


def describe(n: int) -> str:
    """How ``rotation(n)`` is built, in words (for docs, stats and error messages)."""
    split = hadamard_split(n)
    if split is not None:
        p, m = split
        if m == 1:
            return f"{n} = 2^{p.bit_length() - 1}: Sylvester"
        recipe = _core_recipe(m)
        core = {"paley1": f"Paley I, q = {recipe[-1]}", "paley2": f"Paley II, q = {recipe[-1]}"}.get(
            recipe[0], f"Kronecker {recipe[1:]}" if recipe[0] == "kron" else "Sylvester")
        return f"{n} = {p}·{m}: Sylvester {p} ⊗ Hadamard {m} ({core})"
    p = _two_adic(n)
    if p == 1:
        return f"{n} is odd: no Hadamard matrix; dense random orthogonal"
    return f"{n} = {p}·{n // p}: no Hadamard matrix constructed; Sylvester {p} ⊗ random orthogonal {n // p}"


# ----------------------------------------------------------------------------- random parts
def derive_seed(seed: int, *keys: object) -> int:
    """A seed for a sub-rotation (a head, a transform, a block): deterministic on every platform."""
    digest = hashlib.blake2b(repr((int(seed), *keys)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """``n`` seeded ``±1`` values (float64)."""
    g = torch.Generator().manual_seed(derive_seed(seed, "signs", n))
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-random orthogonal ``n × n`` matrix (float64): QR of a seeded Gaussian, with the
    signs of R's diagonal moved into Q so that the decomposition is unique."""
    g = torch.Generator().manual_seed(derive_seed(seed, "orthogonal", n))
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    d = torch.sign(torch.diagonal(r))
    d[d == 0] = 1
    return q * d[None, :]


# ----------------------------------------------------------------------------- the factored form
_CHUNK_BITS = 6


@functools.lru_cache(maxsize=32)
def _sylvester_tensor(s: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(_sylvester(s).astype(np.float64)).to(device=device, dtype=dtype)


def hadamard_transform(x: torch.Tensor, signs: torch.Tensor | None, block: torch.Tensor | None,
                       scale: float, groups: int = 1) -> torch.Tensor:
    """``x · Q`` along the last dimension for ``Q = diag(signs) · (H_p ⊗ block) · scale``,
    ``p = n / block.shape[0]`` (``n / 1`` without a block): the reference of the online transform
    (``qcompile::hadamard_transform``). ``groups > 1``: ``Q = I_groups ⊗ Q_g``, the same transform
    over each run of ``g = n / groups`` consecutive channels (``signs`` and ``block`` sized for
    ``g``). Computes in float32 (float64 stays float64), returns the input dtype."""
    if groups != 1:
        if groups < 1 or x.shape[-1] % groups:
            raise ValueError(f"hadamard_transform: {groups} groups do not divide the last dimension {x.shape[-1]}")
        grouped = x.reshape(*x.shape[:-1], groups, x.shape[-1] // groups)
        return hadamard_transform(grouped, signs, block, scale).reshape(x.shape)
    n = x.shape[-1]
    m = block.shape[0] if block is not None else 1
    if n % m or not is_power_of_two(n // m):
        raise ValueError(f"hadamard_transform: last dimension {n} is not a power of two times the block size {m}")
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(work)
    if signs is not None:
        y = y * signs.to(device=y.device, dtype=work)
    lead, p = y.shape[:-1], n // m
    y = y.reshape(-1, p, m)
    done, bits = 0, p.bit_length() - 1
    while done < bits:  # H_p = H_{2^c} ⊗ … ⊗ H_{2^c'}: one small matmul per chunk of up to 6 bits
        c = min(_CHUNK_BITS, bits - done)
        s, lo = 1 << c, 1 << done
        y = torch.matmul(_sylvester_tensor(s, work, y.device), y.reshape(-1, s, lo * m))
        done += c
    y = y.reshape(-1, p, m)
    if block is not None:
        y = y @ block.to(device=y.device, dtype=work)
    return (y * scale).reshape(*lead, n).to(x.dtype)


@dataclass(frozen=True)
class Rotation:
    """An orthonormal ``n × n`` rotation in factored form (module docstring):
    ``Q = diag(signs) · (H_p ⊗ block) · scale``. ``block_is_hadamard``: the block holds ``±1``
    entries (exact in every dtype)."""

    n: int
    kind: str
    seed: int
    signs: torch.Tensor | None
    p: int
    block: torch.Tensor | None
    scale: float
    block_is_hadamard: bool = True
    groups: int = 1
    """``I_groups ⊗ Q_g``: the factors above describe ``Q_g`` over ``g = n / groups`` channels."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x · Q`` along the last dimension (float64 in, float64 out)."""
        return hadamard_transform(x, self.signs, self.block, self.scale, self.groups)

    def apply_transpose(self, x: torch.Tensor) -> torch.Tensor:
        """``x · Qᵀ`` along the last dimension."""
        shape = x.shape
        x = x.reshape(*shape[:-1], self.groups, shape[-1] // self.groups)
        block_t = self.block.t() if self.block is not None else None  # Qᵀ = c · (H_p ⊗ Bᵀ) · diag(s)
        y = hadamard_transform(x, None, block_t, self.scale)
        y = y * self.signs.to(y.dtype) if self.signs is not None else y
        return y.reshape(shape)

    def matrix(self) -> torch.Tensor:
        return self.apply(torch.eye(self.n, dtype=torch.float64))

    def describe(self) -> str:
        if self.groups > 1:
            return f"{self.n} = {self.groups} groups of {self.n // self.groups}: {describe(self.n // self.groups)}"
        return describe(self.n) if self.kind == "hadamard" else f"{self.n}: dense random orthogonal"


def rotation_factors(n: int, seed: int = 0, kind: str = "hadamard") -> Rotation:
    """The factored rotation of size ``n`` (see :func:`rotation`)."""
    if kind not in KINDS:
        raise ValueError(f"rotation kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if n < 1:
        raise ValueError(f"rotation size must be positive, got {n}")
    if kind == "random":
        return Rotation(n, kind, seed, None, 1, random_orthogonal(n, seed), 1.0, block_is_hadamard=False)
    signs = random_signs(n, seed)
    split = hadamard_split(n)
    if split is not None:
        p, m = split
        block = torch.from_numpy(_core(m).astype(np.float64)) if m > 1 else None
        return Rotation(n, kind, seed, signs, p, block, 1.0 / math.sqrt(n))
    p = _two_adic(n)
    block = random_orthogonal(n // p, derive_seed(seed, "block"))
    return Rotation(n, kind, seed, signs, p, block, 1.0 / math.sqrt(p), block_is_hadamard=False)


def grouped_rotation_factors(n: int, group: int, seed: int = 0, kind: str = "hadamard") -> Rotation:
    """``I_{n/group} ⊗ Q_group``: one rotation of size ``group`` (:func:`rotation_factors`) applied to
    each run of ``group`` consecutive channels. For weight-only quantization with groups of that
    size it spreads a group's outliers as a full rotation does (docs/rotation.md), at a fraction of
    the online cost."""
    if group < 1 or n % group:
        raise ValueError(f"rotation group {group} does not divide size {n}")
    if group == n:
        return rotation_factors(n, seed, kind)
    base = rotation_factors(group, seed, kind)
    return Rotation(n, base.kind, seed, base.signs, base.p, base.block, base.scale, base.block_is_hadamard,
                    groups=n // group)


def rotation(n: int, seed: int = 0, kind: str = "hadamard") -> torch.Tensor:
    """An orthonormal ``n × n`` float64 matrix.

    ``kind="hadamard"``: ``diag(s) · H_n / √n`` with seeded random signs ``s`` where a Hadamard
    matrix of order ``n`` is constructed (:func:`covered` is ``"hadamard"``); otherwise
    ``diag(s) · (H_p ⊗ R) / √p`` with ``p`` the largest power of two dividing ``n`` and ``R`` a
    seeded random orthogonal block of the odd part ``n / p`` (odd ``n``: ``R`` alone). So every
    ``n`` has a rotation. ``kind="random"``: a dense seeded Haar-random orthogonal matrix.
    Deterministic in ``(n, seed, kind)``.
    """
    return rotation_factors(n, seed, kind).matrix()
