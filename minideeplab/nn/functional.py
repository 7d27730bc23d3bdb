"""The shared math of convolution and pooling: output sizes, im2col, col2im, input checks.

``valid_taps`` serves the stride-1 "taps" path of ``Conv2d`` (see ``conv.py``): for each kernel tap, the
rectangle of output pixels whose input is real data rather than padding.

Layout (decided by speed): ``im2col`` returns ``cols`` of shape ``(N, C*kh*kw, Ho*Wo)``: channels×taps as
rows, output pixels as columns, one matrix per image. The convolution is then ``W (F, C*kh*kw) @ cols``,
a batched GEMM whose result is already ``(N, F, Ho*Wo)``, i.e. NCHW with no transpose copy. On this
machine's OpenBLAS this orientation measured 2-5x faster than the transposed ``(N*Ho*Wo, C*kh*kw)``
layout, which also needs a copy back to NCHW. ``im2col`` and ``col2im`` loop only over the kh*kw kernel
offsets, each iteration a strided slice copy (or slice-add) over the whole batch.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_array_module, launch_bound


def pair(v, name: str = "value") -> tuple[int, int]:
    """``3 -> (3, 3)``; ``(3, 5) -> (3, 5)``; anything else is a clear error."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, (int, np.integer)) for i in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def conv_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1) -> int:
    """``floor((size + 2p - d(k-1) - 1) / s) + 1``: the output length of a conv or pool along one axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def check_input(layer: str, x, channels: int | None = None, ndim: int = 4) -> None:
    """Raise TypeError/ValueError naming ``layer`` when ``x`` is not a float array of the expected shape."""
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"{layer}: expected an array, got {type(x).__name__}")
    if x.dtype.kind != "f":
        raise TypeError(f"{layer}: expected a floating-point array (float32 or float64), got dtype {x.dtype}")
    if x.ndim != ndim:
        want = "(N, C, H, W)" if ndim == 4 else f"{ndim} dimensions"
        raise ValueError(f"{layer}: expected input of shape {want}, got shape {tuple(x.shape)} ({x.ndim}-D)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{layer}: expected {channels} input channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")


def check_dtype(layer: str, x, param) -> None:
    """Inputs must have the parameters' dtype: silent float32->float64 promotion hides bugs and costs time."""
    if x.dtype != param.dtype:
        raise TypeError(f"{layer}: input dtype {x.dtype} does not match parameter dtype {param.dtype} "
                        f"(cast the input, or the module with .to({x.dtype}))")


def kernel_offsets(kh, kw, stride, dilation, Ho, Wo):
    """For each kernel tap (i, j): the strided slices of the padded input it reads."""
    (sh, sw), (dh, dw) = stride, dilation
    for i in range(kh):
        for j in range(kw):
            hs, ws = i * dh, j * dw
            yield i, j, slice(hs, hs + sh * (Ho - 1) + 1, sh), slice(ws, ws + sw * (Wo - 1) + 1, sw)


def pad2d(x, padding, value=0.0):
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    xp = get_array_module(x)
    N, C, H, W = x.shape
    out = xp.full((N, C, H + 2 * ph, W + 2 * pw), value, dtype=x.dtype)
    out[:, :, ph:ph + H, pw:pw + W] = x
    return out


