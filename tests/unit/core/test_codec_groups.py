"""Grouped codecs keep one absmax scale per chunk of ``group`` values (DESIGN §1.1; codecs ``int8``, ``int4``).

The rule, written out: the values are cut into chunks of ``group``
consecutive values (flattened, the last chunk shorter); each chunk's scale
is its own absmax over the codec's largest level (127 for int8, 7 for
int4), and a value is rounded to the nearest multiple of its chunk's scale.
So the decoding error of every value is at most half its chunk's scale,
``absmax(chunk) / levels / 2``, whatever the other chunks hold. A codec with
one scale per tensor breaks this bound on every chunk much smaller than the
tensor's largest one (its values round to zero); the inputs below put
chunks twelve orders of magnitude apart side by side.
"""

from __future__ import annotations

import pytest
import torch

from pl_parablock.core.codecs import decode_block, encode_block, make_codec
from pl_parablock.recipe.build import compression_of
from pl_parablock.recipe.load import load_recipe

LEVELS = {"int8": 127.0, "int4": 7.0}
SCALES = [1e-6, 1e3, 1.0, 0.0, 1e-3, 1e6, 3e-2]  # one per chunk, 0.0: a chunk of zeros


def mixed(group: int, tail: int = 3, seed: int = 0) -> torch.Tensor:
    """Chunks of ``group`` values of very different sizes (one per :data:`SCALES`), then ``tail`` more values."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(group, generator=gen) * s for s in SCALES]
    chunks.append(torch.randn(tail, generator=gen) * 5e-5)
    return torch.cat(chunks)


def assert_error_within_each_chunk(x: torch.Tensor, y: torch.Tensor, group: int, levels: float) -> None:
    flat_x, flat_y = x.reshape(-1).double(), y.reshape(-1).double()
    for start in range(0, flat_x.numel(), group):
        xs, ys = flat_x[start : start + group], flat_y[start : start + group]
        absmax = float(xs.abs().max())
        bound = absmax / levels / 2 * (1 + 1e-5)  # half a step of this chunk's own scale, plus float32 rounding
        err = float((xs - ys).abs().max())
        assert err <= bound, f"chunk at {start}: absmax {absmax:g}, error {err:g} > {bound:g}"
        if absmax == 0.0:
            assert torch.equal(ys, torch.zeros_like(ys))


@pytest.mark.parametrize("name", ["int8", "int4"])
@pytest.mark.parametrize("group", [4, 16])
def test_grouped_codec_error_is_bounded_by_each_chunks_own_absmax(name, group):
    codec = make_codec(name, group=group)
    x = mixed(group)
    for shaped in (x, x[: (x.numel() // 2) * 2].reshape(2, -1)):  # flat and 2-D: chunks run over the flattened values
        y = decode_block(codec, encode_block(codec, {"w": shaped}), {"w": tuple(shaped.shape)})["w"]
        assert y.shape == shaped.shape and y.dtype == torch.float32
        assert_error_within_each_chunk(shaped, y, group, LEVELS[name])


def test_a_small_chunk_beside_a_large_one_is_not_rounded_away():
    codec = make_codec("int8", group=2)
    x = torch.tensor([1000.0, -500.0, 0.003, -0.001])
    y = decode_block(codec, encode_block(codec, {"w": x}), {"w": (4,)})["w"]
    # second chunk: scale 0.003 / 127, so 0.003 is exact up to float32 rounding, -0.001 within half a step
    assert abs(float(y[2]) - 0.003) <= 0.003 * 1e-6
    assert abs(float(y[3]) + 0.001) <= 0.003 / 127 / 2 * (1 + 1e-5)
    assert float(y[3]) != 0.0


@pytest.mark.parametrize("group", [8, 32])
def test_the_recipes_int8_group_reaches_both_directions(tmp_path, group):
    recipe = load_recipe(
        None, ["federation.compression.codec=int8", f"federation.compression.group={group}", f"output_dir={tmp_path / 'run'}"]
    )
    compression = compression_of(recipe)
    x = mixed(group, seed=group)
    for codec in (compression.upload, compression.download):
        y = decode_block(codec, encode_block(codec, {"w": x}), {"w": tuple(x.shape)})["w"]
        assert_error_within_each_chunk(x, y, group, 127.0)
