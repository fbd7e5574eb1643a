"""Row copies through index tensors: dst[dst_rows[i]] = src[src_rows[i]], one program per (row, block
of columns), any dtype (packed uint8 rows too). The window-ring and compressor-tail writes after a
step, which torch runs as a gather plus a scatter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from v4d.kernels.launch import pow2


@triton.jit
def _copy_rows_kernel(dst_ptr, src_ptr, di_ptr, si_ptr, C, sd, ss, BLOCK_C: tl.constexpr):
    i = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.load(di_ptr + i).to(tl.int64)
    s = tl.load(si_ptr + i).to(tl.int64)
    v = tl.load(src_ptr + s * ss + c, mask=c < C)
    tl.store(dst_ptr + d * sd + c, v, mask=c < C)


def copy_rows(dst: torch.Tensor, dst_rows: torch.Tensor, src: torch.Tensor, src_rows: torch.Tensor) -> None:
    m, c = src_rows.shape[0], src.shape[1]
    if m == 0 or c == 0:
        return
    src = src if src.stride(1) == 1 else src.contiguous()
    block_c = min(pow2(c), 1024)
    _copy_rows_kernel[(m, triton.cdiv(c, block_c))](
        dst, src, dst_rows, src_rows, c, dst.stride(0), src.stride(0), BLOCK_C=block_c
    )
