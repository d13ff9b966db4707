"""Input audio formats of the Realtime API to the 16 kHz float32 samples Whisper takes.

``audio/pcm`` is little-endian 16-bit PCM (24 kHz in OpenAI's API); ``audio/pcmu`` and
``audio/pcma`` are G.711 µ-law and A-law at 8 kHz. Audio arrives in chunks, so resampling keeps
state between chunks: a chunk boundary leaves no seam.
"""

from __future__ import annotations

import math

import numpy as np

TARGET_RATE = 16_000
_HALF_TAPS = 16  # kernel half-width in periods of the lower rate (~1 ms of delay)
_KAISER_BETA = 8.0  # ~80 dB side lobes


def _ulaw_table() -> np.ndarray:
    # ITU-T G.711 µ-law expansion: inverted bits, 3-bit exponent, 4-bit mantissa, bias 0x84.
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    magnitude = (((u & 0x0F) << 3) + 0x84) << ((u >> 4) & 0x07)
    return np.where(u & 0x80, 0x84 - magnitude, magnitude - 0x84).astype(np.float32) / 32768.0


def _alaw_table() -> np.ndarray:
    # ITU-T G.711 A-law expansion: even bits inverted (0x55), segment 0 is linear.
    a = np.arange(256, dtype=np.int32) ^ 0x55
    mantissa, segment = a & 0x0F, (a >> 4) & 0x07
    magnitude = np.where(
        segment == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(segment - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.float32) / 32768.0


ULAW = _ulaw_table()
ALAW = _alaw_table()


class Resampler:
    """Stateful rational resampler: a Kaiser-windowed sinc in polyphase form.

    Each output sample ``n`` sits at input time ``n * rate_in / rate_out``; its value is the
    input around that time weighted by the low-pass kernel of the phase it falls on. The input
    not yet fully used is kept for the next chunk.
    """

    def __init__(self, rate_in: int, rate_out: int = TARGET_RATE) -> None:
        g = math.gcd(rate_in, rate_out)
        self.up, self.down = rate_out // g, rate_in // g
        self.passthrough = self.up == self.down
        cutoff = min(1.0, self.up / self.down)  # of the input's Nyquist frequency
        self.reach = math.ceil(_HALF_TAPS / cutoff)  # input samples on each side
        offsets = np.arange(-self.reach + 1, self.reach + 1)
        phases = np.arange(self.up)[:, None] / self.up  # fractional input position
        tau = phases - offsets[None, :]
        edge = np.clip(tau / self.reach, -1.0, 1.0)
        window = np.i0(_KAISER_BETA * np.sqrt(1.0 - edge**2)) / np.i0(_KAISER_BETA)
        kernel = cutoff * np.sinc(cutoff * tau) * window
        self.kernel = (kernel / kernel.sum(axis=1, keepdims=True)).astype(np.float32)
        self.offsets = offsets
        # Input history starts with zeros so that the first outputs have their left context.
        self.pending = np.zeros(self.reach - 1, np.float32)
        self.base = -(self.reach - 1)  # input index of pending[0]
        self.next_out = 0

    def __call__(self, samples: np.ndarray) -> np.ndarray:
        if self.passthrough:
            return samples.astype(np.float32, copy=False)
        self.pending = np.concatenate([self.pending, samples.astype(np.float32, copy=False)])
        last = self.base + len(self.pending) - 1  # newest input index held
        # Output n needs input up to floor(n * down / up) + reach.
        end = ((last - self.reach) * self.up) // self.down + 1
        if end <= self.next_out:
            return np.zeros(0, np.float32)
        n = np.arange(self.next_out, end)
        centre = (n * self.down) // self.up
        phase = (n * self.down) % self.up
        taps = self.pending[centre[:, None] + self.offsets[None, :] - self.base]
        out = np.einsum("ij,ij->i", taps, self.kernel[phase])
        self.next_out = end
        keep_from = (end * self.down) // self.up - self.reach + 1 - self.base
        self.pending = self.pending[keep_from:]
        self.base += keep_from
        return out


class AudioDecoder:
    """Bytes of one input format, chunk after chunk, to 16 kHz float32 samples."""

    def __init__(self, kind: str, rate: int) -> None:
        if kind not in ("audio/pcm", "audio/pcmu", "audio/pcma"):
            raise ValueError(f"unsupported audio format {kind!r}")
        self.kind = kind
        self.resample = Resampler(rate)
        self._odd = b""  # a PCM16 sample split across two chunks

    def __call__(self, data: bytes) -> np.ndarray:
        if self.kind == "audio/pcm":
            data, self._odd = self._odd + data, b""
            if len(data) % 2:
                data, self._odd = data[:-1], data[-1:]
            samples = np.frombuffer(data, "<i2").astype(np.float32) / 32768.0
        else:
            table = ULAW if self.kind == "audio/pcmu" else ALAW
            samples = table[np.frombuffer(data, np.uint8)]
        return self.resample(samples)
