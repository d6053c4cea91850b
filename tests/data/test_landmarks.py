import numpy as np
from PIL import Image

from deep_retrieval.data.landmarks import RENDERERS, mixed_view


def test_mixed_draws_either_renderer_per_view():
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, (6, 8, 3)).astype(np.uint8)).resize((240, 180))
              for _ in range(3)]
    drawn, matched = set(), 0
    for seed in range(16):
        image, box, visible = mixed_view(photos[0], np.random.default_rng(seed), (96, 72), 0.5, photos)
        for name in ("photo_view", "camera"):
            after = np.random.default_rng(seed)
            after.random()  # the draw that chose the renderer
            other, other_box, other_visible = RENDERERS[name](photos[0], after, (96, 72), 0.5, photos)
            if np.array_equal(np.asarray(image), np.asarray(other)):
                assert (box, visible) == (other_box, other_visible)
                drawn.add(name)
                matched += 1
    assert matched == 16 and drawn == {"photo_view", "camera"}
