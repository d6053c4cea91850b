"""The landmarks of the built-in dataset (`deep_retrieval.data.synthetic`),
by source: procedural facades (`Facades`), real photographs (`Photos`)
and the validation splits' photographed places (`Scenes`). Each gives a
split's landmarks as functions ``(rng, size, difficulty) -> image`` and
the backgrounds of its distractors. Views of a photograph are made by one
of the `RENDERERS`."""


import copy

import numpy as np
from PIL import Image

from deep_retrieval.data.camera_views import camera_view
from deep_retrieval.data.views import clutter_scene, composite_cutout, make_facade, photo_view, photograph


def mixed_view(photo, rng, size, difficulty, surroundings):
    """A view by `photo_view` or `camera_view`, drawn per view."""
    render = photo_view if rng.random() < 0.5 else camera_view
    return render(photo, rng, size, difficulty, surroundings)


RENDERERS = {"photo_view": photo_view, "camera": camera_view, "mixed": mixed_view}
"""The view renderers by name: ``(photo, rng, size, difficulty, surroundings)
-> (image, box, visible)``. ``photo_view`` and ``camera`` come from
different nuisance models (`views`, `camera_views`), so that training with
one can be validated on views by the other."""


def landmark_seed(config, split, index):
    """The seed of landmark ``index`` of ``split`` ("train" or "test")."""
    return [config.seed, 7919, 0 if split == "train" else 1, index]


class Facades:
    """Procedural facades: one per (split, index), clutter drawn at random."""

    # Share of the landmark visible in a database image: easy from `easy`,
    # hard from `junk`, junk below; the difficulties of training and
    # database images.
    easy, junk = 0.9, 0.4
    train_difficulty = (0.0, 0.7)
    difficulty = (0.0, 1.0)

    def __init__(self, config):
        self.config = config
        self.sources = []
        self.problems = []
        self.counts = {"train": config.train_landmarks, "test": config.test_landmarks}

    def landmark(self, split, index):
        facade = make_facade(landmark_seed(self.config, split, index))
        return lambda rng, size, difficulty: photograph(facade, rng, size, difficulty)

    def background(self, rng, size, index, split):
        return clutter_scene(rng, size)


