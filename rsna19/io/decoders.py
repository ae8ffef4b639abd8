"""Pixel decoders: which package decodes which transfer syntax, and a pydicom plugin for the JPEG (ITU T.81) family.

pydicom 3 decodes compressed pixel data through plugins. Out of the box, with this project's requirements:

* uncompressed (implicit / explicit VR little endian, explicit VR big endian), deflated explicit VR little endian
  and RLE Lossless: pydicom itself;
* JPEG 2000 (lossless and lossy): pylibjpeg + pylibjpeg-openjpeg (MIT, OpenJPEG BSD-2);
* JPEG-LS lossless and near-lossless: pyjpegls (MIT, CharLS BSD-3), pydicom's own ``pyjpegls`` plugin;
* JPEG baseline (8 bit): Pillow (MIT-CMU), pydicom's own ``pillow`` plugin, then the plugin below;
* JPEG extended (12 bit), JPEG lossless (process 14, .57) and JPEG lossless SV1 (.70): imagecodecs (BSD-3, whose
  JPEG codecs are libjpeg-turbo 3, IJG/BSD, with liblj92 and jpegsof3 as fallbacks) through the plugin
  :func:`_decode_frame` of this module, registered with pydicom by :func:`register`.

pydicom's alternatives for the JPEG family are pylibjpeg-libjpeg (GPL-3: not used here) and python-gdcm (which
pydicom 3.0 refuses for 12-bit JPEG extended). :func:`register` runs when :mod:`rsna19.io.hu` is imported, so
every process that decodes pixels (convert workers, predict-study) has the plugin.
"""

from __future__ import annotations

from typing import Any

from pydicom import uid

#: Transfer syntaxes the plugin of this module decodes.
IMAGECODECS_SYNTAXES: tuple[uid.UID, ...] = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
)
#: pydicom's plugin contract: the packages a plugin needs, per transfer syntax (named in "missing" messages).
DECODER_DEPENDENCIES: dict[str, tuple[str, ...]] = {ts: ("imagecodecs>=2024.9",) for ts in IMAGECODECS_SYNTAXES}
#: Label of the plugin in pydicom's decoder registry.
PLUGIN_LABEL = "imagecodecs"

#: What to ``pip install`` for each transfer syntax this project decodes with a third-party package.
INSTALL_HINTS: dict[str, str] = {
    uid.RLELossless: "pydicom (built in)",
    uid.JPEGBaseline8Bit: "pillow or imagecodecs",
    uid.JPEGExtended12Bit: "imagecodecs",
    uid.JPEGLossless: "imagecodecs",
    uid.JPEGLosslessSV1: "imagecodecs",
    uid.JPEGLSLossless: "pyjpegls",
    uid.JPEGLSNearLossless: "pyjpegls",
    uid.JPEG2000Lossless: "pylibjpeg pylibjpeg-openjpeg",
    uid.JPEG2000: "pylibjpeg pylibjpeg-openjpeg",
}

_registered = False


def is_available(transfer_syntax: str) -> bool:
    """pydicom's plugin contract: True when imagecodecs is installed and ``transfer_syntax`` is one of ours."""
    if transfer_syntax not in IMAGECODECS_SYNTAXES:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG8.available)


def _decode_array(src: bytes) -> Any:
    """Decode one JPEG (T.81) codestream with the first imagecodecs codec that reads it: (rows, cols[, samples])."""
    import imagecodecs

    errors = []
    # libjpeg-turbo 3 reads baseline, 12-bit extended and lossless (SOF3, predictors 1-7, 2-16 bit); the two
    # lossless-only decoders are there for the odd stream libjpeg-turbo refuses.
    for name in ("jpeg8_decode", "ljpeg_decode", "jpegsof3_decode"):
        decode = getattr(imagecodecs, name, None)
        if decode is None:
            continue
        try:
            return decode(src)
        except Exception as exc:  # noqa: BLE001 - try the next codec; all messages are kept for the error
            errors.append(f"{name}: {exc}")
    raise ValueError("imagecodecs cannot decode the JPEG stream (" + "; ".join(errors) + ")")


def _decode_frame(src: bytes, runner: Any) -> bytes:
    """pydicom's plugin contract: decode one frame to the bytes of a native little-endian frame.

    Args:
        src: the encoded frame.
        runner: pydicom's ``DecodeRunner`` (rows, columns, samples per pixel, bits allocated …).

    Returns:
        Rows × Columns × SamplesPerPixel samples of ``BitsAllocated`` bits, little endian.
    """
    import numpy as np

    if runner.samples_per_pixel != 1:
        # Colour JPEG never holds CT; Pillow (tried first for baseline) handles colour conversions properly.
        raise NotImplementedError("the imagecodecs plugin decodes monochrome JPEG only")
    arr = np.asarray(_decode_array(src))
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.shape != (runner.rows, runner.columns):
        raise ValueError(f"decoded JPEG is {arr.shape}, expected ({runner.rows}, {runner.columns})")
    nbytes = 1 if runner.bits_allocated <= 8 else 2
    # Signed data is stored as its two's-complement bit pattern; the caller reinterprets the cells.
    return arr.astype(f"<u{nbytes}", copy=False).tobytes()


def register() -> None:
    """Add the imagecodecs plugin to pydicom's decoders for :data:`IMAGECODECS_SYNTAXES` (idempotent).

    It is added after pydicom's own plugins, so an installed gdcm / pylibjpeg-libjpeg / Pillow is tried first.
    Where imagecodecs is missing, pydicom lists it among the decoder's missing dependencies.
    """
    global _registered
    if _registered:
        return
    from pydicom.pixels.decoders.base import get_decoder

    for ts in IMAGECODECS_SYNTAXES:
        decoder = get_decoder(ts)
        if PLUGIN_LABEL not in decoder._available and PLUGIN_LABEL not in decoder._unavailable:
            decoder.add_plugin(PLUGIN_LABEL, (__name__, "_decode_frame"))
    _registered = True


def install_hint(transfer_syntax: str) -> str | None:
    """The ``pip install`` arguments that add a decoder for ``transfer_syntax``, None where none is known."""
    return INSTALL_HINTS.get(str(transfer_syntax))
