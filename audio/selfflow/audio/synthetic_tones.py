"""A captioned toy audio dataset: chords played on simple synthetic instruments, in stereo.

Each class is a (chord, instrument) pair, captioned "a C major chord on a flute". Instruments differ in
harmonic content and envelope (flute: nearly pure, slow attack; organ: strong harmonics, flat; pluck:
bright, exponential decay). A clip depends only on ``(seed, index)``, like the image and video datasets.
"""

from __future__ import annotations

import numpy as np
import torch

CHORDS = {  # Hz, equal temperament around middle C
    "C major": (261.63, 329.63, 392.00), "A minor": (220.00, 261.63, 329.63),
    "G major": (196.00, 246.94, 293.66), "F major": (174.61, 220.00, 261.63),
}
INSTRUMENTS = {  # harmonic amplitudes, attack (s), decay rate (1/s)
    "flute": ((1.0, 0.1), 0.06, 0.0), "organ": ((1.0, 0.6, 0.4, 0.3), 0.01, 0.0),
    "pluck": ((1.0, 0.5, 0.33, 0.25, 0.2), 0.002, 6.0),
}
CLASSES: list[tuple[str, str]] = [(c, i) for c in CHORDS for i in INSTRUMENTS]
CAPTIONS = [f"a {c} chord on a {i}" for c, i in CLASSES]


def render_tone(seed: int, index: int, sample_rate: int = 8000, num_samples: int = 4096
                ) -> tuple[np.ndarray, int]:
    """Clip ``index`` of stream ``seed``: stereo ``(2, num_samples)`` float32 in [-1, 1] and its label."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(CLASSES)))
    chord, instrument = CLASSES[label]
    harmonics, attack, decay = INSTRUMENTS[instrument]
    t = np.arange(num_samples) / sample_rate
    detune = rng.uniform(0.98, 1.02)
    wave = np.zeros(num_samples)
    for f0 in CHORDS[chord]:
        phase = rng.uniform(0, 2 * np.pi)
        for k, a in enumerate(harmonics, 1):
            if k * f0 * detune < sample_rate / 2:  # no aliasing
                wave += a * np.sin(2 * np.pi * k * f0 * detune * t + k * phase)
    envelope = np.minimum(1.0, t / attack) * np.exp(-decay * t)
    wave *= envelope / max(1e-6, np.abs(wave).max())
    pan = rng.uniform(0.25, 0.75)  # constant-power panning
    stereo = np.stack([np.cos(pan * np.pi / 2), np.sin(pan * np.pi / 2)])[:, None] * wave * np.sqrt(2)
    return (0.7 * rng.uniform(0.8, 1.0) * stereo / np.abs(stereo).max()).astype(np.float32), label


def render_batch(seed: int, indices: range | list[int], sample_rate: int = 8000, num_samples: int = 4096
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Waveforms ``(B, 2, num_samples)``, labels ``(B,)`` and captions."""
    pairs = [render_tone(seed, i, sample_rate, num_samples) for i in indices]
    labels = [p[1] for p in pairs]
    return (torch.from_numpy(np.stack([p[0] for p in pairs])), torch.tensor(labels, dtype=torch.long),
            [CAPTIONS[k] for k in labels])