def im2col(x, kernel_size, stride=1, padding=0, dilation=1, out=None):
    """Unfold patches into columns (written into ``out`` if it is given and has the right shape and dtype).

    Shapes: x: (N, C, H, W) -> cols: (N, C*kh*kw, Ho*Wo), rows ordered (c, i, j) like a conv weight
    ``(F, C, kh, kw)`` flattened; Ho = floor((H + 2p - d(k-1) - 1)/s) + 1.
    """
    (kh, kw), s, p, d = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
    xp = get_array_module(x)
    N, C, H, W = x.shape
    Ho, Wo = conv_output_size(H, kh, s[0], p[0], d[0]), conv_output_size(W, kw, s[1], p[1], d[1])
    xpad = pad2d(x, p)
    shape = (N, C * kh * kw, Ho * Wo)
    fits = out is not None and out.shape == shape and out.dtype == x.dtype and out.flags.c_contiguous
    cols = out if fits else xp.empty(shape, dtype=x.dtype)
    by_tap = cols.reshape(N, C, kh, kw, Ho, Wo)
    # A strided conv's tap reads every s-th pixel: a slow copy, s times over the same input. Split the padded input
    # once into its phases (rows r, r + s, ...; contiguous copies), and each tap reads one phase at stride 1
    # (conv0's 7x7 stride 2: 2.3 ms against 3.8). At stride 1 the one phase is the input itself.
    phases = {}
    for i in range(kh):
        for j in range(kw):
            (a, r), (b, c) = divmod(i * d[0], s[0]), divmod(j * d[1], s[1])
            if (r, c) not in phases:
                phase = xpad[:, :, r::s[0], c::s[1]]
                phases[r, c] = phase if s == (1, 1) else xp.ascontiguousarray(phase)
            by_tap[:, :, i, j] = phases[r, c][:, :, a:a + Ho, b:b + Wo]
    return cols


def gather_index(src_hw, dst_hw, kernel_size, stride=(1, 1), padding=(0, 0), dilation=(1, 1), transposed=False):
    """``(index, valid)`` for im2col as ONE gather: ``x.reshape(N, C, H*W)[:, :, index] * valid`` is the column matrix
    (N, C*kh*kw, Ho*Wo) of ``im2col`` (rows (c, i, j), columns the output pixels), from a tap-by-pixel index
    into the flat map. For tap (i, j) and pixel (r, c) of the destination it points at source pixel
    ``(r*s + i*d - p, c*s + j*d - p)``, or, ``transposed`` (stride 1), at ``(r - i*d + p, c - j*d + p)``: where a
    conv's output pixels are read back to the input pixel (r, c) for its input gradient (a correlation of dout with
    the flipped kernel). ``valid`` is 0 where that pixel is padding (``index`` then points at a real one, any).
    Built with NumPy on the host, once per geometry.

    Shapes: src_hw, dst_hw: (H, W) pairs -> index (int64), valid (bool): (kh*kw*Hd*Wd,).
    """
    sign = -1 if transposed else 1
    axes = []
    for k, s, p, d, n_dst, n_src in zip(kernel_size, stride, padding, dilation, dst_hw, src_hw):
        pos = np.arange(n_dst)[None, :] * s + sign * (np.arange(k)[:, None] * d - p)      # (k, n_dst)
        axes.append((np.clip(pos, 0, n_src - 1), (pos >= 0) & (pos < n_src)))
    (rows, rows_ok), (cols, cols_ok) = axes
    index = rows[:, None, :, None] * src_hw[1] + cols[None, :, None, :]                 # (kh, kw, Hd, Wd)
    valid = rows_ok[:, None, :, None] & cols_ok[None, :, None, :]
    return index.reshape(-1), valid.reshape(-1)


def col2im(cols, input_shape, kernel_size, stride=1, padding=0, dilation=1):
    """The adjoint of ``im2col``: add every column entry back to the input pixel it was read from.

    Shapes: cols: (N, C*kh*kw, Ho*Wo) -> dx: (N, C, H, W). Overlapping taps are summed by slice-adds,
    one per kernel offset (no ``np.add.at``).
    """
    (kh, kw), s, p, d = pair(kernel_size), pair(stride), pair(padding), pair(dilation)
    N, C, H, W = input_shape
    Ho, Wo = conv_output_size(H, kh, s[0], p[0], d[0]), conv_output_size(W, kw, s[1], p[1], d[1])
    cols = cols.reshape(N, C, kh, kw, Ho, Wo)
    return fold_taps(lambda i, j: cols[:, :, i, j], input_shape, (kh, kw), s, p, d, cols)