class Photos:
    """Real photographs (`deep_retrieval.data.photos`): each instance photo is
    one landmark; the held-out split takes a seeded draw of the training
    sources' photos and training the others. Training views are set in
    (and occluded by) other training photos; the held-out split's views and
    its distractors use GCompris's everyday objects, which training never
    sees. A Tux Paint cutout becomes a photograph once (`composite_cutout`,
    over a training photo) before its views are made."""

    WORK_SIDE = 640  # photos are downscaled once to this longest side
    # A zoomed view shows a part of the photo: that is hard, not junk, as
    # long as a fifth of it is there.
    easy, junk = 0.7, 0.2
    train_difficulty = (0.0, 1.0)
    difficulty = (0.3, 1.0)

    def __init__(self, config):
        from deep_retrieval.data import photos as photos_lib

        self.config = config
        self.render = RENDERERS[config.renderer]
        self.problems = []
        self._cache = {}
        if config.source == "folder":
            # A user's collection: every photo, a fifth (at least two) held out.
            instances, self.problems = photos_lib.folder_photos(config.photos_dir)
            if len(instances) < 4:
                raise ValueError(
                    f"{config.photos_dir}: {len(instances)} usable photographs, at least 4 are "
                    f"needed ({len(self.problems)} files could not be used)"
                )
            test = max(2, len(instances) // 5)
            self.counts = {"train": len(instances) - test, "test": test}
            try:
                clutter = [p for p in photos_lib.training_photos() if not p.cutout]
                distractors = photos_lib.scene_distractor_photos()
            except FileNotFoundError:
                clutter, distractors = [], []  # procedural clutter instead, below
        else:
            instances = photos_lib.training_photos(config.photos_dir, config.tuxpaint_dir)
            distractors = photos_lib.scene_distractor_photos(config.photos_dir)
            clutter = None  # the training photos themselves, below
            if config.surroundings:
                # Photos set aside as surroundings only: no view's background
                # or occluder then shows another training instance, which
                # would make that view a false negative of its queries.
                plain = [i for i in np.random.default_rng([config.seed, 41]).permutation(len(instances))
                         if not instances[i].cutout]
                if len(plain) < config.surroundings:
                    raise ValueError(f"surroundings = {config.surroundings}, but only {len(plain)} training-source "
                                     "photos are not cut-outs")
                aside = {int(i) for i in plain[:config.surroundings]}
                clutter = [instances[i] for i in sorted(aside)]
                instances = [p for i, p in enumerate(instances) if i not in aside]
            test = config.test_landmarks
            train = config.train_landmarks or len(instances) - test
            self.counts = {"train": train, "test": test}
        need = self.counts["train"] + self.counts["test"]
        if len(instances) < need:
            raise ValueError(
                f"{len(instances)} instance photographs, but train_landmarks + test_landmarks = {need}"
            )
        order = np.random.default_rng([config.seed, 23]).permutation(len(instances))
        self.split = {
            "test": [instances[i] for i in order[:self.counts["test"]]],
            "train": [instances[i] for i in order[self.counts["test"]:need]],
        }
        surroundings = clutter if config.source == "photos" and clutter else []
        if clutter is None:
            clutter = [p for p in self.split["train"] if not p.cutout]
        order = np.random.default_rng([config.seed, 29]).permutation(len(distractors))
        test_clutter, held_out = ([distractors[i] for i in part] for part in np.array_split(order, 2))
        self.clutter = {"train": [self._image(p) for p in clutter],
                        "test": [self._image(p) for p in test_clutter]}
        self.distractors = [self._image(p) for p in held_out]
        for k, split in enumerate(("train", "test", "distractor")):
            rng = np.random.default_rng([config.seed, 31, k])
            pool = [clutter_scene(rng, (self.WORK_SIDE, self.WORK_SIDE * 3 // 4)) for _ in range(16)]
            if split == "distractor" and not self.distractors:
                self.distractors = pool
            elif split != "distractor" and not self.clutter[split]:
                self.clutter[split] = pool
        self.sources = (
            [("train", i, p) for i, p in enumerate(self.split["train"])]
            + [("test", i, p) for i, p in enumerate(self.split["test"])]
            + [("distractor", i, p) for i, p in enumerate(held_out)]
            + [("test_clutter", i, p) for i, p in enumerate(test_clutter)]
        )
        if config.source == "folder":
            self.sources += [("train_clutter", i, p) for i, p in enumerate(clutter)]
        self.sources += [("surroundings", i, p) for i, p in enumerate(surroundings)]

    def _load(self, photo):
        img = photo.image()
        if photo.cutout:
            rng = np.random.default_rng([self.config.seed, 37, int(photo.sha1[:8], 16)])
            backgrounds = self.clutter["train"]
            img = composite_cutout(img, backgrounds[int(rng.integers(len(backgrounds)))], rng,
                                   (self.WORK_SIDE, self.WORK_SIDE * 3 // 4))
        img.thumbnail((self.WORK_SIDE, self.WORK_SIDE), Image.BILINEAR)
        return img

    def _image(self, photo):
        if photo.source not in self._cache:
            self._cache[photo.source] = self._load(photo)
        return self._cache[photo.source]

    def landmark(self, split, index):
        img = self._image(self.split[split][index])
        clutter = self.clutter[split]
        return lambda rng, size, difficulty: self.render(img, rng, size, difficulty, clutter)

    def background(self, rng, size, index, split):
        """A view of a photo with no landmark: a held-out distractor, or
        (training junk) one of the training clutter photos."""
        pool = self.distractors if split == "test" else self.clutter["train"]
        img = pool[index % len(pool)]
        view, _, _ = self.render(img, rng, size, rng.uniform(0, 1), self.clutter[split])
        return view


class Scenes:
    """The validation splits (`synthetic.SCENE_SPLITS`): photographed places
    (GCompris's monuments, Tux Paint's templates) among views of GCompris's
    everyday objects; no photo of either kind is in training. `rendered_by`
    gives the same places with another renderer."""

    easy, junk = Photos.easy, Photos.junk
    difficulty = Photos.difficulty
    render = staticmethod(photo_view)

    def __init__(self, config):
        from deep_retrieval.data import photos as photos_lib

        side = Photos.WORK_SIDE
        # With source="folder", photos_dir is the user's collection: the
        # scenes still come from the installed packages.
        rcc = config.photos_dir if config.source == "photos" else photos_lib.DEFAULT_DIR
        self.instances = photos_lib.scene_photos(rcc, config.tuxpaint_dir)
        self.others = photos_lib.scene_distractor_photos(rcc)
        self.counts = {"test": len(self.instances)}
        self._images = {}
        for p in self.instances + self.others:
            img = p.image()
            img.thumbnail((side, side), Image.BILINEAR)
            self._images[p.source] = img
        self.clutter = [self._images[p.source] for p in self.others]
        self.sources = ([("scene", i, p) for i, p in enumerate(self.instances)]
                        + [("scene_distractor", i, p) for i, p in enumerate(self.others)])

    def rendered_by(self, renderer):
        """These scenes with their views made by ``renderer`` (a `RENDERERS`
        name). The surroundings stay the distractor photos, so that no
        landmark-free image shows a place."""
        other = copy.copy(self)
        other.render = RENDERERS[renderer]
        return other

    def landmark(self, split, index):
        img = self._images[self.instances[index].source]
        return lambda rng, size, difficulty: self.render(img, rng, size, difficulty, self.clutter)

    def background(self, rng, size, index, split):
        img = self.clutter[index % len(self.clutter)]
        view, _, _ = self.render(img, rng, size, rng.uniform(0, 1), self.clutter)
        return view
