"""Triton main-entry packing (interpreter) gives the same bytes as kv_format.pack_main."""

import pytest
import torch

from v4d.kernels import kv_format, ops
from v4d.kernels import reference as ref
from v4d.serving.model.rope import inv_freq


@pytest.mark.parametrize("d,rope_dim", [(512, 64), (200, 40), (96, 0)], ids=["v4", "ragged-group", "no-rope"])
def test_pack_main_bytes_equal_the_reference(kops, dtype, gen, d, rope_dim):
    x = torch.randn(40, d, generator=gen) * torch.logspace(-8, 4, 40)[:, None]  # scales far apart
    x[0] = 0.0
    x[1, :] = -0.0
    x[2, ::3] = 1e-30  # subnormal range after scaling
    x[3, :8] = torch.tensor([448.0, 1.0625, 1.1875, -3.25, 2.0**-7, 2.0**-10 * 3, 2.0**-9, 17.0])  # E4M3 ties
    x[4, -rope_dim:] = 1.0 + 2.0**-8 if rope_dim else 0.0  # BF16 tie (to even)
    x = x.to(dtype)
    got = kops.pack_main(x, rope_dim)
    want = kv_format.pack_main(x, rope_dim)
    assert got.dtype == torch.uint8 and got.shape == (40, kv_format.main_bytes(d, rope_dim))
    assert torch.equal(got, want), f"{int((got != want).sum())} bytes differ"


@pytest.mark.parametrize("d", [128, 64, 16], ids=["v4", "two-groups", "part-group"])
def test_pack_index_bytes_equal_the_reference(kops, dtype, gen, d):
    x = torch.randn(40, d, generator=gen) * torch.logspace(-8, 4, 40)[:, None]
    x[0] = 0.0
    x[1, :] = -0.0
    x[2, :8] = torch.tensor([6.0, 0.25, -0.75, 1.25, 1.75, 2.5, -3.5, 5.0])  # every midpoint: ties go down
    x = x.to(dtype)
    got = kops.pack_index(x)
    want = kv_format.pack_index(x)
    assert got.dtype == torch.uint8 and got.shape == (40, kv_format.index_bytes(d))
    assert torch.equal(got, want), f"{int((got != want).sum())} bytes differ"


@pytest.mark.parametrize("kind", ["main", "index"])
def test_pack_into_store_rows_writes_those_rows_only(kops, gen, kind):
    """With out/rows each packed row lands in its store row, in place; the other rows keep their bytes."""
    x = torch.randn(5, 128, generator=gen) * 3
    rows = torch.tensor([9, 2, 14, 0, 7])
    want = kv_format.pack_main(x, 32) if kind == "main" else kv_format.pack_index(x)
    store = torch.randint(0, 256, (16, want.shape[1]), generator=gen, dtype=torch.uint8)
    before = store.clone()
    got = kops.pack_main(x, 32, store, rows) if kind == "main" else kops.pack_index(x, store, rows)
    assert torch.equal(got[rows], want)
    others = torch.ones(16, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(got[others], before[others])


@pytest.mark.parametrize("d", [128, 64], ids=["v4", "small"])
def test_pack_index_rotated_equals_packing_the_hadamard_rotation(kops, dtype, gen, d):
    x = (torch.randn(24, d, generator=gen) * torch.logspace(-3, 3, 24)[:, None]).to(dtype)
    rows = torch.arange(24).flip(0) * 2
    store = torch.zeros(48, kv_format.index_bytes(d), dtype=torch.uint8)
    got = kops.pack_index(x, store, rows, True)
    want = kv_format.pack_index(kv_format.hadamard(x))
    # fp32 sums in another order than the matmul's: a value on an FP4 midpoint could round the other way
    assert (got[rows] != want).sum() <= 2, f"{int((got[rows] != want).sum())} bytes differ"
    assert torch.equal(kops.pack_index(x, store.clone(), rows, True)[rows], got[rows])


@pytest.mark.parametrize("kind", ["main", "index", "index-rotated"])
@pytest.mark.parametrize("roped", [True, False], ids=["rope", "no-rope"])
def test_packing_with_norm_equals_packing_the_norms_output(kops, dtype, gen, kind, roped):
    """`norm=`: the rows' rms_norm (and RoPE), rounded to x's dtype, packed in the same launch: the
    bytes of the two launches; rows read in place from a column slice, written into store rows."""
    d, rd = (192, 64) if kind == "main" else (128, 64)
    wide = (torch.randn(7, d + 40, generator=gen) * torch.logspace(-3, 3, 7)[:, None]).to(dtype)
    x = wide[:, 8 : 8 + d]  # strided rows, as a joined projection's column slice
    weight = torch.rand(d, generator=gen) + 0.5
    pos = torch.tensor([0, 3, 17, 4096, 100_000, 5, 64])
    rotary = (pos, inv_freq(rd, 10000.0)) if roped else None
    norm = ops.RowNorm(weight, 1e-6, rotary)
    rows = torch.tensor([9, 2, 14, 0, 7, 11, 3])
    normed = kops.rms_norm(x, weight, 1e-6, dtype, rotary)

    def pack(v, n=None):
        store = torch.zeros(
            16, kv_format.main_bytes(d, rd) if kind == "main" else kv_format.index_bytes(d), dtype=torch.uint8
        )
        if kind == "main":
            return kops.pack_main(v, rd, store, rows, n)[rows]
        return kops.pack_index(v, store, rows, kind == "index-rotated", n)[rows]

    got = pack(x, norm)
    assert torch.equal(got, pack(normed)), f"{int((got != pack(normed)).sum())} bytes differ"
    # and the reference's (its norm in torch: a byte may round the other way; in fp32, as the
    # interpreter's bf16 / fp16 roundings differ from torch's; the norm's own tests cover those)
    if dtype == torch.float32:
        main = kind == "main"
        want = ref.pack_main(x, rd, norm=norm) if main else ref.pack_index(x, rotate=kind != "index", norm=norm)
        assert (got != want).float().mean() < 0.02