def fold_taps(tap_values, input_shape, kernel_size, stride, padding, dilation, like):
    """Add ``tap_values(i, j)`` (N, C, Ho, Wo) onto the input pixels tap (i, j) reads: the adjoint of reading
    the kernel windows (``col2im`` with the columns given per tap, so pooling never builds them all).

    Shapes: -> dx: (N, C, H, W) = ``input_shape``, dtype and array module of ``like``. All size arguments
    are (h, w) pairs.
    """
    (kh, kw), (ph, pw) = kernel_size, padding
    N, C, H, W = input_shape
    Ho, Wo = conv_output_size(H, kh, stride[0], ph, dilation[0]), conv_output_size(W, kw, stride[1], pw, dilation[1])
    dxpad = get_array_module(like).zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=like.dtype)
    for i, j, rows, cols in kernel_offsets(kh, kw, stride, dilation, Ho, Wo):
        dxpad[:, :, rows, cols] += tap_values(i, j)
    if (ph, pw) == (0, 0):
        return dxpad
    return dxpad[:, :, ph:ph + H, pw:pw + W]


def tap_major(w):
    """A conv weight with its taps first, contiguous: one (F, C) matrix per kernel offset (i, j), row-major order.

    On NumPy the transposing copy goes in blocks of 8192 (F, C) entries, each of whose kh*kw values stay in cache
    while they are spread over the taps: measured 2.6x faster than one ``ascontiguousarray`` for the ASPP's
    (256, 1024, 3, 3) weight (1.3 ms against 3.4). On a GPU one copy (one kernel).

    Shapes: w: (F, C, kh, kw) -> (kh*kw, F, C).
    """
    xp = get_array_module(w)
    F, C, kh, kw = w.shape
    if launch_bound(w):
        return xp.ascontiguousarray(w.transpose(2, 3, 0, 1)).reshape(kh * kw, F, C)
    flat = w.reshape(F * C, kh * kw)
    out = xp.empty((kh * kw, F * C), dtype=w.dtype)
    for start in range(0, F * C, 8192):
        out[:, start:start + 8192] = flat[start:start + 8192].T
    return out.reshape(kh * kw, F, C)


def valid_taps(kernel_size, padding, dilation, in_hw, out_hw):
    """For a stride-1 conv: each tap that reads any real input, with the rectangle where it does.

    Yields ``(i, j, (out_rows, out_cols), (in_rows, in_cols))``: output pixels ``out[..., out_rows, out_cols]``
    read ``x[..., in_rows, in_cols]`` through tap (i, j); everywhere else that tap reads zero padding. A tap
    whose window lies wholly in the padding (ASPP rate 18 on a 16x16 map: all but the centre) is skipped.
    """
    (kh, kw), (ph, pw), (dh, dw), (H, W), (Ho, Wo) = kernel_size, padding, dilation, in_hw, out_hw
    for i in range(kh):
        a = i * dh - ph                      # input row = output row + a
        y0, y1 = max(0, -a), min(Ho, H - a)
        for j in range(kw):
            b = j * dw - pw
            x0, x1 = max(0, -b), min(Wo, W - b)
            if y0 < y1 and x0 < x1:
                yield i, j, (slice(y0, y1), slice(x0, x1)), (slice(y0 + a, y1 + a), slice(x0 + b, x1 + b))


def _zero_wrapped(y, a: int, b: int) -> None:
    """Zero the pixels of ``y`` (..., H, W) that a flat shift by (a, b) pairs with nothing in the map: the first
    (a > 0) or last (a < 0) |a| rows and the first (b > 0) or last (b < 0) |b| columns."""
    H, W = y.shape[-2:]
    if a:
        rows = slice(0, min(a, H)) if a > 0 else slice(max(H + a, 0), H)
        y[..., rows, :] = 0
    if b:
        cols = slice(0, min(b, W)) if b > 0 else slice(max(W + b, 0), W)
        y[..., cols] = 0


