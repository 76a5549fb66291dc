"""Codecs for block updates and aggregates, with error feedback (DESIGN §1.1 "The global is exact").

One class per codec, all in :data:`CODECS`; ``federation.compression.codec``
picks one by name. A codec turns one float tensor into named *parts* (plain
tensors that travel like any other, see :mod:`pl_parablock.wire.framing`)
and back:

* ``none``: the tensor as it is (lossless);
* ``bf16`` / ``fp16``: a cast (2 bytes per value);
* ``int8``: absmax scale per chunk of ``group`` values, 8-bit integers;
* ``fp8``: ``float8_e4m3fn`` with an absmax scale per chunk;
* ``int4``: absmax scale per chunk, integers in [-7, 7], two per byte;
* ``topk``: the ``fraction`` largest magnitudes, their values as ``int8``
  with a scale per chunk, their indices delta-coded (gaps in the narrowest
  integer type that holds them).

Decoding is deterministic CPU arithmetic, so every holder of the parts
decodes the same tensor bitwise; that is what lets the server and every
client hold the same global (:class:`ErrorFeedback` and
:func:`advance`). A block travels as the parts of its tensors, named
``<tensor>`` (one part) or ``<tensor>::<part>``.

Adding a codec: one subclass here, registered in :data:`CODECS`. A codec
names the options it takes in :attr:`Codec.OPTIONS` (each one of
:data:`CODEC_OPTIONS`, a key of ``federation.compression`` with its default,
the values it accepts and its line in the recipe reference) and builds
itself from a mapping of options with :meth:`Codec.from_options`
(:func:`codec_of`); the recipe validates every option through the same
:class:`CodecOption`.

Example::

    >>> codec = make_codec("int8")
    >>> parts = encode_block(codec, {"w": torch.ones(3)})
    >>> decode_block(codec, parts, {"w": (3,)})["w"]
    tensor([1., 1., 1.])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from pl_parablock.errors import ParaBlockError

__all__ = [
    "CODECS",
    "CODEC_OPTIONS",
    "SEPARATOR",
    "Codec",
    "CodecError",
    "CodecOption",
    "ErrorFeedback",
    "advance",
    "block_problem",
    "codec_of",
    "decode_block",
    "encode_block",
    "make_codec",
]

SEPARATOR = "::"
"""Between a tensor's name and its part's name on the wire."""


class CodecError(ParaBlockError):
    """Compressed data that does not decode (a corrupt or forged payload), or a codec misconfigured."""


PartSpec = tuple[tuple[torch.dtype, ...], tuple[int, ...] | None]
"""What a part may be: its allowed dtypes and its shape (``None``: any 1-D length, checked on decode)."""


def _positive_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def _share(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1


@dataclass(frozen=True)
class CodecOption:
    """An option a codec takes: a key of ``federation.compression``, stated once for the codecs and the recipe.

    Args:
        name: the key (``federation.compression.<name>``) and the codec's keyword argument.
        default: its value when not given.
        accepts: whether a value is valid.
        expects: what a valid value is, in the codec's error (``group must be <expects>, not 0``).
        advice: the same for the recipe's error (```federation.compression.group` is 0; <advice>``).
        summary: its line in the recipe reference, after the codecs that take it.
    """

    name: str
    default: Any
    accepts: Callable[[Any], bool]
    expects: str
    advice: str
    summary: str

    def check(self, codec: str, value: Any) -> Any:
        """``value``, or :class:`CodecError` naming codec ``codec`` and what the option accepts."""
        if not self.accepts(value):
            raise CodecError(f"codec {codec!r}: {self.name} must be {self.expects}, not {value!r}")
        return value


CODEC_OPTIONS: dict[str, CodecOption] = {
    o.name: o
    for o in (
        CodecOption("group", 128, _positive_int, "a positive integer", "it must be >= 1", "values per absmax scale."),
        CodecOption("fraction", 0.01, _share, "in (0, 1]", "the share of values topk sends must be in (0, 1], e.g. 0.01",
                    "share of each tensor's values sent, in (0, 1]."),
    )
}  # fmt: skip
"""Every option some codec takes, by name (the keys of ``federation.compression`` besides the codec's name)."""


class Codec:
    """Encode one float tensor into named parts and decode them back (float32).

    Subclasses set :attr:`name`, list the options their constructor takes in
    :attr:`OPTIONS` (names of :data:`CODEC_OPTIONS`) and implement
    :meth:`encode`, :meth:`decode` and :meth:`parts`.
    """

    name: ClassVar[str] = ""
    lossless: ClassVar[bool] = False
    OPTIONS: ClassVar[tuple[str, ...]] = ()
    """The options of :data:`CODEC_OPTIONS` this codec takes, as keyword arguments."""

    def __init__(self, **options: Any) -> None:
        if options:
            raise CodecError(f"codec {self.name!r} takes no options (got {', '.join(sorted(options))})")

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | object) -> Codec:
        """This codec built from the options it takes, read from ``options`` (a mapping, or a section with those attributes).

        Keys it does not take (another codec's options, ``codec``, ``error_feedback``) are ignored; a
        missing one takes its default.

        Raises:
            CodecError: an option out of range.
        """
        read = options.get if isinstance(options, Mapping) else lambda name, default: getattr(options, name, default)
        return cls(**{name: read(name, CODEC_OPTIONS[name].default) for name in cls.OPTIONS})

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        """Parts of ``x`` (any float dtype, any shape), by part name (``""``: the only part)."""
        raise NotImplementedError

    def decode(self, parts: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        """The float32 tensor of ``shape`` the parts encode.

        Raises:
            CodecError: parts that cannot come from :meth:`encode`.
        """
        raise NotImplementedError

    def parts(self, shape: tuple[int, ...]) -> dict[str, PartSpec]:
        """The parts a tensor of ``shape`` travels as: allowed dtypes and shape of each."""
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


def _flat32(x: Tensor) -> Tensor:
    return x.detach().to("cpu").reshape(-1).to(torch.float32)


class NoCodec(Codec):
    """The tensor as it is, in its own dtype."""

    name = "none"
    lossless = True

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        return {"": x.detach().to("cpu")}

    def decode(self, parts: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return parts[""].reshape(shape).to(torch.float32)

    def parts(self, shape: tuple[int, ...]) -> dict[str, PartSpec]:
        return {"": ((torch.float32, torch.float64, torch.bfloat16, torch.float16), shape)}


class _Cast(Codec):
    dtype: ClassVar[torch.dtype]

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        limit = torch.finfo(self.dtype).max
        return {"": _flat32(x).clamp(-limit, limit).to(self.dtype).reshape(x.shape)}

    def decode(self, parts: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        return parts[""].reshape(shape).to(torch.float32)

    def parts(self, shape: tuple[int, ...]) -> dict[str, PartSpec]:
        return {"": ((self.dtype,), shape)}


class BF16(_Cast):
    """bfloat16: float32's range, 8 bits of mantissa."""

    name = "bf16"
    dtype = torch.bfloat16


class FP16(_Cast):
    """float16, saturated at ±65504."""

    name = "fp16"
    dtype = torch.float16


class _Grouped(Codec):
    """Values cut into chunks of ``group``; one float32 absmax scale per chunk."""

    levels: ClassVar[float]
    OPTIONS: ClassVar[tuple[str, ...]] = ("group",)

    def __init__(self, group: int = CODEC_OPTIONS["group"].default, **options: Any) -> None:
        super().__init__(**options)
        self.group: int = CODEC_OPTIONS["group"].check(self.name, group)

    def describe(self) -> str:
        return f"{self.name} (group {self.group})"

    def _groups(self, flat: Tensor) -> tuple[Tensor, Tensor]:
        """``flat`` padded to whole chunks, as ``[chunks, group]``, and each chunk's scale (absmax / levels)."""
        n = flat.numel()
        pad = (-n) % self.group
        g = torch.nn.functional.pad(flat, (0, pad)).view(-1, self.group)
        scale = g.abs().amax(dim=1) / self.levels
        return g, scale

    def _scaled(self, g: Tensor, scale: Tensor) -> Tensor:
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        return g / safe[:, None]

    def _unscale(self, values: Tensor, scale: Tensor, numel: int) -> Tensor:
        if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
            raise CodecError(f"{self.name}: a chunk's scale is negative or not finite")
        return (values.view(-1, self.group) * scale[:, None]).reshape(-1)[:numel]

    def _chunks(self, numel: int) -> int:
        return -(-numel // self.group)

    # the packed values (part ``q``) of the dense grouped codecs
    q_dtype: ClassVar[torch.dtype] = torch.int8

    def _q_len(self, numel: int) -> int:
        return numel

    def _values(self, q: Tensor, numel: int) -> Tensor:
        """The ``numel`` float32 values (before scaling) part ``q`` holds; raises :class:`CodecError` on an impossible one."""
        raise NotImplementedError

    def decode(self, parts: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        numel = math.prod(shape)
        values = self._values(parts["q"].reshape(-1), numel)
        padded = torch.nn.functional.pad(values, (0, (-numel) % self.group))
        return self._unscale(padded, parts["scale"].reshape(-1), numel).reshape(shape)

    def parts(self, shape: tuple[int, ...]) -> dict[str, PartSpec]:
        n = math.prod(shape)
        return {"q": ((self.q_dtype,), (self._q_len(n),)), "scale": ((torch.float32,), (self._chunks(n),))}


class Int8(_Grouped):
    """Symmetric 8-bit integers, absmax scale per chunk of ``group`` values."""

    name = "int8"
    levels = 127.0

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        flat = _flat32(x)
        g, scale = self._groups(flat)
        q = self._scaled(g, scale).round().clamp(-127, 127).to(torch.int8).reshape(-1)[: flat.numel()]
        return {"q": q, "scale": scale}

    def _values(self, q: Tensor, numel: int) -> Tensor:
        if bool((q == -128).any()):
            raise CodecError("int8: a value is -128, outside the codec's [-127, 127]")
        return q.to(torch.float32)


class FP8(_Grouped):
    """``float8_e4m3fn`` (travelling as its bytes), absmax scale per chunk mapping to ±448."""

    name = "fp8"
    levels = 448.0

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        flat = _flat32(x)
        g, scale = self._groups(flat)
        q = self._scaled(g, scale).clamp(-448, 448).to(torch.float8_e4m3fn).reshape(-1)[: flat.numel()]
        return {"q": q.view(torch.uint8), "scale": scale}

    q_dtype = torch.uint8

    def _values(self, q: Tensor, numel: int) -> Tensor:
        if bool(((q & 0x7F) == 0x7F).any()):
            raise CodecError("fp8: a value is NaN")
        return q.view(torch.float8_e4m3fn).to(torch.float32)


class Int4(_Grouped):
    """Symmetric integers in [-7, 7], two per byte (low nibble first), absmax scale per chunk."""

    name = "int4"
    levels = 7.0

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        flat = _flat32(x)
        g, scale = self._groups(flat)
        q = (self._scaled(g, scale).round().clamp(-7, 7) + 8).to(torch.uint8).reshape(-1)[: flat.numel()]
        if q.numel() % 2:
            q = torch.cat([q, torch.full((1,), 8, dtype=torch.uint8)])
        pairs = q.view(-1, 2)
        return {"q": pairs[:, 0] | (pairs[:, 1] << 4), "scale": scale}

    q_dtype = torch.uint8

    def _q_len(self, numel: int) -> int:
        return -(-numel // 2)

    def _values(self, q: Tensor, numel: int) -> Tensor:
        nibbles = torch.stack([q & 0x0F, q >> 4], dim=1).reshape(-1)[:numel]
        if bool((nibbles == 0).any()):
            raise CodecError("int4: a value is -8, outside the codec's [-7, 7]")
        return nibbles.to(torch.float32) - 8


_GAP_DTYPES = (torch.uint8, torch.int16, torch.int32)


class TopK(_Grouped):
    """The ``fraction`` largest magnitudes of each tensor: int8 values (scale per chunk of ``group``), delta-coded indices.

    ``k = ceil(fraction * numel)`` values are kept; their indices, ascending,
    travel as the gaps between them (the first from -1) in the narrowest of
    uint8, int16, int32 that holds the largest gap.
    """

    name = "topk"
    levels = 127.0
    OPTIONS: ClassVar[tuple[str, ...]] = ("group", "fraction")

    def __init__(
        self, fraction: float = CODEC_OPTIONS["fraction"].default, group: int = CODEC_OPTIONS["group"].default, **options: Any
    ) -> None:
        super().__init__(group=group, **options)
        self.fraction = float(CODEC_OPTIONS["fraction"].check(self.name, fraction))

    def describe(self) -> str:
        return f"topk (fraction {self.fraction:g}, group {self.group})"

    def k(self, numel: int) -> int:
        return min(numel, max(1, math.ceil(self.fraction * numel))) if numel else 0

    def encode(self, x: Tensor) -> dict[str, Tensor]:
        flat = _flat32(x)
        k = self.k(flat.numel())
        idx = torch.topk(flat.abs(), k, sorted=False).indices.sort().values if k else flat.new_zeros(0, dtype=torch.long)
        g, scale = self._groups(flat[idx])
        values = self._scaled(g, scale).round().clamp(-127, 127).to(torch.int8).reshape(-1)[:k]
        gaps = torch.diff(idx, prepend=idx.new_full((1,), -1))
        largest = int(gaps.max()) if k else 0
        dtype = next(d for d in _GAP_DTYPES if largest <= torch.iinfo(d).max)
        return {"gaps": gaps.to(dtype), "values": values, "scale": scale}

    def decode(self, parts: Mapping[str, Tensor], shape: tuple[int, ...]) -> Tensor:
        numel = math.prod(shape)
        gaps = parts["gaps"].reshape(-1).to(torch.long)
        values = parts["values"].reshape(-1)
        k = self.k(numel)
        if gaps.numel() != k or values.numel() != k:
            raise CodecError(f"topk: {gaps.numel()} indices and {values.numel()} values, the codec keeps {k}")
        if k and (bool((gaps < 1).any()) or int(gaps.sum()) - 1 >= numel):
            raise CodecError(f"topk: indices are not strictly increasing within the tensor's {numel} values")
        if bool((values == -128).any()):
            raise CodecError("topk: a value is -128, outside the codec's [-127, 127]")
        idx = gaps.cumsum(0) - 1
        padded = torch.nn.functional.pad(values.to(torch.float32), (0, (-k) % self.group))
        out = torch.zeros(numel, dtype=torch.float32)
        out[idx] = self._unscale(padded, parts["scale"].reshape(-1), k)
        return out.reshape(shape)

    def parts(self, shape: tuple[int, ...]) -> dict[str, PartSpec]:
        k = self.k(math.prod(shape))
        return {"gaps": (_GAP_DTYPES, (k,)), "values": ((torch.int8,), (k,)), "scale": ((torch.float32,), (self._chunks(k),))}


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoCodec, BF16, FP16, Int8, FP8, Int4, TopK)}
"""Every codec by name (``federation.compression.codec``)."""

WIRE_DTYPE_CODECS = {"float32": "none", "bfloat16": "bf16", "float16": "fp16"}
"""``federation.wire_dtype`` as the codec it is a shorthand for."""


def _codec_class(name: str) -> type[Codec]:
    try:
        return CODECS[name]
    except (KeyError, TypeError):
        raise CodecError(f"unknown codec {name!r}; use one of {', '.join(CODECS)}") from None


def make_codec(name: str, **options: Any) -> Codec:
    """The codec ``name`` with its options (``group``, ``fraction``), each given as a keyword argument.

    Raises:
        CodecError: an unknown codec, or an option it does not take or out of range.
    """
    cls = _codec_class(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise CodecError(f"codec {name!r}: {exc}") from None


def codec_of(name: str, options: Mapping[str, Any] | object) -> Codec:
    """The codec ``name`` built from the options it takes (:meth:`Codec.from_options`), e.g. ``federation.compression``.

    Example::

        >>> codec_of("topk", {"fraction": 0.05, "group": 64, "error_feedback": True}).describe()
        'topk (fraction 0.05, group 64)'

    Raises:
        CodecError: an unknown codec, or an option out of range.
    """
    return _codec_class(name).from_options(options)


def _part_name(tensor: str, part: str) -> str:
    return f"{tensor}{SEPARATOR}{part}" if part else tensor


def encode_block(codec: Codec, tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Every tensor's parts, named ``<tensor>`` or ``<tensor>::<part>``."""
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        for part, value in codec.encode(t).items():
            out[_part_name(name, part)] = value
    return out


def block_problem(codec: Codec, declared: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], like: Mapping[str, tuple[int, ...]]) -> str:
    """Why a payload's declared ``(name, dtype, shape)`` parts cannot be ``codec``'s parts of a block shaped ``like``, or ``''``."""
    expected = {_part_name(n, p): spec for n, shape in like.items() for p, spec in codec.parts(tuple(shape)).items()}
    names = [d[0] for d in declared]
    if sorted(names) != sorted(expected) or len(set(names)) != len(names):
        missing = sorted(set(expected) - set(names))[:3]
        extra = sorted(set(names) - set(expected))[:3]
        return f"the {codec.name} parts do not match the block (missing {missing}, unexpected {extra})"
    for name, dtype, shape in declared:
        dtypes, want = expected[name]
        if dtype not in dtypes:
            return f"part {name!r} is {dtype}; codec {codec.name} sends {' or '.join(str(d) for d in dtypes)}"
        if want is not None and math.prod(shape) != math.prod(want):
            return f"part {name!r} has {math.prod(shape)} values; codec {codec.name} sends {math.prod(want)} for this tensor"
    return ""


def decode_block(codec: Codec, parts: Mapping[str, Tensor], like: Mapping[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """The float32 tensors the parts of a block shaped ``like`` encode.

    Raises:
        CodecError: parts missing, of another size, or that do not decode
            to finite values (a corrupt or forged payload).
    """
    problem = block_problem(codec, [(n, t.dtype, tuple(t.shape)) for n, t in parts.items()], like)
    if problem:
        raise CodecError(problem)
    out = {}
    for name, shape in like.items():
        mine = {p: parts[_part_name(name, p)] for p in codec.parts(tuple(shape))}
        value = codec.decode(mine, tuple(shape))
        if not bool(torch.isfinite(value).all()):
            raise CodecError(f"tensor {name!r} decodes to NaN or infinite values")
        out[name] = value
    return out


def advance(g: Tensor, d: Tensor) -> Tensor:
    """``g + d`` in ``g``'s dtype, computed in float32 (or wider) on the CPU: the one arithmetic every holder of the global uses."""
    wide = torch.promote_types(g.dtype, torch.float32)
    return (g.detach().to("cpu", wide) + d.to(wide)).to(g.dtype)


class ErrorFeedback:
    """A sender's residuals per block: ``D = Q(x + r)``, ``r ← x + r − D`` (on the CPU).

    Without error feedback (``enabled=False``) the residual stays zero and
    ``D = Q(x)``.
    """

    def __init__(self, codec: Codec, enabled: bool = True) -> None:
        self.codec = codec
        self.enabled = enabled and not codec.lossless
        self.residuals: dict[int, dict[str, Tensor]] = {}

    def compress(self, block: int, delta: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The parts to send for ``delta`` of ``block`` and the float32 tensors they decode to."""
        r = self.residuals.get(block, {})
        x = {n: _flat32(t).reshape(t.shape) + r[n] if n in r else _flat32(t).reshape(t.shape) for n, t in delta.items()}
        parts = encode_block(self.codec, x)
        decoded = decode_block(self.codec, parts, {n: tuple(t.shape) for n, t in x.items()})
        if self.enabled:
            self.residuals[block] = {n: x[n] - decoded[n] for n in x}
        return parts, decoded

    def state_tensors(self, prefix: str = "") -> dict[str, Tensor]:
        """The residuals as flat named tensors (``<prefix><block>/<tensor>``), for checkpoints.

        A snapshot: :meth:`compress` replaces a block's residuals with new
        tensors (never in place), so another thread may compress meanwhile.
        """
        return {f"{prefix}{b}/{n}": t for b, r in list(self.residuals.items()) for n, t in r.items()}

    def load_state_tensors(self, tensors: Mapping[str, Tensor], prefix: str = "") -> None:
        self.residuals = {}
        for key, t in tensors.items():
            if key.startswith(prefix):
                b, _, n = key[len(prefix) :].partition("/")
                self.residuals.setdefault(int(b), {})[n] = t.to(torch.float32)


@dataclass(frozen=True)
class Compression:
    """How updates and aggregates travel (``federation.compression``).

    ``upload``: each client's update, ``D_i = Q(Δ_i + r_i)`` with its own
    residual per block; ``download``: the server's broadcast of a round's
    aggregate, ``D = Q(Δ_agg + r_b)`` with the server's residual per block,
    applied by the server and every client as ``g ← g + D``
    (:func:`~pl_parablock.core.codecs.advance`). ``error_feedback=False``
    drops the residuals (the compression error is lost).
    """

    upload: Codec = field(default_factory=NoCodec)
    download: Codec = field(default_factory=NoCodec)
    error_feedback: bool = True

    @property
    def lossy_upload(self) -> bool:
        return not self.upload.lossless

    @property
    def lossy_download(self) -> bool:
        return not self.download.lossless


NO_COMPRESSION = Compression()


def decode_update(compression: Compression, codec: str, tensors: Mapping[str, Tensor], like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The delta a compressed update's parts (of codec ``codec``) encode, for a block shaped ``like`` (the server's side).

    Raises:
        CodecError: another codec than the federation's, or parts that do not decode.
    """
    if codec != compression.upload.name:
        raise CodecError(
            f"the update is compressed with {codec!r}; this federation accepts {compression.upload.name!r} (federation.compression.codec)"
        )
    return decode_block(compression.upload, tensors, {n: tuple(t.shape) for n, t in like.items()})


def decode_broadcast(compression: Compression, parts: Mapping[str, Tensor], like: Mapping[str, Sequence[int]]) -> dict[str, Tensor]:
    """The aggregate delta ``D`` a compressed broadcast's parts encode (a client's side); ``like``: each tensor's shape."""
    return decode_block(compression.download, parts, {n: tuple(v) for n, v in like.items()})
