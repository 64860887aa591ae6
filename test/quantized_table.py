"""A plain numpy reading of runtime.tables' quantized text-table layout, element by element (the tests' reference)."""
import numpy as np


def dequantize_reference(q: np.ndarray, scale: np.ndarray, bits: int, hidden: int, group: int = 32) -> np.ndarray:
    """Rows of text_embed.int8 / .int4 and their text_embed.scale rows -> float32 [rows, hidden], one value at a time:
    int8 value j is q[j]; int4 value j is nibble j % 2 (low first) of byte j // 2, minus 8; times scale[j // group]."""
    out = np.zeros((len(q), hidden), np.float32)
    for r in range(len(q)):
        for j in range(hidden):
            v = int(q[r, j]) if bits == 8 else ((int(q[r, j // 2]) >> (4 * (j % 2))) & 15) - 8
            out[r, j] = np.float32(v) * np.float32(scale[r, j // group])
    return out