def sum_shifted(blocks, shifts):
    """``out[n, f, r, c] = sum_t blocks[n, t, f, r + a_t, c + b_t]`` over the taps t whose pixel exists (kn2row's
    output: each tap's block moved by its offset; what falls off the map is dropped).

    A shift by (a, b) is a shift by ``a*W + b`` of the image seen flat (F*H*W per item): one long slice add per
    tap, even across rows and channels, because what such a flat shift would wrongly pair (the |a| rows and |b|
    columns at the block's edge, which no output pixel reads) is zeroed in ``blocks`` first: ``blocks`` is
    scratch. The tap at (0, 0) is copied instead of added to zeros. At 16x16 (32 channels, 9 taps): 80 µs against
    170 for one 2-D slice add per tap, whose many short rows cost more than their data.

    Shapes: blocks: (N, T, F, H, W) contiguous, shifts: T pairs (a, b) -> out: (N, F, H, W).
    """
    xp = get_array_module(blocks)
    N, T, F, H, W = blocks.shape
    L = F * H * W
    flat = blocks.reshape(N, T, L)
    centre = next((t for t, s in enumerate(shifts) if tuple(s) == (0, 0)), None)
    out = flat[:, centre].copy() if centre is not None else xp.zeros((N, L), dtype=blocks.dtype)
    for t, (a, b) in enumerate(shifts):
        if t == centre:
            continue
        off = a * W + b
        if abs(off) >= L:                      # reads only padding: adds nothing
            continue
        _zero_wrapped(blocks[:, t], a, b)
        if off >= 0:
            out[:, :L - off] += flat[:, t, off:]
        else:
            out[:, -off:] += flat[:, t, :L + off]
    return out.reshape(N, F, H, W)


def stack_shifted(dout, shifts):
    """The adjoint of ``sum_shifted``: ``D[n, t, f, r, c] = dout[n, f, r - a_t, c - b_t]``, zero where that pixel does
    not exist (kn2row's backward: dout moved to the input pixels each tap read). One flat slice copy per tap, then
    the |a| rows and |b| columns the flat copy filled from a neighbouring row or channel are zeroed.

    Shapes: dout: (N, F, H, W), shifts: T pairs (a, b) -> D: (N, T, F, H, W).
    """
    xp = get_array_module(dout)
    N, F, H, W = dout.shape
    L = F * H * W
    D = xp.empty((N, len(shifts), F, H, W), dtype=dout.dtype)
    flat, d = D.reshape(N, len(shifts), L), dout.reshape(N, L)
    for t, (a, b) in enumerate(shifts):
        off = min(max(a * W + b, -L), L)
        if off >= 0:
            flat[:, t, off:] = d[:, :L - off]
            flat[:, t, :off] = 0
        else:
            flat[:, t, :L + off] = d[:, -off:]
            flat[:, t, L + off:] = 0
        _zero_wrapped(D[:, t], a, b)
    return D


def channel_sum(a, b=None, out=None):
    """Per-channel sum over (N, H, W) of ``a`` (or of ``a * b``), as BLAS products without temporaries; written into
    ``out`` if given.

    Shapes: a, b: (N, C, H, W) -> (C,). ``a`` viewed as (N, C, H*W) times a vector of ones is a GEMV (also for a
    channel-prefix view of a bigger buffer); ``a * b`` summed is a batched dot product (einsum). Measured ~1.5x
    (sum) and ~2.5x (product) faster than ``a.sum(axis=(0, 2, 3))`` / ``(a * b).sum(axis=(0, 2, 3))``.
    """
    xp = get_array_module(a)
    if launch_bound(a):
        # GPU: one reduction kernel each; the BLAS trick would add launches and copies of strided prefix views
        return (a if b is None else a * b).sum(axis=(0, 2, 3), out=out)
    N, C, H, W = a.shape
    a3 = a.reshape(N, C, H * W)
    if b is None:
        return (a3 @ xp.ones(H * W, dtype=a.dtype)).sum(axis=0, out=out)
    return xp.einsum("ncp,ncp->c", a3, b.reshape(N, C, H * W), out=out)


def channel_mean(a, b=None, out=None):
    """Per-channel mean over (N, H, W) of ``a`` (or of ``a * b``), written into ``out`` if given: ``channel_sum``
    divided by N*H*W, and on a GPU one reduction kernel that divides as it sums.

    Shapes: a, b: (N, C, H, W) -> (C,).
    """
    if launch_bound(a):
        return (a if b is None else a * b).mean(axis=(0, 2, 3), out=out)
    return get_array_module(a).divide(channel_sum(a, b), a.shape[0] * a.shape[2] * a.shape[3], out=out)
