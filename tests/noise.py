"""The noise stream at arbitrary positions, in PyTorch (``fastvae._philox``): the oracle for
probes of the kernels' counter arithmetic at positions no test tensor can reach."""
import torch

from fastvae import _philox


def philox_normals(seed: int, calls: torch.Tensor) -> torch.Tensor:
    """``[4, n]``: the four normals of the Philox calls at int64 counters ``calls``."""
    key = torch.full_like(calls, seed)
    zeros = torch.zeros_like(calls)
    words = _philox.philox4x32_10(calls & 0xFFFFFFFF, calls >> 32, zeros, zeros,
                                  key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF)
    u1, u2, u3, u4 = (_philox._uniform(w) for w in words)
    return torch.stack(_philox._box_muller(u1, u2) + _philox._box_muller(u3, u4))


def stream_at(seed: int, elements: torch.Tensor, quarter: int) -> torch.Tensor:
    """Elements of the stream with ``quarter`` Philox calls at int64 positions: element i is
    output ``i // quarter`` of the call at counter ``i % quarter``."""
    which = elements // quarter
    normals = philox_normals(seed, elements - which * quarter)
    return normals.gather(0, which.view(1, -1)).view(-1)
