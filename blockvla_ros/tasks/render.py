"""Fast deterministic rendering of the tabletop as an RGB uint8 image (OpenCV drawing on numpy)."""
from __future__ import annotations

import cv2
import numpy as np

from blockvla_ros.tasks.spec import COLOR_RGB, OBJECT_RADIUS, TableObject

TABLE_RGB = (196, 184, 160)
RING_RGB = (255, 255, 255)
GRIPPER_RGB = (30, 30, 30)
_SHIFT = 4                      # fractional bits for sub-pixel drawing
_ONE = 1 << _SHIFT
EFFECTOR_RADIUS = 0.22          # table units (objects: 0.11, touched ring: 0.16)
DOT_RADIUS = 0.03
PRESS_DOT_RADIUS = 0.06


class TableRenderer:
    """Draws one episode's table. The static layer (table + objects + rings) is cached per touched set,
    so a step costs one copy plus the effector marker."""

    def __init__(self, image_size: int = 64):
        if not isinstance(image_size, (int, np.integer)) or image_size < 16:
            raise ValueError(f'image_size must be an int >= 16, got {image_size!r}')
        self.size = int(image_size)
        self._scale = self.size / 2.0   # pixels per table unit
        self._objects: list[TableObject] = []
        self._static_key = None
        self._static = None

    def set_objects(self, objects: list[TableObject]) -> None:
        """Start a new episode layout (drops the cached static layer)."""
        self._objects = list(objects)
        self._static_key = None

    def _px(self, xy) -> tuple[int, int]:
        """Table (x, y) -> fixed-point pixel (col, row) for cv2 drawing with `shift=_SHIFT`."""
        col = (xy[0] + 1.0) * self._scale - 0.5
        row = (1.0 - xy[1]) * self._scale - 0.5
        return int(round(col * _ONE)), int(round(row * _ONE))

    def _len(self, units: float) -> int:
        return max(_ONE, int(round(units * self._scale * _ONE)))

    def _thickness(self, per: int) -> int:
        """Line width of about size/per pixels (at least one)."""
        return max(1, self.size // per)

    def _draw_static(self, objects: list[TableObject], touched: frozenset[int]) -> np.ndarray:
        img = np.empty((self.size, self.size, 3), dtype=np.uint8)  # [H, W, 3] RGB
        img[:] = TABLE_RGB
        r = self._len(OBJECT_RADIUS)
        for i, obj in enumerate(objects):
            c = self._px(obj.xy)
            colour = COLOR_RGB[obj.color]
            if obj.shape == 'circle':
                cv2.circle(img, c, r, colour, -1, cv2.LINE_AA, _SHIFT)
            else:
                cv2.rectangle(img, (c[0] - r, c[1] - r), (c[0] + r, c[1] + r), colour, -1, cv2.LINE_AA, _SHIFT)
            if i in touched:
                ring = self._len(OBJECT_RADIUS * 1.45)
                cv2.circle(img, c, ring, RING_RGB, self._thickness(32), cv2.LINE_AA, _SHIFT)
        return img

    def render(self, touched, ee_xy, pressing: bool) -> np.ndarray:
        """Image [size, size, 3] uint8 RGB; `touched` holds object indices. Touched objects get a white ring;
        the effector is a dark ring around a dot that grows while the gripper presses."""
        key = frozenset(touched)
        if key != self._static_key:
            self._static = self._draw_static(self._objects, key)
            self._static_key = key
        img = self._static.copy()
        c = self._px(ee_xy)
        # A thin ring wider than an object, so the object under the effector stays visible, and a centre dot
        # that grows while pressing.
        cv2.circle(img, c, self._len(EFFECTOR_RADIUS), GRIPPER_RGB, self._thickness(64), cv2.LINE_AA, _SHIFT)
        dot = PRESS_DOT_RADIUS if pressing else DOT_RADIUS
        cv2.circle(img, c, self._len(dot), GRIPPER_RGB, -1, cv2.LINE_AA, _SHIFT)
        return img
