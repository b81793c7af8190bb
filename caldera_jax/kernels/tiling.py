"""Tile-size arithmetic shared by the Pallas, Triton and Hadamard kernels."""


def pow2_at_least(v: int, lo: int) -> int:
    """The smallest power-of-two multiple lo·2^k (k >= 0) that is >= v; lo is the minimum tile."""
    p = lo
    while p < v:
        p *= 2
    return p
