"""Runs a built backbone on batches of uint8 images; callers do not care which engine does it."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from .backbones import BackboneConfig, build_backbone


class Runtime(Protocol):
    """A backbone ready to run: uint8 (n, size, size, 3) in, float32 (n, dim) out."""

    name: str
    image_size: int
    dim: int

    def __call__(self, batch: np.ndarray) -> np.ndarray: ...


class KerasRuntime:
    """The Keras model inside one traced tf.function (any batch size, one trace)."""

    name = "keras"

    def __init__(self, model: Any) -> None:
        import tensorflow as tf

        self.model = model
        self.image_size = int(model.input_shape[1])
        self.dim = int(model.output_shape[-1])
        spec = tf.TensorSpec((None, self.image_size, self.image_size, 3), tf.uint8)
        self._run = tf.function(lambda x: model(tf.cast(x, tf.float32), training=False),
                                input_signature=[spec])
        self(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))  # trace now, not in the first batch

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self._run(batch).numpy()


def make_runtime(config: BackboneConfig, kind: str = "keras") -> Runtime:
    """Build the backbone for a resolved config and wrap it in the requested runtime."""
    return KerasRuntime(build_backbone(config))
